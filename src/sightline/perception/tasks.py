"""The task units (defined in `sightline.data.tasks`, below the analyses), re-exported for the readouts."""

from sightline.data.tasks import (  # noqa: F401
    FORMATS,
    IGNORE,
    TASK_FORMAT,
    TASKS,
    CoSegSet,
    Episode,
    ImageSource,
    KeypointPair,
    MaskSource,
    SegSample,
    TaskData,
    Unit,
    VideoClip,
    load_image,
    load_mask,
)

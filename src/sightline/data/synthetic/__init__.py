"""The synthetic visual world: scenes of coloured shapes whose every fact is known exactly.

Scenes (pixels, masks, keypoints), referring expressions and questions, transformed pairs and
moving clips, all reproducible from a seed, and exports to the dataset layouts sightline reads.
See docs/synthetic.md.
"""

from sightline.data.synthetic.export import (
    FOLDER_ATTRIBUTES,
    davis_palette,
    export_coco,
    export_davis,
    export_imagefolder,
    export_jsonl,
    export_pairs,
    mask_to_rle,
)
from sightline.data.synthetic.geometry import UNIT_SHAPES, UnitShape
from sightline.data.synthetic.language import (
    LOCATIONS,
    MARGIN_FRACTION,
    RELATIONS,
    Question,
    RefExp,
    caption,
    parse_refexp,
    questions,
    referring_expressions,
    resolve,
)
from sightline.data.synthetic.layout import ObjectSpec, WorldConfig, derive_seed, sample_objects
from sightline.data.synthetic.motion import (
    PAIR_MODES,
    Clip,
    Correspondence,
    ScenePair,
    render_clip,
    render_pair,
)
from sightline.data.synthetic.render import (
    Background,
    Keypoint,
    Scene,
    SceneObject,
    compose_scene,
    make_background,
    render_scene,
)
from sightline.data.synthetic.vocab import (
    ANSWERS,
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    NUMBERS,
    POSITIONS,
    QTYPES,
    SHAPES,
    SIZE_FRACTIONS,
    SIZES,
    STYLES,
)
from sightline.data.synthetic.world import DAMAGE_QTYPES, World, WorldFacts, world_facts

__all__ = [
    "ANSWERS", "BACKGROUNDS", "BACKGROUND_RGB", "COLOURS", "DAMAGE_QTYPES", "COLOUR_RGB", "FOLDER_ATTRIBUTES", "LOCATIONS",
    "MARGIN_FRACTION", "NUMBERS", "PAIR_MODES", "POSITIONS", "QTYPES", "RELATIONS", "SHAPES",
    "SIZES", "SIZE_FRACTIONS", "STYLES", "UNIT_SHAPES",
    "Background", "Clip", "Correspondence", "Keypoint", "ObjectSpec", "Question", "RefExp", "Scene",
    "SceneObject", "ScenePair", "UnitShape", "World", "WorldConfig", "WorldFacts",
    "caption", "compose_scene", "davis_palette", "derive_seed", "export_coco", "export_davis",
    "export_imagefolder", "export_jsonl", "export_pairs", "make_background", "mask_to_rle",
    "parse_refexp", "questions", "referring_expressions", "render_clip", "render_pair", "render_scene",
    "resolve", "sample_objects", "world_facts",
]

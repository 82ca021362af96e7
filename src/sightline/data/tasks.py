"""The units the perception tasks work on, shared by every loader and readout (re-exported as `sightline.perception.tasks`).

A loader (`sightline.data.perception`) turns a dataset folder into a `TaskData`: light records that
name their images and masks (paths or zero-argument callables) and load nothing until asked, so a
run holds one episode / set / pair / clip in memory at a time. `load_image` / `load_mask` resolve
a record's fields.

Masks are uint8 [H, W] in the ORIGINAL image's pixels: for binary tasks 1 = foreground, 0 =
background; for clips a label map 0 = background, 1..K = objects; `IGNORE` (255) marks pixels no
metric counts (VOC's object borders, DAVIS void).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
from PIL import Image

TASKS = ("fgseg", "coseg", "textseg", "refseg", "semcorr", "tempcorr")
FORMATS = ("pascal5i", "msrc", "imagenet-s", "refcoco", "spair", "davis", "synthetic")
TASK_FORMAT = {  # the real dataset each task reads by default (synthetic serves every task)
    "fgseg": "pascal5i", "coseg": "msrc", "textseg": "imagenet-s", "refseg": "refcoco",
    "semcorr": "spair", "tempcorr": "davis",
}
IGNORE = 255

ImageSource = Union[str, "os.PathLike[str]", Image.Image, Callable[[], Image.Image]]
MaskSource = Union[str, "os.PathLike[str]", np.ndarray, Callable[[], np.ndarray]]


def load_image(src: ImageSource) -> Image.Image:
    """An RGB PIL image from a path, an image or a callable returning one."""
    if callable(src) and not isinstance(src, Image.Image):
        src = src()
    if isinstance(src, Image.Image):
        return src.convert("RGB") if src.mode != "RGB" else src
    from sightline.data.images import load_image as _load

    return _load(src)


def load_mask(src: MaskSource) -> np.ndarray:
    """A uint8 [H, W] mask from an array, a callable returning one, or a PNG path read as is
    (palette indices for palette PNGs; a loader that needs another decoding passes a callable)."""
    if callable(src) and not isinstance(src, np.ndarray):
        src = src()
    if isinstance(src, np.ndarray):
        return np.asarray(src, dtype=np.uint8)
    with Image.open(src) as im:
        return np.asarray(im if im.mode in ("P", "L") else im.convert("L"), dtype=np.uint8)


@dataclass(frozen=True)
class SegSample:
    """One image with a binary mask: the query of an episode, a member of a co-segmentation set,
    or a text-query item (`text` = the class name or the referring expression)."""

    id: str
    image: ImageSource
    mask: MaskSource
    category: str = ""
    text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Episode:
    """Few-shot foreground segmentation: `shots` support samples of `category`, one query."""

    id: str
    category: str
    support: tuple[SegSample, ...]
    query: SegSample
    fold: int = 0


@dataclass(frozen=True)
class CoSegSet:
    """Co-segmentation: images sharing one object category; masks mark that object."""

    name: str
    samples: tuple[SegSample, ...]


@dataclass(frozen=True)
class KeypointPair:
    """Semantic correspondence: matching keypoints (x, y pixels of the original images) in a
    source and a target image; `target_bbox` (x0, y0, x1, y1) is the target object's box."""

    id: str
    category: str
    source: ImageSource
    target: ImageSource
    source_xy: np.ndarray  # [N, 2] float
    target_xy: np.ndarray  # [N, 2] float
    target_bbox: tuple[float, float, float, float]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VideoClip:
    """Temporal correspondence: frames and label maps (0 = background, 1..K objects, IGNORE void).
    The first frame's map is given to the readout; the others are ground truth only."""

    name: str
    frames: tuple[ImageSource, ...]
    masks: tuple[MaskSource, ...]


Unit = Union[Episode, CoSegSet, SegSample, KeypointPair, VideoClip]


@dataclass
class TaskData:
    """What a loader returns: the units to score, and (textseg, refseg) held-out units on which a
    threshold is chosen before the units are scored. `source` says in words what was read."""

    task: str
    format: str
    source: str
    units: Sequence[Unit]
    calibration: Sequence[Unit] = ()
    categories: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

"""Drawing scenes: backgrounds per style, objects painted in order, and every fact of the result
(visible masks, boxes, visible fractions, keypoints with occlusion, class and instance maps)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from sightline.data.synthetic.geometry import UNIT_SHAPES, keypoints_xy, pose, rasterize
from sightline.data.synthetic.layout import (
    ObjectSpec,
    WorldConfig,
    configure,
    rng_for,
    sample_objects,
    validate_specs,
)
from sightline.data.synthetic.vocab import BACKGROUND_RGB, BACKGROUNDS, COLOUR_RGB, SHAPES, STYLES
from sightline.errors import UserError

__all__ = [
    "Background",
    "Keypoint",
    "Scene",
    "SceneObject",
    "compose_scene",
    "make_background",
    "render_scene",
]


@dataclass(frozen=True)
class Keypoint:
    """A named point of an object, in pixel coordinates (pixel (r, c) spans [c, c+1) x [r, r+1)).

    visible: inside the image and the pixel holding the point shows this object (not a later one
    drawn over it). Every keypoint's pixel belongs to its object's unoccluded mask (see geometry)."""

    name: str
    x: float
    y: float
    visible: bool
    in_image: bool

    @property
    def coco_v(self) -> int:
        """COCO visibility flag: 2 visible, 1 in the image but occluded, 0 outside the image."""
        return 2 if self.visible else (1 if self.in_image else 0)

    @property
    def xy(self) -> tuple[float, float]:
        return (self.x, self.y)


@dataclass(frozen=True, eq=False)
class SceneObject:
    """Everything known about one drawn object. Index = drawing order (later ones occlude earlier)."""

    index: int
    shape: str
    colour: str
    size: str
    centre: tuple[float, float]  # (x, y) pixels: where the unit frame's origin lands
    rotation: float  # degrees counter-clockwise on screen (as specified; see `affine`)
    flip: bool
    radius: float  # circumradius in pixels (geometric mean scale of `affine`)
    affine: np.ndarray  # 2x3, unit frame -> pixels: the authoritative geometry
    mask: np.ndarray  # HxW bool, the visible pixels
    full_mask: np.ndarray  # HxW bool, the pixels it would cover with nothing in front (clipped to image)
    area: int  # visible pixels
    full_area: int  # pixels of the whole shape on an unbounded canvas (nothing in front, no clipping)
    box: tuple[int, int, int, int] | None  # (x0, y0, x1, y1) pixel edges of the visible pixels, x1/y1 exclusive
    keypoints: tuple[Keypoint, ...]

    @property
    def visible_fraction(self) -> float:
        """Visible pixels over the pixels of the whole shape (occlusion and image border both hide)."""
        return self.area / self.full_area if self.full_area else 0.0

    def keypoint(self, name: str) -> Keypoint:
        """The keypoint called `name` (KeyError if this shape has none)."""
        for point in self.keypoints:
            if point.name == name:
                return point
        raise KeyError(f"{self.shape} has no keypoint {name!r}: it has {[p.name for p in self.keypoints]}")

    def to_json(self) -> dict[str, Any]:
        """The facts of this object as JSON-able values (no masks); keypoints as name -> [x, y, coco_v]."""
        return {
            "index": self.index, "shape": self.shape, "colour": self.colour, "size": self.size,
            "centre": [round(self.centre[0], 3), round(self.centre[1], 3)],
            "rotation": round(self.rotation, 3), "flip": self.flip, "radius": round(self.radius, 3),
            "affine": [[round(float(v), 5) for v in row] for row in self.affine],
            "box": list(self.box) if self.box is not None else None,
            "area": self.area, "full_area": self.full_area,
            "visible_fraction": round(self.visible_fraction, 4),
            "keypoints": {p.name: [round(p.x, 3), round(p.y, 3), p.coco_v] for p in self.keypoints},
        }


@dataclass(frozen=True, eq=False)
class Scene:
    """One image and its ground truth."""

    image: np.ndarray  # HxWx3 uint8 RGB
    objects: tuple[SceneObject, ...]
    class_mask: np.ndarray  # HxW uint8: 0 background, 1 + SHAPES.index(shape) where an object is visible
    instance_mask: np.ndarray  # HxW uint8: 0 background, 1 + object index
    style: str
    background: tuple[str, ...]  # names of the background colours (BACKGROUNDS)
    seed: int | None = None

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def size_hw(self) -> tuple[int, int]:
        return self.height, self.width

    def to_pil(self) -> Image.Image:
        """The image as a PIL RGB image."""
        return Image.fromarray(self.image, "RGB")

    def to_json(self) -> dict[str, Any]:
        """The scene's facts as JSON-able values (no pixels, no masks)."""
        return {"seed": self.seed, "height": self.height, "width": self.width, "style": self.style,
                "background": list(self.background), "n_objects": len(self.objects),
                "objects": [o.to_json() for o in self.objects]}


@dataclass(frozen=True, eq=False)
class Background:
    """The backdrop of an image: its pixels, the noise added over everything (or None), its facts."""

    style: str
    colours: tuple[str, ...]
    pixels: np.ndarray  # HxWx3 uint8
    noise: np.ndarray | None = None  # HxWx3 int16, added after the objects are painted


def make_background(rng: np.random.Generator, style: str, size_hw: tuple[int, int],
                    noise_amplitude: int = 12) -> Background:
    """A background of this style; its colours are drawn from BACKGROUNDS."""
    if style not in STYLES:
        raise UserError(f"unknown style {style!r}: use one of {', '.join(STYLES)}")
    height, width = size_hw
    side = min(height, width)
    first, second = (str(c) for c in rng.choice(BACKGROUNDS, size=2, replace=False))
    c0 = np.array(BACKGROUND_RGB[first], dtype=np.float64)
    c1 = np.array(BACKGROUND_RGB[second], dtype=np.float64)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    angle = rng.uniform(0.0, np.pi)
    along = xs * math.cos(angle) + ys * math.sin(angle)
    noise = None
    if style in ("flat", "noisy"):
        colours: tuple[str, ...] = (first,)
        pixels = np.broadcast_to(c0, (height, width, 3))
        if style == "noisy":
            noise = rng.integers(-noise_amplitude, noise_amplitude + 1, (height, width, 3)).astype(np.int16)
    elif style == "striped":
        colours = (first, second)
        period = rng.uniform(0.08, 0.2) * side
        band = np.floor(along / (period / 2) + rng.uniform(0, 2)).astype(np.int64) % 2
        pixels = np.where(band[..., None] == 0, c0, c1)
    elif style == "checkered":
        colours = (first, second)
        cell = rng.uniform(0.08, 0.18) * side
        ox, oy = rng.uniform(0, cell, size=2)
        parity = (np.floor((xs + ox) / cell) + np.floor((ys + oy) / cell)).astype(np.int64) % 2
        pixels = np.where(parity[..., None] == 0, c0, c1)
    else:  # gradient
        colours = (first, second)
        lo, hi = along.min(), along.max()
        t = ((along - lo) / max(hi - lo, 1e-9))[..., None]
        pixels = c0 * (1 - t) + c1 * t
    return Background(style, colours, np.ascontiguousarray(np.rint(pixels).astype(np.uint8)), noise)


def render_scene(seed: int, config: WorldConfig | None = None, *, objects: Sequence[ObjectSpec] | None = None,
                 style: str | None = None, **overrides: Any) -> Scene:
    """Draw scene `seed`: identical pixels and facts for the same arguments in any process.

    `overrides` replace fields of `config` (e.g. image_size=64, n_objects=1). `objects` draws these
    objects instead of sampling them; `style` fixes the style. The style, background and layout come
    from separate streams of `seed`, so fixing the style keeps the same objects."""
    config = configure(config, overrides)
    style = style or config.style or str(rng_for(seed, "style").choice(config.styles))
    background = make_background(rng_for(seed, "background"), style, config.size_hw, config.noise_amplitude)
    specs = (validate_specs(objects) if objects is not None
             else sample_objects(rng_for(seed, "objects"), config))
    return compose_scene(specs, background, seed=seed)


def compose_scene(objects: Sequence[ObjectSpec], background: Background, seed: int | None = None) -> Scene:
    """Paint `objects` in order over `background` and work out every fact of the result."""
    height, width = background.pixels.shape[:2]
    if len(objects) > 254:
        raise UserError(f"a scene holds at most 254 objects, got {len(objects)}")
    image = background.pixels.copy()
    instance = np.zeros((height, width), dtype=np.uint8)
    classes = np.zeros((height, width), dtype=np.uint8)
    affines, full_masks, full_areas = [], [], []
    for index, spec in enumerate(objects):
        affine = spec.matrix((height, width))
        mask, full_area = rasterize(spec.shape, affine, height, width)
        image[mask] = COLOUR_RGB[spec.colour]
        instance[mask] = index + 1
        classes[mask] = SHAPES.index(spec.shape) + 1
        affines.append(affine)
        full_masks.append(mask)
        full_areas.append(full_area)
    if background.noise is not None:
        image = np.clip(image.astype(np.int16) + background.noise, 0, 255).astype(np.uint8)
    built = []
    for index, spec in enumerate(objects):
        visible = instance == index + 1
        area = int(visible.sum())
        affine = affines[index]
        rotation, flip, radius = pose(affine)
        built.append(SceneObject(
            index=index, shape=spec.shape, colour=spec.colour, size=spec.size,
            centre=(float(affine[0, 2]), float(affine[1, 2])), rotation=rotation, flip=flip, radius=radius,
            affine=affine, mask=visible, full_mask=full_masks[index], area=area,
            full_area=full_areas[index], box=_box(visible) if area else None,
            keypoints=_keypoints(index, spec.shape, affine, instance),
        ))
    return Scene(image=image, objects=tuple(built), class_mask=classes, instance_mask=instance,
                 style=background.style, background=background.colours, seed=seed)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _keypoints(index: int, shape: str, affine: np.ndarray, instance: np.ndarray) -> tuple[Keypoint, ...]:
    """The object's keypoints; visible iff in the image and its pixel shows this object."""
    height, width = instance.shape
    out = []
    for name, (x, y) in zip(UNIT_SHAPES[shape].keypoint_names, keypoints_xy(shape, affine)):
        x, y = float(x), float(y)
        in_image = 0.0 <= x < width and 0.0 <= y < height
        visible = in_image and int(instance[int(math.floor(y)), int(math.floor(x))]) == index + 1
        out.append(Keypoint(name, x, y, visible, in_image))
    return tuple(out)

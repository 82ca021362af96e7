"""World settings and scene layout: which objects, where, in what order, sampled reproducibly from a seed."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sightline.data.synthetic.geometry import placement, rasterize
from sightline.data.synthetic.vocab import COLOURS, SHAPES, SIZE_FRACTIONS, SIZES, STYLES
from sightline.errors import UserError

__all__ = ["ObjectSpec", "WorldConfig", "check_seed", "configure", "derive_seed", "radius_px", "rng_for",
           "sample_objects"]


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are drawn. Every default runs; `World(seed, config)` and `render_scene` take one."""

    image_size: int | tuple[int, int] = 112  # side, or (height, width), in pixels
    n_objects: int | None = None  # fixed object count; None: drawn from count_probs
    count_probs: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)  # P(1 object), P(2), ...
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOURS
    sizes: tuple[str, ...] = SIZES
    styles: tuple[str, ...] = STYLES  # styles drawn from (uniformly) when `style` is None
    style: str | None = None  # fix the style of every image
    min_visible: float = 0.6  # every object keeps at least this fraction of its pixels visible
    max_rotation_deg: float = 30.0  # rotation uniform in [-max, +max]; 0 disables rotation
    allow_duplicates: bool = True  # may two objects share both shape and colour?
    noise_amplitude: int = 12  # "noisy" style: uniform integer noise in [-a, a] per channel

    def __post_init__(self) -> None:
        size = self.image_size
        if not (isinstance(size, int) or (isinstance(size, tuple) and len(size) == 2
                                          and all(isinstance(v, int) for v in size))):
            raise UserError(f"image_size must be a side or a (height, width) pair of whole numbers, got {size!r}")
        height, width = self.size_hw
        if not (16 <= height <= 4096 and 16 <= width <= 4096):
            raise UserError(f"synthetic image_size {self.image_size!r} is out of range: use 16..4096 pixels")
        for name, values, allowed in (("shapes", self.shapes, SHAPES), ("colours", self.colours, COLOURS),
                                      ("sizes", self.sizes, SIZES), ("styles", self.styles, STYLES)):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise UserError(f"synthetic {name} {list(values)!r} must be a non-empty subset of {list(allowed)}")
        if self.style is not None and self.style not in STYLES:
            raise UserError(f"unknown style {self.style!r}: use one of {', '.join(STYLES)}")
        if self.n_objects is not None and not 1 <= self.n_objects <= 8:
            raise UserError(f"n_objects={self.n_objects} is out of range: use 1..8 (or None)")
        probs = np.asarray(self.count_probs, dtype=float)
        if (probs.ndim != 1 or not 1 <= len(probs) <= 8 or (probs < 0).any()
                or not math.isclose(probs.sum(), 1.0, abs_tol=1e-6)):
            raise UserError(f"count_probs {self.count_probs!r} must be 1 to 8 non-negative numbers summing to 1")
        if not 0.0 < self.min_visible <= 1.0:
            raise UserError(f"min_visible={self.min_visible} must be in (0, 1]")

    @property
    def size_hw(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        if isinstance(self.image_size, int):
            return self.image_size, self.image_size
        height, width = self.image_size
        return int(height), int(width)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorldConfig:
        """The inverse of `to_dict`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise UserError(f"unknown WorldConfig field(s) {sorted(unknown)}: use {sorted(names)}")
        values = dict(data)
        for key in ("count_probs", "shapes", "colours", "sizes", "styles"):
            if key in values:
                values[key] = tuple(values[key])
        if isinstance(values.get("image_size"), list):
            values["image_size"] = tuple(values["image_size"])
        return cls(**values)


@dataclass(frozen=True)
class ObjectSpec:
    """One object to draw: what it is and where. `affine`, when given, overrides centre/rotation/size
    for the geometry (pairs and clips use it); the attribute labels stay as given."""

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]  # (x, y) in pixels
    rotation: float = 0.0  # degrees, counter-clockwise on screen
    flip: bool = False  # mirrored left-right before rotation
    affine: tuple[tuple[float, ...], ...] | None = None  # 2x3, unit frame -> pixels

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise UserError(f"unknown shape {self.shape!r}: use one of {', '.join(SHAPES)}")
        if self.colour not in COLOURS:
            raise UserError(f"unknown colour {self.colour!r}: use one of {', '.join(COLOURS)}")
        if self.size not in SIZES:
            raise UserError(f"unknown size {self.size!r}: use one of {', '.join(SIZES)}")

    def matrix(self, size_hw: tuple[int, int]) -> np.ndarray:
        """The 2x3 affine (unit frame -> pixels) of this object in an image of `size_hw`."""
        if self.affine is not None:
            return np.array(self.affine, dtype=float)
        return placement(self.centre, radius_px(self.size, size_hw), self.rotation, self.flip)


def radius_px(size: str, size_hw: tuple[int, int]) -> float:
    """Circumradius in pixels of an object of this size label."""
    return SIZE_FRACTIONS[size] * min(size_hw) / 2.0


def configure(config: WorldConfig | None, overrides: Mapping[str, Any]) -> WorldConfig:
    """`config` (default: WorldConfig()) with some fields replaced."""
    config = config or WorldConfig()
    try:
        return dataclasses.replace(config, **overrides) if overrides else config
    except TypeError as err:
        names = sorted(f.name for f in dataclasses.fields(WorldConfig))
        raise UserError(f"unknown world setting ({err}): use one of {', '.join(names)}") from None


def check_seed(seed: int) -> int:
    """`seed` as an int, or a UserError if it is not a non-negative whole number."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative whole number, got {seed!r}")
    return int(seed)


def _words(seed: int, keys: tuple[int | str, ...]) -> list[int]:
    check_seed(seed)
    return [int(seed)] + [k if isinstance(k, int) else int.from_bytes(k.encode(), "little") for k in keys]


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 62-bit seed for item `keys` of the stream `seed` (stable across processes and platforms)."""
    state = np.random.SeedSequence(_words(seed, keys)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 30) ^ int(state[1])


def rng_for(seed: int, *keys: int | str) -> np.random.Generator:
    """The numpy Generator of item `keys` of the stream `seed`."""
    return np.random.default_rng(np.random.SeedSequence(_words(seed, keys)))


def sample_objects(rng: np.random.Generator, config: WorldConfig, n_objects: int | None = None,
                   fixed_shapes: Mapping[int, str] | None = None,
                   max_restarts: int = 200) -> list[ObjectSpec]:
    """Objects for one scene, in drawing order (later ones occlude earlier ones), placed fully inside
    the image so that every object keeps at least `config.min_visible` of its pixels visible.

    `fixed_shapes` forces the shape of some slots ({slot: shape})."""
    height, width = config.size_hw
    if n_objects is None:
        n_objects = config.n_objects
    if n_objects is None:
        n_objects = 1 + int(rng.choice(len(config.count_probs), p=np.asarray(config.count_probs, float)))
    fixed_shapes = dict(fixed_shapes or {})
    if not config.allow_duplicates and n_objects > len(config.shapes) * len(config.colours):
        raise UserError(f"{n_objects} objects cannot all differ in shape or colour with {len(config.shapes)} "
                        f"shapes and {len(config.colours)} colours: set allow_duplicates=True")
    for _ in range(max_restarts):
        specs = _try_layout(rng, config, n_objects, fixed_shapes, height, width)
        if specs is not None:
            return specs
    raise UserError(f"cannot place {n_objects} objects with min_visible={config.min_visible} in a "
                    f"{height}x{width} image: lower n_objects or min_visible, or use smaller sizes")


def _try_layout(rng: np.random.Generator, config: WorldConfig, n_objects: int,
                fixed_shapes: dict[int, str], height: int, width: int,
                tries_per_object: int = 30) -> list[ObjectSpec] | None:
    specs: list[ObjectSpec] = []
    visible: list[np.ndarray] = []  # current visible mask of each placed object
    full: list[int] = []
    used: set[tuple[str, str]] = set()
    for slot in range(n_objects):
        for _ in range(tries_per_object):
            shape = fixed_shapes.get(slot) or str(rng.choice(config.shapes))
            colour = str(rng.choice(config.colours))
            if not config.allow_duplicates and (shape, colour) in used:
                continue
            size = str(rng.choice(config.sizes))
            radius = radius_px(size, (height, width))
            if 2 * radius + 2 > min(height, width):
                continue
            x = float(rng.uniform(radius + 1, width - radius - 1))
            y = float(rng.uniform(radius + 1, height - radius - 1))
            rotation = float(rng.uniform(-config.max_rotation_deg, config.max_rotation_deg))
            spec = ObjectSpec(shape, colour, size, (x, y), rotation)
            mask, area = rasterize(shape, spec.matrix((height, width)), height, width)
            if area == 0:
                continue
            occluded = [v & ~mask for v in visible]
            if all(o.sum() >= config.min_visible * f for o, f in zip(occluded, full)):
                specs.append(spec)
                visible = occluded + [mask]
                full.append(area)
                used.add((shape, colour))
                break
        else:
            return None
    return specs


def validate_specs(objects: Sequence[ObjectSpec]) -> list[ObjectSpec]:
    """A list copy of `objects`, checking each is an ObjectSpec."""
    out = list(objects)
    for obj in out:
        if not isinstance(obj, ObjectSpec):
            raise UserError(f"objects must be ObjectSpec instances, got {type(obj).__name__}")
    return out

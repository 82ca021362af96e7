"""Objects under motion: image pairs under a known transform or across scenes (the SPair-71k
analogue) and short clips of moving, turning, scaling, occluding objects (the DAVIS analogue)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from sightline.data.synthetic.geometry import compose, extent, placement, pose
from sightline.data.synthetic.layout import (
    ObjectSpec,
    WorldConfig,
    configure,
    radius_px,
    rng_for,
    sample_objects,
)
from sightline.data.synthetic.render import Scene, compose_scene, make_background
from sightline.data.synthetic.vocab import SIZE_FRACTIONS
from sightline.errors import UserError

__all__ = ["PAIR_MODES", "Clip", "Correspondence", "ScenePair", "render_clip", "render_pair"]

PAIR_MODES = ("transform", "scene")


@dataclass(frozen=True)
class Correspondence:
    """One keypoint of the pair's object in both images."""

    name: str
    source_xy: tuple[float, float]
    target_xy: tuple[float, float]
    visible: bool  # visible in both images


@dataclass(frozen=True, eq=False)
class ScenePair:
    """Two images that each hold an object of the same shape, with keypoint correspondences.

    mode "transform": the target is the source with every object mapped by `transform` (2x3, source
    pixels -> target pixels; same background; size labels re-read from the new radii). mode "scene":
    an unrelated scene; `transform` is None. Keypoints correspond by name (the same point of the
    unit shape), so a mirrored object keeps its keypoint names.
    """

    source: Scene
    target: Scene
    category: str  # the shape
    source_index: int
    target_index: int
    mode: str
    transform: np.ndarray | None
    correspondences: tuple[Correspondence, ...]

    def to_json(self) -> dict[str, Any]:
        """SPair-style facts (no pixels): category, keypoints in both images, boxes, transform."""
        visible = [c for c in self.correspondences if c.visible]
        return {
            "category": self.category, "mode": self.mode,
            "src_index": self.source_index, "trg_index": self.target_index,
            "kps_names": [c.name for c in visible],
            "src_kps": [[round(c.source_xy[0], 3), round(c.source_xy[1], 3)] for c in visible],
            "trg_kps": [[round(c.target_xy[0], 3), round(c.target_xy[1], 3)] for c in visible],
            "src_bndbox": list(self.source.objects[self.source_index].box or ()),
            "trg_bndbox": list(self.target.objects[self.target_index].box or ()),
            "transform": None if self.transform is None else [[float(v) for v in row] for row in self.transform],
        }


def _correspondences(source: Scene, target: Scene, i: int, j: int) -> tuple[Correspondence, ...]:
    a, b = source.objects[i], target.objects[j]
    return tuple(Correspondence(p.name, p.xy, q.xy, p.visible and q.visible)
                 for p, q in zip(a.keypoints, b.keypoints))


def render_pair(seed: int, config: WorldConfig | None = None, *, mode: str = "transform",
                affine: bool = False, flip_prob: float = 0.5, max_rotation_deg: float = 45.0,
                scale_range: tuple[float, float] = (0.75, 1.33), **overrides: Any) -> ScenePair:
    """Pair `seed`: two images of the same shape class with keypoint correspondences.

    "transform": a random similarity (rotation up to `max_rotation_deg`, log-uniform scale in
    `scale_range`, a left-right mirror with probability `flip_prob`, any translation keeping the
    pair's object inside the image), plus shear and uneven scale if `affine`. "scene": a second,
    independent scene forced to contain the same shape."""
    if mode not in PAIR_MODES:
        raise UserError(f"unknown pair mode {mode!r}: use one of {', '.join(PAIR_MODES)}")
    config = configure(config, overrides)
    rng = rng_for(seed, "pair")
    style = config.style or str(rng.choice(config.styles))
    height, width = config.size_hw
    background = make_background(rng_for(seed, "pair-background"), style, config.size_hw, config.noise_amplitude)
    specs = sample_objects(rng_for(seed, "pair-source"), config)
    source = compose_scene(specs, background, seed=seed)
    i = int(rng.integers(len(specs)))
    category = specs[i].shape
    if mode == "scene":
        other_rng = rng_for(seed, "pair-target")
        n_target = config.n_objects or 1 + int(other_rng.choice(len(config.count_probs), p=config.count_probs))
        j = int(other_rng.integers(n_target))
        target_specs = sample_objects(other_rng, config, n_objects=n_target, fixed_shapes={j: category})
        target_style = config.style or str(other_rng.choice(config.styles))
        target_bg = make_background(rng_for(seed, "pair-target-background"), target_style, config.size_hw,
                                    config.noise_amplitude)
        target = compose_scene(target_specs, target_bg, seed=seed)
        return ScenePair(source, target, category, i, j, mode, None, _correspondences(source, target, i, j))
    obj_affine = specs[i].matrix((height, width))
    centred = np.concatenate([obj_affine[:, :2], np.zeros((2, 1))], 1)
    for _ in range(100):
        linear = _random_linear(rng, affine, flip_prob, max_rotation_deg, scale_range)
        moved = compose(np.concatenate([linear, np.zeros((2, 1))], 1), centred)
        x0, y0, x1, y1 = extent(category, moved)  # the object's extent if its centre went to (0, 0)
        if x1 - x0 + 2 < width and y1 - y0 + 2 < height:
            break
    else:  # pragma: no cover - scale_range would have to exceed the image
        raise UserError(f"cannot fit the transformed {category} in a {height}x{width} image: narrow scale_range")
    new_centre = np.array([rng.uniform(1 - x0, width - 1 - x1), rng.uniform(1 - y0, height - 1 - y1)])
    old_centre = obj_affine[:, 2]
    transform = np.concatenate([linear, (new_centre - linear @ old_centre)[:, None]], 1)
    target_specs = []
    for spec in specs:
        moved = compose(transform, spec.matrix((height, width)))
        target_specs.append(dataclasses.replace(spec, size=_size_label(pose(moved)[2], (height, width)),
                                                affine=tuple(map(tuple, moved))))
    target = compose_scene(target_specs, background, seed=seed)
    return ScenePair(source, target, category, i, i, mode, transform, _correspondences(source, target, i, i))


def _random_linear(rng: np.random.Generator, affine: bool, flip_prob: float, max_rotation_deg: float,
                   scale_range: tuple[float, float]) -> np.ndarray:
    """A random 2x2 map in pixel space (y down): rotation, scale, optional mirror, optional shear."""
    angle = rng.uniform(-max_rotation_deg, max_rotation_deg)
    scale = math.exp(rng.uniform(math.log(scale_range[0]), math.log(scale_range[1])))
    a = math.radians(angle)
    # counter-clockwise on screen is clockwise in the y-down frame
    rotation = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    linear = scale * rotation
    if rng.random() < flip_prob:
        linear = linear @ np.diag([-1.0, 1.0])
    if affine:
        shear = rng.uniform(-0.2, 0.2)
        stretch = math.exp(rng.uniform(-0.2, 0.2))
        linear = linear @ np.array([[stretch, shear], [0.0, 1.0 / stretch]])
    return linear


@dataclass(frozen=True, eq=False)
class Clip:
    """A short video: one Scene per frame; object i is instance i + 1 in every frame."""

    frames: tuple[Scene, ...]
    seed: int

    @property
    def n_frames(self) -> int:
        return len(self.frames)

    @property
    def n_objects(self) -> int:
        return len(self.frames[0].objects)

    def instance_masks(self) -> np.ndarray:
        """T x H x W uint8 instance ids (0 background)."""
        return np.stack([f.instance_mask for f in self.frames])

    def to_json(self) -> dict[str, Any]:
        """Per-frame facts (no pixels, no masks)."""
        return {"seed": self.seed, "n_frames": self.n_frames, "n_objects": self.n_objects,
                "frames": [f.to_json() for f in self.frames]}


def render_clip(seed: int, config: WorldConfig | None = None, *, n_frames: int = 12,
                max_speed: float = 0.06, max_spin_deg: float = 12.0, max_growth: float = 0.04,
                **overrides: Any) -> Clip:
    """Clip `seed`: objects sampled as in a scene (all at least `min_visible` visible in frame 0)
    then moving in straight lines (bouncing off the image's edges; up to `max_speed` x the shorter
    side per frame), turning (up to `max_spin_deg` per frame) and growing or shrinking (by up to
    `max_growth` per frame, within 0.6x..1.6x). Later frames may occlude objects fully. The size
    label of each frame is the size nearest the current radius. The background does not move."""
    if not 2 <= n_frames <= 1000:
        raise UserError(f"n_frames={n_frames} is out of range: use 2..1000")
    config = configure(config, overrides)
    rng = rng_for(seed, "clip")
    height, width = config.size_hw
    side = min(height, width)
    style = config.style or str(rng.choice(config.styles))
    background = make_background(rng_for(seed, "clip-background"), style, config.size_hw, config.noise_amplitude)
    specs = sample_objects(rng_for(seed, "clip-objects"), config)
    n = len(specs)
    centres = np.array([s.centre for s in specs], dtype=float)
    base_radius = np.array([radius_px(s.size, config.size_hw) for s in specs])
    rotations = np.array([s.rotation for s in specs], dtype=float)
    headings = rng.uniform(0, 2 * np.pi, n)
    speeds = rng.uniform(0.3, 1.0, n) * max_speed * side
    velocity = np.stack([np.cos(headings), np.sin(headings)], 1) * speeds[:, None]
    spin = rng.uniform(-max_spin_deg, max_spin_deg, n)
    growth = np.exp(rng.uniform(-max_growth, max_growth, n))
    scale = np.ones(n)
    frames = []
    for _ in range(n_frames):
        radius = base_radius * scale
        frame_specs = [
            ObjectSpec(s.shape, s.colour, _size_label(radius[k], config.size_hw), tuple(centres[k]),
                       float(rotations[k]), affine=tuple(map(tuple, placement(tuple(centres[k]), radius[k],
                                                                              rotations[k]))))
            for k, s in enumerate(specs)]
        frames.append(compose_scene(frame_specs, background, seed=seed))
        # advance one frame
        rotations = rotations + spin
        new_scale = scale * growth
        flip_growth = (new_scale < 0.6) | (new_scale > 1.6)
        growth = np.where(flip_growth, 1.0 / growth, growth)
        scale = np.clip(new_scale, 0.6, 1.6)
        radius = base_radius * scale
        centres = centres + velocity
        for axis, limit in ((0, width), (1, height)):
            low, high = radius + 1, limit - radius - 1
            below, above = centres[:, axis] < low, centres[:, axis] > high
            centres[:, axis] = np.where(below, 2 * low - centres[:, axis], centres[:, axis])
            centres[:, axis] = np.where(above, 2 * high - centres[:, axis], centres[:, axis])
            centres[:, axis] = np.clip(centres[:, axis], np.minimum(low, limit / 2), np.maximum(high, limit / 2))
            velocity[:, axis] = np.where(below | above, -velocity[:, axis], velocity[:, axis])
    return Clip(tuple(frames), seed)


def _size_label(radius: float, size_hw: tuple[int, int]) -> str:
    """The size whose radius is nearest (in ratio) to `radius`."""
    fraction = 2 * radius / min(size_hw)
    return min(SIZE_FRACTIONS, key=lambda s: abs(math.log(SIZE_FRACTIONS[s] / fraction)))

"""Shape geometry: each shape in a unit frame, its named keypoints, affine placement and exact rasterisation.

Coordinates. A shape lives in a unit frame (u, v), v pointing UP, centred on its keypoint "centre"
(0, 0), with circumradius 1 (its farthest point is at distance 1). An object is placed by a 2x3
affine `A` mapping (u, v, 1) to image pixels (x, y), x to the right, y DOWN. Pixel (row r, col c)
covers the square [c, c+1) x [r, r+1); its centre is (c + 0.5, r + 0.5).

Rasterisation rule (no anti-aliasing): a pixel belongs to a shape iff its CENTRE lies inside the
shape's geometry, or the pixel holds one of the shape's keypoints (a sharp tip whose nearest pixel
centres fall outside still gets its tip pixel). The image is painted and every mask is computed from
this one rule, so a mask covers exactly the pixels painted for its object, and every keypoint lies
in a pixel of its object's unoccluded mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sightline.data.synthetic.vocab import SHAPES

__all__ = [
    "UNIT_SHAPES",
    "UnitShape",
    "affine_apply",
    "compose",
    "contains",
    "extent",
    "keypoints_xy",
    "placement",
    "pose",
    "rasterize",
]


@dataclass(frozen=True)
class UnitShape:
    """One shape in its unit frame: a polygon (None for the circle) and its named keypoints."""

    name: str
    polygon: np.ndarray | None  # (K, 2) vertices (u, v), counter-clockwise; None: the unit disc
    keypoints: dict[str, tuple[float, float]]  # name -> (u, v), "centre" first

    @property
    def keypoint_names(self) -> tuple[str, ...]:
        return tuple(self.keypoints)


def _regular(n: int, start_deg: float) -> np.ndarray:
    angles = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
    return np.stack([np.cos(angles), np.sin(angles)], 1)


def _named(prefix: str, points: np.ndarray) -> dict[str, tuple[float, float]]:
    return {f"{prefix}_{i}": (float(u), float(v)) for i, (u, v) in enumerate(points)}


def _star() -> np.ndarray:
    outer = _regular(5, 90.0)
    inner = 0.5 * _regular(5, 90.0 + 36.0)
    return np.stack([outer, inner], 1).reshape(10, 2)


def _cross() -> np.ndarray:
    s = 1.0 / math.sqrt(1.0 + 0.3**2)  # the arm-end corners (w, L) sit on the unit circle
    arm, w = s, 0.3 * s
    return np.array([(w, arm), (-w, arm), (-w, w), (-arm, w), (-arm, -w), (-w, -w), (-w, -arm),
                     (w, -arm), (w, -w), (arm, -w), (arm, w), (w, w)])


def _heart() -> np.ndarray:
    # The classic parametric heart, sampled at 64 points (t = 0: the notch, t = pi: the bottom tip).
    t = np.linspace(0.0, 2 * np.pi, 64, endpoint=False)
    u = 16 * np.sin(t) ** 3
    v = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    points = np.stack([u, v], 1)
    points -= (points.min(0) + points.max(0)) / 2  # centre of the bounding box
    points /= np.linalg.norm(points, axis=1).max()
    return points[::-1].copy()  # parametric order is clockwise in (u, v): reverse it


def _build() -> dict[str, UnitShape]:
    centre = {"centre": (0.0, 0.0)}
    square = _regular(4, 45.0)
    triangle = _regular(3, 90.0)
    hexagon = _regular(6, 0.0)
    diamond = np.array([(0.0, 1.0), (-0.6, 0.0), (0.0, -1.0), (0.6, 0.0)])
    star = _star()
    cross = _cross()
    heart = _heart()
    arm = float(cross[0, 1])
    heart_named = {
        "notch": heart[np.argmin(np.abs(heart[:, 0]) + 10 * (heart[:, 1] < 0))],
        "tip": heart[np.argmin(heart[:, 1])],
        "lobe_0": heart[np.argmax(np.where(heart[:, 0] < 0, heart[:, 1], -9))],  # left lobe's top
        "lobe_1": heart[np.argmax(np.where(heart[:, 0] > 0, heart[:, 1], -9))],  # right lobe's top
    }
    shapes = {
        "circle": UnitShape("circle", None, dict(centre)),
        "square": UnitShape("square", square, {**centre, **_named("corner", square)}),
        "triangle": UnitShape("triangle", triangle, {**centre, **_named("tip", triangle)}),
        "star": UnitShape("star", star, {**centre, **_named("tip", star[0::2])}),
        "hexagon": UnitShape("hexagon", hexagon, {**centre, **_named("corner", hexagon)}),
        # tips: top, left, bottom, right (counter-clockwise from the top)
        "diamond": UnitShape("diamond", diamond, {**centre, **_named("tip", diamond)}),
        # arm ends: top, left, bottom, right
        "cross": UnitShape("cross", cross, {**centre, **_named(
            "arm", np.array([(0.0, arm), (-arm, 0.0), (0.0, -arm), (arm, 0.0)]))}),
        "heart": UnitShape("heart", heart, {**centre, **{k: (float(p[0]), float(p[1]))
                                                         for k, p in heart_named.items()}}),
    }
    assert tuple(shapes) == SHAPES
    return shapes


UNIT_SHAPES: dict[str, UnitShape] = _build()


def placement(centre_xy: tuple[float, float], radius: float, rotation_deg: float = 0.0,
              flip: bool = False) -> np.ndarray:
    """The 2x3 affine that puts a unit shape at `centre_xy` with circumradius `radius` pixels,
    turned `rotation_deg` counter-clockwise as seen on screen, mirrored left-right first if `flip`."""
    a = math.radians(rotation_deg)
    c, s = math.cos(a), math.sin(a)
    # rotate in the v-up frame, then flip v to the y-down image frame
    linear = radius * np.array([[c, -s], [-s, -c]])
    if flip:
        linear = linear @ np.diag([-1.0, 1.0])
    return np.concatenate([linear, np.array(centre_xy, dtype=float)[:, None]], 1)


def pose(affine: np.ndarray) -> tuple[float, bool, float]:
    """(rotation_deg in (-180, 180], flip, radius) of a placement; exact for `placement` outputs and
    their similarity transforms, the rotation of the first row for a sheared affine."""
    linear = np.asarray(affine, dtype=float)[:, :2]
    det = float(linear[0, 0] * linear[1, 1] - linear[0, 1] * linear[1, 0])
    flip = det > 0  # `placement` without a mirror has det < 0 (y points down)
    if flip:
        linear = linear @ np.diag([-1.0, 1.0])
    rotation = math.degrees(math.atan2(-linear[0, 1], linear[0, 0]))
    radius = math.sqrt(abs(det))
    return (rotation + 0.0 if rotation > -180.0 else 180.0), flip, radius  # + 0.0: no -0.0


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 2x3 affine `outer o inner` (apply inner first)."""
    out = outer[:, :2] @ inner
    out[:, 2] += outer[:, 2]
    return out


def affine_apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map (N, 2) points through a 2x3 affine."""
    points = np.asarray(points, dtype=float).reshape(-1, 2)
    return points @ affine[:, :2].T + affine[:, 2]


def extent(shape: str, affine: np.ndarray) -> tuple[float, float, float, float]:
    """Tight continuous box (x0, y0, x1, y1) of the placed shape's geometry."""
    unit = UNIT_SHAPES[shape]
    if unit.polygon is None:
        half = np.sqrt((affine[:, :2] ** 2).sum(1))  # an ellipse's half-extents per axis
        (cx, cy) = affine[:, 2]
        return cx - half[0], cy - half[1], cx + half[0], cy + half[1]
    points = affine_apply(affine, unit.polygon)
    (x0, y0), (x1, y1) = points.min(0), points.max(0)
    return float(x0), float(y0), float(x1), float(y1)


def contains(shape: str, affine: np.ndarray, points_xy: np.ndarray) -> np.ndarray:
    """Whether each (x, y) pixel-space point lies inside the placed shape (bool per point)."""
    points = np.asarray(points_xy, dtype=float).reshape(-1, 2)
    unit = UNIT_SHAPES[shape]
    if unit.polygon is None:
        # closed-form 2x2 inverse (not LAPACK), so the pixels do not depend on the BLAS build
        (a, b), (c, d) = affine[:, :2]
        dx, dy = points[:, 0] - affine[0, 2], points[:, 1] - affine[1, 2]
        det = a * d - b * c
        u, v = (d * dx - b * dy) / det, (a * dy - c * dx) / det
        return u * u + v * v <= 1.0
    return _inside_polygon(affine_apply(affine, unit.polygon), points)


def _inside_polygon(vertices: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Even-odd crossing test of many points against one simple polygon, vectorised over edges."""
    x1, y1 = vertices[:, 0:1], vertices[:, 1:2]
    rolled = np.roll(vertices, -1, axis=0)
    x2, y2 = rolled[:, 0:1], rolled[:, 1:2]
    px, py = points[None, :, 0], points[None, :, 1]
    straddles = (y1 > py) != (y2 > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
    crossings = (straddles & (px < x_cross)).sum(0)
    return crossings % 2 == 1


def keypoints_xy(shape: str, affine: np.ndarray) -> np.ndarray:
    """(K, 2) pixel positions of the shape's keypoints, in UnitShape.keypoints order."""
    unit = UNIT_SHAPES[shape]
    return affine_apply(affine, np.array(list(unit.keypoints.values())))


def rasterize(shape: str, affine: np.ndarray, height: int, width: int) -> tuple[np.ndarray, int]:
    """(HxW bool mask of the shape's pixels, clipped to the image; number of its pixels on an
    unbounded canvas, i.e. before clipping). A pixel is the shape's iff its centre lies inside the
    geometry or it holds one of the shape's keypoints (so thin tips keep their tip pixel)."""
    x0, y0, x1, y1 = extent(shape, affine)
    # every pixel whose centre can be inside, plus one pixel all round for the keypoints' pixels
    c0, c1 = math.floor(x0) - 1, math.floor(x1) + 1
    r0, r1 = math.floor(y0) - 1, math.floor(y1) + 1
    cols = np.arange(c0, c1 + 1)
    rows = np.arange(r0, r1 + 1)
    grid = np.stack(np.meshgrid(cols + 0.5, rows + 0.5), -1).reshape(-1, 2)
    inside = contains(shape, affine, grid).reshape(len(rows), len(cols))
    held = np.floor(keypoints_xy(shape, affine)).astype(np.int64)
    inside[held[:, 1] - r0, held[:, 0] - c0] = True
    full_area = int(inside.sum())
    mask = np.zeros((height, width), dtype=bool)
    rs, re_ = max(r0, 0), min(r1 + 1, height)
    cs, ce = max(c0, 0), min(c1 + 1, width)
    if rs < re_ and cs < ce:
        mask[rs:re_, cs:ce] = inside[rs - r0:re_ - r0, cs - c0:ce - c0]
    return mask, full_area

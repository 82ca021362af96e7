"""Qualitative examples of a perception run: for the first few units of a task, small thumbnails of the
images with what one fixed representation and the token-grid oracle predicted, for the page's figures.

Kept in memory only for those units (uint8 thumbnails, downsized masks, keypoints), drawn as PNGs by
`sightline.report.perception` and never written as data. The runner calls the hooks as it scores;
every hook returns at once for a unit or a (kind, rep) that is not kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sightline.perception.tasks import IGNORE
from sightline.report.perception import resize_mask, thumbnail

ORACLE = ("oracle", "tokens")


def default_example_rep(rep_names: Sequence[str], n_layers: int) -> str | None:
    """The values of all heads at the read language-model layer nearest the middle (n_layers // 2); else the
    first rep read."""
    layers = [(int(n.split(".")[1]), n) for n in rep_names if n.startswith("values.") and n.count(".") == 1]
    if layers:
        return min(layers, key=lambda ln: (abs(ln[0] - n_layers // 2), ln[0]))[1]
    return rep_names[0] if rep_names else None


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    valid = gt != IGNORE
    fg = (gt == 1) & valid
    p = np.asarray(pred, bool) & valid
    union = np.count_nonzero(p | fg)
    return 1.0 if union == 0 else np.count_nonzero(p & fg) / union


class ExampleCollector:
    """What the qualitative figure of one task draws, for units 0..n-1: the images, ground truth and the
    predictions of `rep` (kind model) and the token-grid oracle, downsized to `max_side` pixels."""

    def __init__(self, task: str, rep: str | None, n: int, max_side: int = 160, max_images: int = 3,
                 max_frames: int = 4):
        self.task, self.rep, self.n = task, rep, max(0, int(n))
        self.max_side, self.max_images, self.max_frames = max_side, max_images, max_frames
        self.units: dict[int, dict[str, Any]] = {}

    def wants(self, unit: int) -> bool:
        """Whether unit `unit` is one of those kept."""
        return unit < self.n

    def _name(self, kind: str, rep: str) -> str | None:
        if (kind, rep) == ORACLE:
            return "oracle"
        return rep if kind == "model" and rep == self.rep else None

    # ---------------------------------------------------------------------- segmentation
    def images(self, unit: int, images: Sequence[Any] | Callable[[], Sequence[Any]], caption: str = "") -> None:
        """The images (PIL, or a callable giving them, called only for a kept unit) a unit's masks are scored on."""
        if not self.wants(unit):
            return
        ims = list(images() if callable(images) else images)[: self.max_images]
        self.units[unit] = {"caption": caption, "images": [thumbnail(im, self.max_side) for im in ims], "gt": [],
                            "preds": {}, "iou": {}}

    def seg(self, kind: str, rep: str, unit: int, pred: np.ndarray, gt: np.ndarray) -> None:
        """One binary prediction of image k of the unit (k = how many this (kind, rep) gave before)."""
        name = self._name(kind, rep)
        u = self.units.get(unit)
        if name is None or u is None or "images" not in u:
            return
        preds = u["preds"].setdefault(name, [])
        k = len(preds)
        if k >= len(u["images"]):
            return
        hw = u["images"][k].shape[:2]
        preds.append(resize_mask(pred, hw).astype(bool))
        u["iou"].setdefault(name, []).append(_iou(pred, gt))
        if len(u["gt"]) <= k:
            u["gt"].append(resize_mask(gt, hw))

    # ---------------------------------------------------------------------- correspondence
    def pair(self, unit: int, source: Any, target: Any, source_xy: np.ndarray, target_xy: np.ndarray,
             threshold: float, caption: str = "") -> None:
        """A pair's images, keypoints (original pixels) and PCK threshold (pixels)."""
        if not self.wants(unit):
            return
        s, t = thumbnail(source, self.max_side), thumbnail(target, self.max_side)
        ss, ts = s.shape[1] / source.width, t.shape[1] / target.width
        self.units[unit] = {"caption": caption, "source": s, "target": t, "scale": ts, "threshold": float(threshold),
                            "target_xy_full": np.asarray(target_xy, np.float64).reshape(-1, 2),
                            "source_xy": np.asarray(source_xy, np.float64).reshape(-1, 2) * ss,
                            "target_xy": np.asarray(target_xy, np.float64).reshape(-1, 2) * ts,
                            "preds": {}, "correct": {}}

    def points(self, kind: str, rep: str, unit: int, pred_xy: np.ndarray) -> None:
        """Predicted target points (original pixels; NaN: none) of the pair's keypoints."""
        name = self._name(kind, rep)
        u = self.units.get(unit)
        if name is None or u is None or "source" not in u:
            return
        pred = np.asarray(pred_xy, np.float64).reshape(-1, 2)
        with np.errstate(invalid="ignore"):
            d = np.sqrt(((pred - u["target_xy_full"]) ** 2).sum(1))
        u["correct"][name] = list(np.nan_to_num(d, nan=np.inf) <= u["threshold"])
        u["preds"][name] = pred * u["scale"]

    # ---------------------------------------------------------------------- clips
    def frames_shown(self, n_frames: int) -> list[int]:
        """Frame indices the figure shows: 0, then up to max_frames spread over 1..n_frames-1."""
        rest = np.unique(np.linspace(1, n_frames - 1, min(self.max_frames, n_frames - 1)).round().astype(int))
        return [0, *rest.tolist()]

    def clip(self, unit: int, load_frame: Callable[[int], Any], gts: Sequence[np.ndarray], caption: str = "") -> None:
        """A clip: `load_frame(t)` gives frame t (called for the shown frames only); `gts` its label maps, frame 0's
        being the labels given."""
        if not self.wants(unit):
            return
        ts = self.frames_shown(len(gts))
        ims = [thumbnail(load_frame(t), self.max_side) for t in ts]
        hw = ims[0].shape[:2]
        self.units[unit] = {"caption": caption, "frames": {"t": ts, "images": ims},
                            "first_labels": resize_mask(gts[0], hw),
                            "gt": [resize_mask(gts[t], hw) for t in ts[1:]], "preds": {}}

    def labels(self, kind: str, rep: str, unit: int, preds: Sequence[np.ndarray]) -> None:
        """Propagated label maps of frames 1..T-1."""
        name = self._name(kind, rep)
        u = self.units.get(unit)
        if name is None or u is None or "frames" not in u:
            return
        hw = u["frames"]["images"][0].shape[:2]
        u["preds"][name] = [resize_mask(preds[t - 1], hw) for t in u["frames"]["t"][1:]]

    def to_dict(self) -> dict[str, Any]:
        """{"task", "rep", "units": [...]} as `sightline.report.perception.plot_examples` reads it."""
        units = []
        for k in sorted(self.units):
            u = {key: v for key, v in self.units[k].items() if key not in ("target_xy_full", "scale", "threshold")}
            units.append(u)
        return {"task": self.task, "rep": self.rep, "units": units}

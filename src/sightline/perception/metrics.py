"""The perception benchmarks' scores, as their published evaluation code computes them (numpy only).

- `SegScores`: binary segmentation. mIoU as HSNet / PANet score Pascal-5i (per category, foreground
  IoU from intersection and union accumulated over all its images, then the mean over categories),
  FB-IoU, and the co-segmentation P (pixel accuracy) and J (mean per-image foreground IoU) of
  Rubinstein et al. 2013.
- `pointing_hit`: pointing accuracy (the best-scoring pixel lies on the object).
- `pck`, `bbox_threshold`, `image_threshold`, `PCKScores`: SPair-71k keypoint transfer.
- `db_eval_iou`, `db_eval_boundary`, `seg2bmap`, `JFScores`: DAVIS-2017 semi-supervised J and F,
  equal to davisvideochallenge/davis2017-evaluation (davis2017/metrics.py, evaluation.py) without
  cv2 or scikit-image: the boundary tolerance disk and its dilation are written in numpy.

Masks follow `sightline.perception.tasks`: uint8, 1 = foreground, 0 = background, `IGNORE` (255)
never counts (except in DAVIS semi-supervised scoring, where the reference code counts void pixels
as background: see `JFScores`).
"""

from __future__ import annotations

import functools

import warnings
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from sightline.errors import UserError
from sightline.perception.tasks import IGNORE


def _check_pair(pred: np.ndarray, gt: np.ndarray, what: str = "prediction") -> None:
    if pred.shape != gt.shape:
        raise UserError(f"{what} shape {tuple(pred.shape)} differs from the ground truth's "
                        f"{tuple(gt.shape)}: resize the {what} to the mask's pixels first")


def _ratio(num: float, den: float, empty: float = 1.0) -> float:
    return float(num) / float(den) if den > 0 else empty


class SegScores:
    """Streaming scores of binary segmentations: `add` one image at a time, read any score.

    `miou` is the few-shot segmentation convention (HSNet, PANet on Pascal-5i): per category the
    foreground IoU = sum of intersections / sum of unions over the category's images, then the mean
    over categories. `fb_iou` is the mean of the foreground and background IoU, each accumulated over
    all images. `precision` and `jaccard` are co-segmentation's P and J (Rubinstein et al. 2013):
    pixel accuracy over all non-ignored pixels, and the mean over images of per-image foreground IoU
    (an image whose prediction and mask are both empty scores 1).
    """

    def __init__(self) -> None:
        self.n = 0
        self._cat = defaultdict(lambda: np.zeros(2, dtype=np.int64))  # category -> [inter, union]
        self._fg = np.zeros(2, dtype=np.int64)
        self._bg = np.zeros(2, dtype=np.int64)
        self._correct = 0
        self._valid = 0
        self._image_ious: list[float] = []

    def add(self, pred: np.ndarray, gt: np.ndarray, category: str = "") -> float:
        """Score one image: pred [H, W] bool, gt [H, W] uint8 (1 fg, 0 bg, 255 ignore); returns its fg IoU."""
        pred = np.asarray(pred).astype(bool)
        gt = np.asarray(gt)
        _check_pair(pred, gt)
        valid = gt != IGNORE
        fg = (gt == 1) & valid
        p = pred & valid
        inter = int(np.count_nonzero(p & fg))
        union = int(np.count_nonzero(p | fg))
        bg_inter = int(np.count_nonzero(~pred & valid & ~fg))
        bg_union = int(np.count_nonzero(valid & ~(p & fg)))  # (not pred or not fg) within valid
        self._cat[category] += (inter, union)
        self._fg += (inter, union)
        self._bg += (bg_inter, bg_union)
        self._correct += inter + bg_inter
        self._valid += int(np.count_nonzero(valid))
        iou = _ratio(inter, union)
        self._image_ious.append(iou)
        self.n += 1
        return iou

    def per_category(self) -> dict[str, float]:
        """Foreground IoU per category, from intersection and union accumulated over its images."""
        return {c: _ratio(iu[0], iu[1]) for c, iu in sorted(self._cat.items())}

    def miou(self) -> float:
        """Mean over categories of the accumulated foreground IoU (Pascal-5i mIoU); NaN before any image."""
        per = self.per_category()
        return float(np.mean(list(per.values()))) if per else float("nan")

    def fb_iou(self) -> float:
        """Mean of the foreground and background IoU, each accumulated over all images."""
        if not self.n:
            return float("nan")
        return 0.5 * (_ratio(*self._fg) + _ratio(*self._bg))

    def mean_image_iou(self) -> float:
        """Mean over images of the per-image foreground IoU (empty union counts as 1)."""
        return float(np.mean(self._image_ious)) if self._image_ious else float("nan")

    def precision(self) -> float:
        """Pixel accuracy over non-ignored pixels: co-segmentation's P (Rubinstein et al. 2013)."""
        return _ratio(self._correct, self._valid, float("nan"))

    def jaccard(self) -> float:
        """Co-segmentation's J: the mean over images of per-image foreground IoU."""
        return self.mean_image_iou()

    def to_json(self) -> dict:
        """All scores and the counts behind them, JSON-ready."""
        return {
            "miou": self.miou(), "fb_iou": self.fb_iou(), "mean_image_iou": self.mean_image_iou(),
            "precision": self.precision(), "jaccard": self.jaccard(),
            "per_category": self.per_category(), "n_images": self.n,
            "n_categories": len(self._cat),
            "fg_intersection": int(self._fg[0]), "fg_union": int(self._fg[1]),
            "bg_intersection": int(self._bg[0]), "bg_union": int(self._bg[1]),
            "n_pixels": int(self._valid),
        }


def pointing_hit(scores: np.ndarray, gt: np.ndarray) -> bool:
    """Pointing accuracy: does the highest-scoring pixel (NaN skipped, first on ties) lie on gt's
    foreground? An all-NaN map misses."""
    scores = np.asarray(scores, dtype=np.float64)
    gt = np.asarray(gt)
    _check_pair(scores, gt, "score map")
    if np.isnan(scores).all():
        return False
    idx = np.unravel_index(int(np.nanargmax(scores)), scores.shape)
    return bool(gt[idx] == 1)


# ---- semantic correspondence (SPair-71k) --------------------------------------------------------


def pck(pred_xy: np.ndarray, gt_xy: np.ndarray, threshold) -> np.ndarray:
    """Per keypoint, is the predicted point within `threshold` pixels (Euclidean, <=) of the truth?

    pred_xy, gt_xy [N, 2] (x, y); threshold a number or [N]. Returns [N] bool."""
    pred_xy = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    gt_xy = np.asarray(gt_xy, dtype=np.float64).reshape(-1, 2)
    if pred_xy.shape != gt_xy.shape:
        raise UserError(f"pck: {len(pred_xy)} predicted points for {len(gt_xy)} true ones; "
                        "pass one prediction per keypoint")
    dist = np.sqrt(((pred_xy - gt_xy) ** 2).sum(1))
    return dist <= np.asarray(threshold, dtype=np.float64)


def bbox_threshold(bbox: Sequence[float], alpha: float = 0.1) -> float:
    """PCK@bbox tolerance: alpha * max(w, h) of the TARGET object's box (x0, y0, x1, y1).

    This is SPair-71k's convention as the standard correspondence code computes it
    (juhongm999/hpf and its successors, `get_pckthres` with thres='bbox':
    max(bbox[2] - bbox[0], bbox[3] - bbox[1]) of the target box, a hit when distance <= alpha * it)."""
    x0, y0, x1, y1 = (float(v) for v in bbox)
    return alpha * max(x1 - x0, y1 - y0)


def image_threshold(size_hw: Sequence[int], alpha: float = 0.1) -> float:
    """PCK@img tolerance: alpha * max(H, W) of the TARGET image (hpf's thres='img')."""
    return alpha * float(max(size_hw[0], size_hw[1]))


class PCKScores:
    """Streaming PCK: `add` one pair's per-keypoint hits at both tolerances.

    The overall PCK is the mean over all keypoints of all pairs (SPair-71k's usual "per point"
    figure); per category, the mean over that category's keypoints. The mean over pairs of per-pair
    PCK is reported too (`*_per_pair`), as some papers give that instead."""

    def __init__(self) -> None:
        self.n_pairs = 0
        self._hits = defaultdict(lambda: np.zeros(3, dtype=np.int64))  # cat -> [bbox, img, n]
        self._pair_bbox: list[float] = []
        self._pair_img: list[float] = []

    def add(self, hits_bbox: np.ndarray, hits_image: np.ndarray, category: str = "") -> None:
        """Record one pair: [N] bool hits at the bbox and at the image tolerance."""
        hb = np.asarray(hits_bbox, dtype=bool).reshape(-1)
        hi = np.asarray(hits_image, dtype=bool).reshape(-1)
        if hb.shape != hi.shape:
            raise UserError(f"PCKScores.add: {hb.size} bbox hits but {hi.size} image hits; "
                            "pass both for the same keypoints")
        self._hits[category] += (int(hb.sum()), int(hi.sum()), hb.size)
        if hb.size:
            self._pair_bbox.append(float(hb.mean()))
            self._pair_img.append(float(hi.mean()))
        self.n_pairs += 1

    def to_json(self) -> dict:
        """pck_bbox, pck_img (mean over keypoints), per category, per-pair means and counts."""
        tot = sum(self._hits.values(), np.zeros(3, dtype=np.int64))
        nan = float("nan")
        return {
            "pck_bbox": _ratio(tot[0], tot[2], nan), "pck_img": _ratio(tot[1], tot[2], nan),
            "pck_bbox_per_pair": float(np.mean(self._pair_bbox)) if self._pair_bbox else nan,
            "pck_img_per_pair": float(np.mean(self._pair_img)) if self._pair_img else nan,
            "per_category": {c: {"pck_bbox": _ratio(h[0], h[2], nan), "pck_img": _ratio(h[1], h[2], nan),
                                 "n_keypoints": int(h[2])} for c, h in sorted(self._hits.items())},
            "n_keypoints": int(tot[2]), "n_pairs": self.n_pairs,
        }


# ---- DAVIS-2017 (davis2017-evaluation, davis2017/metrics.py) --------------------------------------


def db_eval_iou(annotation: np.ndarray, segmentation: np.ndarray, void_pixels: np.ndarray | None = None):
    """DAVIS region similarity J: IoU of two binary maps outside void pixels; an empty union is 1.

    Accepts [H, W] (returns a float) or [T, H, W] (returns [T]), as the reference does."""
    annotation = np.asarray(annotation)
    segmentation = np.asarray(segmentation)
    if annotation.shape != segmentation.shape:
        raise UserError(f"Annotation({annotation.shape}) and segmentation:{segmentation.shape} "
                        "dimensions do not match: resize the prediction to the annotation")
    annotation = annotation.astype(bool)
    segmentation = segmentation.astype(bool)
    keep = np.ones_like(segmentation) if void_pixels is None else ~np.asarray(void_pixels).astype(bool)
    inters = np.sum((segmentation & annotation) & keep, axis=(-2, -1))
    union = np.sum((segmentation | annotation) & keep, axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        j = inters / union
    if np.ndim(j) == 0:
        return 1.0 if np.isclose(union, 0) else float(j)
    j[np.isclose(union, 0)] = 1
    return j


def seg2bmap(seg: np.ndarray, width: int | None = None, height: int | None = None) -> np.ndarray:
    """1-pixel-wide boundary map of a segmentation (David Martin's seg2bmap, as DAVIS uses it):
    a pixel is on the boundary when it differs from its east, south or south-east neighbour."""
    seg = np.asarray(seg).astype(bool)
    width = seg.shape[1] if width is None else width
    height = seg.shape[0] if height is None else height
    h, w = seg.shape[:2]
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    if w == width and h == height:
        return b
    # the reference's resampling loop, vectorised (its index formula, h where one expects w, kept)
    bmap = np.zeros((height, width))
    ys, xs = np.nonzero(b)
    bmap[1 + np.floor((ys - 1) + height / h).astype(int), 1 + np.floor((xs - 1) + width / h).astype(int)] = 1
    return bmap


def disk(radius: float) -> np.ndarray:
    """scikit-image's `morphology.disk`: the uint8 square of side 2r+1 with 1 where x^2 + y^2 <= r^2."""
    return _disk(float(radius)).copy()


@functools.lru_cache(maxsize=16)
def _disk(radius: float) -> np.ndarray:
    grid = np.arange(-radius, radius + 1)
    x, y = np.meshgrid(grid, grid)
    return ((x ** 2 + y ** 2) <= radius ** 2).astype(np.uint8)


def binary_dilate(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """cv2.dilate of a binary map with a centred, symmetric footprint: a max filter, outside = 0."""
    mask = np.asarray(mask).astype(bool)
    fh, fw = footprint.shape
    ry, rx = fh // 2, fw // 2
    h, w = mask.shape
    padded = np.zeros((h + 2 * ry, w + 2 * rx), dtype=bool)
    padded[ry:ry + h, rx:rx + w] = mask
    out = np.zeros((h, w), dtype=bool)
    for dy, dx in zip(*np.nonzero(footprint)):
        out |= padded[dy:dy + h, dx:dx + w]
    return out.astype(np.uint8)


def f_measure(foreground_mask: np.ndarray, gt_mask: np.ndarray, void_pixels: np.ndarray | None = None,
              bound_th: float = 0.008) -> float:
    """DAVIS boundary F of one frame: precision and recall of boundary pixels matched within
    `bound_th` (a fraction of the image diagonal when < 1, else pixels), as davis2017's f_measure."""
    foreground_mask = np.asarray(foreground_mask)
    gt_mask = np.asarray(gt_mask)
    void = np.zeros(foreground_mask.shape, bool) if void_pixels is None else np.asarray(void_pixels).astype(bool)
    bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(foreground_mask.shape))
    fg_boundary = seg2bmap(foreground_mask * np.logical_not(void))
    gt_boundary = seg2bmap(gt_mask * np.logical_not(void))
    footprint = disk(bound_pix)
    fg_dil = binary_dilate(fg_boundary, footprint)
    gt_dil = binary_dilate(gt_boundary, footprint)
    gt_match = gt_boundary * fg_dil
    fg_match = fg_boundary * gt_dil
    n_fg = np.sum(fg_boundary)
    n_gt = np.sum(gt_boundary)
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = np.sum(fg_match) / float(n_fg)
        recall = np.sum(gt_match) / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def _bmaps(seg: np.ndarray) -> np.ndarray:
    """`seg2bmap` of each frame of [T, H, W] (same size out)."""
    seg = np.asarray(seg).astype(bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :, :-1] = seg[:, :, 1:]
    s[:, :-1, :] = seg[:, 1:, :]
    se[:, :-1, :-1] = seg[:, 1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[:, -1, :] = seg[:, -1, :] ^ e[:, -1, :]
    b[:, :, -1] = seg[:, :, -1] ^ s[:, :, -1]
    b[:, -1, -1] = 0
    return b


def _dilates(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """`binary_dilate` of each frame of [T, H, W] (bool out)."""
    fh, fw = footprint.shape
    ry, rx = fh // 2, fw // 2
    t, h, w = mask.shape
    padded = np.zeros((t, h + 2 * ry, w + 2 * rx), dtype=bool)
    padded[:, ry:ry + h, rx:rx + w] = mask
    out = np.zeros((t, h, w), dtype=bool)
    for dy, dx in zip(*np.nonzero(footprint)):
        out |= padded[:, dy:dy + h, dx:dx + w]
    return out


def _bound_pix(shape_hw, bound_th: float) -> float:
    return bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(shape_hw))


def _boundaries(masks: np.ndarray, bound_th: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(masks, boundary maps, dilated boundary maps) of binary frames [T, H, W], as `f_measure` makes them."""
    b = _bmaps(masks)
    return masks, b, _dilates(b, _disk(_bound_pix(masks.shape[1:], bound_th)))


def _f_measure_frames(fg: np.ndarray, gt_boundary: np.ndarray, gt_dil: np.ndarray, bound_th: float) -> np.ndarray:
    """`f_measure` (no void pixels) of each frame of a prediction [T, H, W] against the annotation's boundary maps
    (`_boundaries`) -> [T]."""
    fg_b, = _boundaries(fg, bound_th)[1:2]
    fg_dil = _dilates(fg_b, _disk(_bound_pix(fg.shape[1:], bound_th)))
    n_fg = fg_b.sum((1, 2)).astype(np.float64)
    n_gt = gt_boundary.sum((1, 2)).astype(np.float64)
    fg_match = (fg_b & gt_dil).sum((1, 2))
    gt_match = (gt_boundary & fg_dil).sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(n_fg > 0, fg_match / np.maximum(n_fg, 1), 1.0)
        recall = np.where(n_gt > 0, gt_match / np.maximum(n_gt, 1), 1.0)
        precision = np.where((n_fg > 0) & (n_gt == 0), 0.0, precision)
        recall = np.where((n_fg == 0) & (n_gt > 0), 0.0, recall)
        f = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    return f


def db_eval_boundary(annotation: np.ndarray, segmentation: np.ndarray, void_pixels: np.ndarray | None = None,
                     bound_th: float = 0.008):
    """DAVIS contour accuracy F for [H, W] (a float) or [T, H, W] (an array [T]) binary maps."""
    annotation = np.asarray(annotation)
    segmentation = np.asarray(segmentation)
    if annotation.shape != segmentation.shape:
        raise UserError(f"Annotation({annotation.shape}) and segmentation:{segmentation.shape} "
                        "dimensions do not match: resize the prediction to the annotation")
    if void_pixels is not None and np.shape(void_pixels) != annotation.shape:
        raise UserError(f"void pixels {np.shape(void_pixels)} do not match the annotation {annotation.shape}")
    if annotation.ndim == 3:
        return np.array([f_measure(segmentation[t], annotation[t],
                                   None if void_pixels is None else void_pixels[t], bound_th)
                         for t in range(annotation.shape[0])])
    if annotation.ndim == 2:
        return f_measure(segmentation, annotation, void_pixels, bound_th)
    raise UserError(f"db_eval_boundary does not support tensors with {annotation.ndim} dimensions")


def db_statistics(per_frame_values: np.ndarray) -> tuple[float, float, float]:
    """DAVIS mean, recall (fraction > 0.5) and decay (first quarter minus last quarter) of a
    per-frame series (davis2017/utils.py; its bin indices as int, not uint8, so >255 frames work)."""
    v = np.asarray(per_frame_values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(np.nanmean(v))
    o = float(np.nanmean(v > 0.5))
    ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(np.int64)
    bins = [v[ids[i]:ids[i + 1] + 1] for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # an all-NaN bin, as the reference
        d = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return m, o, d


class JFScores:
    """DAVIS-2017 semi-supervised J and F, aggregated as davis2017-evaluation does.

    Per sequence (evaluation.py, `evaluate` + `_evaluate_semisupervised`): the objects are
    1..n_objects (the reference takes n_objects as the first frame's largest label); the FIRST and
    the LAST frame are not scored; void pixels (255) are set to background in the ground truth and
    NOT excluded (the reference passes void_pixels=None for semi-supervised); a predicted label above
    n_objects is an error; a missing object scores as an empty mask. Per object, J and F of each
    scored frame; the object's J-Mean is the mean over its frames. J-Mean and F-Mean are means over
    ALL objects of all sequences; J&F-Mean = (J-Mean + F-Mean) / 2. Recall and decay are reported too.
    """

    def __init__(self, bound_th: float = 0.008) -> None:
        self.bound_th = bound_th
        self._objects: dict[str, dict] = {}  # "seq_k" -> stats
        self._gt_cache: tuple | None = None  # (the last gt_labels list, object -> its boundary maps)
        self._sequences: dict[str, list[str]] = {}

    def add(self, sequence: str, pred_labels: Sequence[np.ndarray], gt_labels: Sequence[np.ndarray],
            n_objects: int) -> dict:
        """Score one clip. pred_labels: label maps [H, W] of frames 1..T-1 (the frames after the
        given first one); gt_labels: the same frames, or all T frames (the first is then dropped).
        Frames 1..T-2 are scored (the reference drops the last frame too). Returns the sequence's
        per-object J and F means."""
        if len(gt_labels) == len(pred_labels) + 1:
            gt_labels = gt_labels[1:]
        if len(gt_labels) != len(pred_labels):
            raise UserError(f"sequence {sequence}: {len(pred_labels)} predicted frames for "
                            f"{len(gt_labels)} annotated ones; pass frames 1..T-1 of both")
        if sequence in self._sequences:
            raise UserError(f"sequence {sequence} was added twice; give each clip a unique name")
        n_scored = len(pred_labels) - 1  # frames 1..T-2 of the clip
        gt = np.stack([np.asarray(g) for g in gt_labels[:n_scored]]) if n_scored else None
        pr = np.stack([np.asarray(p) for p in pred_labels[:n_scored]]) if n_scored else None
        if n_scored:
            if pr.shape != gt.shape:
                raise UserError(f"sequence {sequence}: prediction {pr.shape[1:]} and annotation "
                                f"{gt.shape[1:]} differ; resize the prediction to the annotation")
            if int(pr.max(initial=0)) > n_objects:
                raise UserError(f"sequence {sequence}: a predicted label exceeds the "
                                f"{n_objects} objects of the first frame")
        cache = self._gt_cache if self._gt_cache is not None and self._gt_cache[0] is gt_labels else None
        if cache is None and n_scored:  # the annotation's boundaries, reused while the same frames come again
            cache = (gt_labels, {})
            self._gt_cache = cache
        out = {}
        names = []
        for k in range(1, int(n_objects) + 1):
            if n_scored:
                if k not in cache[1]:
                    cache[1][k] = _boundaries(gt == k, self.bound_th)  # 255 (void) -> background, never == k
                gt_k, gt_b, gt_dil = cache[1][k]
                pr_k = pr == k
                js = db_eval_iou(gt_k, pr_k)
                fs = _f_measure_frames(pr_k, gt_b, gt_dil, self.bound_th)
            else:
                js = fs = np.zeros(0)
            jm, jr, jd = db_statistics(np.asarray(js))
            fm, fr, fd = db_statistics(np.asarray(fs))
            name = f"{sequence}_{k}"
            self._objects[name] = {"J": jm, "J_recall": jr, "J_decay": jd,
                                   "F": fm, "F_recall": fr, "F_decay": fd, "n_frames": len(js)}
            names.append(name)
            out[name] = {"J": jm, "F": fm}
        self._sequences[sequence] = names
        return out

    def to_json(self) -> dict:
        """J-Mean, F-Mean, J&F-Mean (+ recall, decay) over all objects; per object and per sequence."""
        objs = list(self._objects.values())

        def mean(key: str, rows=objs) -> float:
            return float(np.mean([r[key] for r in rows])) if rows else float("nan")

        per_seq = {}
        for seq, names in self._sequences.items():
            rows = [self._objects[n] for n in names]
            j, f = mean("J", rows), mean("F", rows)
            per_seq[seq] = {"J-Mean": j, "F-Mean": f, "J&F-Mean": (j + f) / 2, "n_objects": len(rows)}
        j, f = mean("J"), mean("F")
        return {
            "J&F-Mean": (j + f) / 2, "J-Mean": j, "J-Recall": mean("J_recall"), "J-Decay": mean("J_decay"),
            "F-Mean": f, "F-Recall": mean("F_recall"), "F-Decay": mean("F_decay"),
            "per_object": {n: {"J-Mean": r["J"], "F-Mean": r["F"]} for n, r in self._objects.items()},
            "per_sequence": per_seq, "n_objects": len(objs), "n_sequences": len(self._sequences),
        }


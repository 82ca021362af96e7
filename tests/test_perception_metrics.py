"""Perception metrics against brute force, the PCK formula and a transcription of the DAVIS-2017
evaluation code (davisvideochallenge/davis2017-evaluation, davis2017/metrics.py + utils.py), with
scipy.ndimage's binary dilation standing in for cv2.dilate and scikit-image's disk written out."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from sightline.errors import UserError
from sightline.perception.metrics import (
    JFScores,
    PCKScores,
    SegScores,
    bbox_threshold,
    db_eval_boundary,
    db_eval_iou,
    db_statistics,
    image_threshold,
    pck,
    pointing_hit,
    seg2bmap,
)

# ---- the reference, transcribed (cv2.dilate -> scipy binary_dilation, skimage disk -> formula) ----


def ref_disk(radius):
    L = np.arange(-radius, radius + 1)
    X, Y = np.meshgrid(L, L)
    return np.array((X ** 2 + Y ** 2) <= radius ** 2, dtype=np.uint8)


def ref_dilate(img, kernel):
    return ndimage.binary_dilation(img.astype(bool), structure=kernel.astype(bool)).astype(np.uint8)


def ref_db_eval_iou(annotation, segmentation, void_pixels=None):
    annotation = annotation.astype(bool)
    segmentation = segmentation.astype(bool)
    if void_pixels is not None:
        void_pixels = void_pixels.astype(bool)
    else:
        void_pixels = np.zeros_like(segmentation)
    inters = np.sum((segmentation & annotation) & np.logical_not(void_pixels), axis=(-2, -1))
    union = np.sum((segmentation | annotation) & np.logical_not(void_pixels), axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        j = inters / union
    if j.ndim == 0:
        j = 1 if np.isclose(union, 0) else j
    else:
        j[np.isclose(union, 0)] = 1
    return j


def ref_seg2bmap(seg, width=None, height=None):
    seg = seg.astype(bool)
    seg[seg > 0] = 1
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
        bmap = b
    else:
        bmap = np.zeros((height, width))
        for x in range(w):
            for y in range(h):
                if b[y, x]:
                    j = 1 + math.floor((y - 1) + height / h)
                    i = 1 + math.floor((x - 1) + width / h)
                    bmap[j, i] = 1
    return bmap


def ref_f_measure(foreground_mask, gt_mask, void_pixels=None, bound_th=0.008):
    if void_pixels is not None:
        void_pixels = void_pixels.astype(bool)
    else:
        void_pixels = np.zeros_like(foreground_mask).astype(bool)
    bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(foreground_mask.shape))
    fg_boundary = ref_seg2bmap(foreground_mask * np.logical_not(void_pixels))
    gt_boundary = ref_seg2bmap(gt_mask * np.logical_not(void_pixels))
    fg_dil = ref_dilate(fg_boundary.astype(np.uint8), ref_disk(bound_pix).astype(np.uint8))
    gt_dil = ref_dilate(gt_boundary.astype(np.uint8), ref_disk(bound_pix).astype(np.uint8))
    gt_match = gt_boundary * fg_dil
    fg_match = fg_boundary * gt_dil
    n_fg = np.sum(fg_boundary)
    n_gt = np.sum(gt_boundary)
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1, 0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0, 1
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1, 1
    else:
        precision = np.sum(fg_match) / float(n_fg)
        recall = np.sum(gt_match) / float(n_gt)
    if precision + recall == 0:
        return 0
    return 2 * precision * recall / (precision + recall)


def ref_db_eval_boundary(annotation, segmentation, void_pixels=None, bound_th=0.008):
    return ref_f_measure(segmentation, annotation, void_pixels, bound_th=bound_th)


def ref_db_statistics(per_frame_values):
    M = np.nanmean(per_frame_values)
    O = np.nanmean(per_frame_values > 0.5)
    ids = np.round(np.linspace(1, len(per_frame_values), 5) + 1e-10) - 1
    ids = ids.astype(np.uint8)
    D_bins = [per_frame_values[ids[i]:ids[i + 1] + 1] for i in range(4)]
    D = np.nanmean(D_bins[0]) - np.nanmean(D_bins[3])
    return M, O, D


# ---- shapes -------------------------------------------------------------------------------------


def blob(rng, shape, sigma=3.0, level=0.0):
    return ndimage.gaussian_filter(rng.standard_normal(shape), sigma) > level


def hand_shapes(h=40, w=60):
    sq = np.zeros((h, w), bool)
    sq[10:25, 12:30] = True
    ell = np.zeros((h, w), bool)
    ell[5:35, 5:12] = True
    ell[28:35, 5:40] = True
    dot = np.zeros((h, w), bool)
    dot[20, 30] = True
    edge = np.zeros((h, w), bool)
    edge[:, w - 8:] = True  # touches the last column and rows
    edge[h - 3:, :] = True
    full = np.ones((h, w), bool)
    empty = np.zeros((h, w), bool)
    return [sq, ell, dot, edge, full, empty]


def test_davis_iou_and_boundary_equal_the_reference_on_hand_shapes():
    shapes = hand_shapes()
    void = np.zeros_like(shapes[0])
    void[0:8, 40:60] = True
    for a in shapes:
        for b in shapes:
            for vp in (None, void):
                assert db_eval_iou(a, b, vp) == pytest.approx(float(ref_db_eval_iou(a, b, vp)), abs=1e-6)
                for th in (0.008, 0.05, 2):
                    got = db_eval_boundary(a, b, vp, bound_th=th)
                    assert got == pytest.approx(float(ref_db_eval_boundary(a, b, vp, th)), abs=1e-6)
    # empty masks: both empty -> J = F = 1; one empty -> 0
    e, s = shapes[-1], shapes[0]
    assert db_eval_iou(e, e) == 1 and db_eval_boundary(e, e) == 1
    assert db_eval_iou(s, e) == 0 and db_eval_boundary(s, e) == 0 and db_eval_boundary(e, s) == 0


def test_davis_metrics_equal_the_reference_on_random_blobs():
    rng = np.random.default_rng(0)
    seen_partial = 0
    for i in range(30):
        shape = (48, 64) if i % 2 else (90, 120)
        gt = blob(rng, shape, sigma=rng.uniform(2, 6), level=rng.uniform(-0.05, 0.1))
        # a prediction near the truth (shifted, eroded/dilated) so that the boundaries partly match
        pred = np.roll(gt, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
        pred = ndimage.binary_dilation(pred) if i % 3 == 0 else pred ^ (blob(rng, shape, 1.5, 1.0) & pred)
        void = blob(rng, shape, 4.0, 0.25) if i % 2 else None
        th = (0.008, 0.03, 0.06)[i % 3]
        f = db_eval_boundary(gt, pred, void, bound_th=th)
        assert f == pytest.approx(float(ref_db_eval_boundary(gt, pred, void, th)), abs=1e-6)
        assert db_eval_iou(gt, pred, void) == pytest.approx(float(ref_db_eval_iou(gt, pred, void)), abs=1e-6)
        assert np.array_equal(seg2bmap(pred), ref_seg2bmap(pred))
        seen_partial += 0.05 < f < 0.95
    assert seen_partial >= 10  # the comparison exercised real partial matches, not only 0 / 1
    # [T, H, W] stacks score per frame
    gts = np.stack([blob(rng, (30, 40)) for _ in range(3)])
    prs = np.stack([blob(rng, (30, 40)) for _ in range(3)])
    np.testing.assert_allclose(db_eval_iou(gts, prs), ref_db_eval_iou(gts, prs), atol=1e-6)
    np.testing.assert_allclose(db_eval_boundary(gts, prs),
                               [ref_db_eval_boundary(g, p) for g, p in zip(gts, prs)], atol=1e-6)


def test_seg2bmap_resampling_branch_and_db_statistics_match_the_reference():
    rng = np.random.default_rng(1)
    seg = blob(rng, (10, 10), 1.5)
    np.testing.assert_array_equal(seg2bmap(seg, 20, 20), ref_seg2bmap(seg, 20, 20))
    for n in (1, 3, 7, 40):
        v = rng.uniform(size=n)
        assert np.allclose(db_statistics(v), ref_db_statistics(v), equal_nan=True)


# ---- SegScores, pointing, PCK ---------------------------------------------------------------------


def test_segscores_match_brute_force_counting_with_ignore_pixels():
    rng = np.random.default_rng(2)
    s = SegScores()
    rows = []
    for i in range(25):
        h, w = rng.integers(3, 9, size=2)
        gt = (rng.random((h, w)) < 0.4).astype(np.uint8)
        gt[rng.random((h, w)) < 0.15] = 255
        pred = rng.random((h, w)) < 0.45
        if i == 3:  # empty prediction on an image with no foreground: IoU 1
            gt[gt == 1] = 0
            pred[:] = False
        cat = "abc"[i % 3]
        s.add(pred, gt, cat)
        rows.append((pred, gt, cat))

    def counts(pred, gt):
        inter = union = bi = bu = correct = valid = 0
        for p, g in zip(pred.ravel(), gt.ravel()):
            if g == 255:
                continue
            valid += 1
            f = g == 1
            inter += p and f
            union += p or f
            bi += (not p) and (not f)
            bu += (not p) or (not f)
            correct += p == f
        return inter, union, bi, bu, correct, valid

    per = {c: [0, 0] for c in "abc"}
    tot = np.zeros(6)
    img_ious = []
    for p, g, c in rows:
        k = counts(p, g)
        per[c][0] += k[0]
        per[c][1] += k[1]
        tot += k
        img_ious.append(k[0] / k[1] if k[1] else 1.0)
    want_per = {c: per[c][0] / per[c][1] for c in "abc"}
    assert s.per_category() == pytest.approx(want_per)
    assert s.miou() == pytest.approx(np.mean(list(want_per.values())))
    assert s.fb_iou() == pytest.approx(0.5 * (tot[0] / tot[1] + tot[2] / tot[3]))
    assert s.precision() == pytest.approx(tot[4] / tot[5])
    assert s.jaccard() == s.mean_image_iou() == pytest.approx(np.mean(img_ious))
    assert img_ious[3] == 1.0
    js = s.to_json()
    assert js["n_images"] == 25 and js["fg_union"] == tot[1] and js["n_pixels"] == tot[5]
    with pytest.raises(UserError, match="shape"):
        s.add(np.zeros((2, 2), bool), np.zeros((3, 2), np.uint8))


def test_pointing_hit_takes_the_argmax_and_skips_nan():
    gt = np.zeros((4, 5), np.uint8)
    gt[1, 2] = 1
    sc = np.zeros((4, 5))
    sc[1, 2] = 0.9
    assert pointing_hit(sc, gt)
    sc[3, 3] = np.nan
    assert pointing_hit(sc, gt)
    sc[0, 0] = 5.0
    assert not pointing_hit(sc, gt)
    assert not pointing_hit(np.full((4, 5), np.nan), gt)


def test_pck_formula_thresholds_and_aggregation():
    rng = np.random.default_rng(3)
    pred = rng.uniform(0, 100, (50, 2))
    gt = rng.uniform(0, 100, (50, 2))
    thr = 40.0
    want = np.array([math.hypot(*(p - g)) <= thr for p, g in zip(pred, gt)])
    np.testing.assert_array_equal(pck(pred, gt, thr), want)
    assert pck([[0, 0]], [[3, 4]], 5.0)[0] and not pck([[0, 0]], [[3, 4]], 4.999)[0]  # <= inclusive
    assert bbox_threshold((10, 20, 50, 120)) == pytest.approx(10.0)  # 0.1 * max(40, 100)
    assert bbox_threshold((10, 20, 50, 120), alpha=0.05) == pytest.approx(5.0)
    assert image_threshold((300, 500)) == pytest.approx(50.0)
    s = PCKScores()
    s.add([True, False, True], [True, True, True], "cat")
    s.add([False], [True], "dog")
    s.add([True, True, False, False], [False, True, True, False], "cat")
    js = s.to_json()
    assert js["pck_bbox"] == pytest.approx(4 / 8) and js["pck_img"] == pytest.approx(6 / 8)
    assert js["per_category"]["cat"]["pck_bbox"] == pytest.approx(4 / 7)
    assert js["per_category"]["dog"]["pck_img"] == 1.0
    assert js["pck_bbox_per_pair"] == pytest.approx(np.mean([2 / 3, 0, 0.5]))
    assert js["n_keypoints"] == 8 and js["n_pairs"] == 3


# ---- JFScores aggregation -----------------------------------------------------------------------


def square(h, w, y0, x0, size, label=1, into=None):
    m = np.zeros((h, w), np.uint8) if into is None else into
    m[y0:y0 + size, x0:x0 + size] = label
    return m


def test_jfscores_aggregate_as_davis_on_a_hand_made_two_sequence_example():
    h, w = 20, 24
    s = JFScores()
    # sequence "a": 4 frames, 1 object; frames 1 and 2 scored, frame 3 (the last) is not
    gt_a = [square(h, w, 4, 4, 6) for _ in range(4)]
    pred_a = [square(h, w, 4, 4, 6),            # frame 1: exact -> J = F = 1
              np.zeros((h, w), np.uint8),       # frame 2: missing -> J = F = 0
              np.zeros((h, w), np.uint8)]       # frame 3: last, not scored
    s.add("a", pred_a, gt_a, n_objects=1)  # gt with the first frame: dropped
    # sequence "b": 3 frames, 2 objects; only frame 1 is scored
    gt_b1 = square(h, w, 2, 2, 4, label=1)
    square(h, w, 10, 12, 5, label=2, into=gt_b1)
    gt_b1[14:16, 2:4] = 255  # void
    pred_b1 = square(h, w, 2, 2, 4, label=1)
    pred_b1[14:16, 2:4] = 1  # object 1 also claims the 4 void pixels
    pred_b2_last = square(h, w, 10, 12, 5, label=2)  # last frame: perfect but not scored
    s.add("b", [pred_b1, pred_b2_last], [gt_b1, gt_b1], n_objects=2)
    js = s.to_json()
    # void counts as background in semi-supervised DAVIS: J(b_1) = 16 / 20, not 1
    f_b1 = db_eval_boundary(gt_b1 == 1, pred_b1 == 1)
    assert 0 < f_b1 < 1
    assert js["per_object"]["a_1"] == pytest.approx({"J-Mean": 0.5, "F-Mean": 0.5})
    assert js["per_object"]["b_1"] == pytest.approx({"J-Mean": 0.8, "F-Mean": f_b1})
    assert js["per_object"]["b_2"] == pytest.approx({"J-Mean": 0.0, "F-Mean": 0.0})
    assert js["J-Mean"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert js["F-Mean"] == pytest.approx((0.5 + f_b1 + 0.0) / 3)
    assert js["J&F-Mean"] == pytest.approx((js["J-Mean"] + js["F-Mean"]) / 2)
    assert js["per_sequence"]["b"]["J-Mean"] == pytest.approx(0.4)
    assert js["per_sequence"]["a"]["J&F-Mean"] == pytest.approx(0.5)
    assert js["J-Recall"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert js["n_objects"] == 3 and js["n_sequences"] == 2
    with pytest.raises(UserError, match="exceeds"):
        JFScores().add("c", [square(h, w, 0, 0, 3, label=3)] * 2, [gt_b1] * 2, n_objects=2)
    with pytest.raises(UserError, match="predicted frames"):
        JFScores().add("c", [gt_b1] * 2, [gt_b1] * 5, n_objects=2)


def test_jfscores_equal_the_per_frame_reference_on_random_label_maps():
    """The frames of a clip are scored at once with the annotation's boundaries made once: J and F per object
    equal the reference's per-frame db_eval_iou / db_eval_boundary, for 20 random clips (void, empty
    predictions, missing objects) and the same annotation list scored twice (the cached boundaries)."""
    from sightline.perception.metrics import db_eval_iou, db_statistics

    rng = np.random.default_rng(0)
    for trial in range(20):
        t_len, h, w, n = 6, 30, 41, 3
        gts = [rng.integers(0, n + 1, (h, w)).astype(np.uint8) for _ in range(t_len)]
        for g in gts:
            g[rng.random((h, w)) < 0.05] = 255
        preds = [np.where(g == 255, 0, g if rng.random() < 0.3 else rng.integers(0, n + 1, (h, w))).astype(np.uint8)
                 for g in gts[1:]]
        if trial % 3 == 0:
            preds = [np.zeros_like(p) for p in preds]
        s = JFScores()
        for name in ("x", "y"):  # the same gts twice: the second reuses the cached boundaries
            got = s.add(name, preds, gts, n)
            for k in range(1, n + 1):
                js = [db_eval_iou(gts[1 + t] == k, preds[t] == k) for t in range(t_len - 2)]
                fs = [db_eval_boundary(gts[1 + t] == k, preds[t] == k) for t in range(t_len - 2)]
                assert got[f"{name}_{k}"]["J"] == pytest.approx(db_statistics(np.array(js))[0], abs=1e-12)
                assert got[f"{name}_{k}"]["F"] == pytest.approx(db_statistics(np.array(fs))[0], abs=1e-12)

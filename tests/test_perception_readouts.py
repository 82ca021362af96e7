"""Perception readouts against scikit-learn, brute-force loops and a transcription of DINO's DAVIS
label propagation (facebookresearch/dino, eval_video_segmentation.py)."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score
from sklearn.preprocessing import StandardScaler

from sightline.errors import UserError
from sightline.perception.readouts import (
    ClipPropagator,
    ThresholdSearch,
    cosegment,
    downsample_labels,
    fit_token_classifier,
    kmeans,
    kmeans_plusplus,
    labels_to_onehot,
    nearest_neighbours,
    norm_mask,
    normalize_scores,
    propagate,
    propagate_dense,
    query_scores,
)

# ---- logistic regression ------------------------------------------------------------------------


@pytest.mark.parametrize("l2", [1.0, 0.1])
def test_token_classifier_matches_sklearn_on_standardised_data(l2):
    g = torch.Generator().manual_seed(0)
    n, d = 400, 12
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 5, d) + torch.linspace(-3, 3, d)
    w_true = torch.randn(d, generator=g)
    z = (x - x.mean(0)) / x.std(0, unbiased=False)
    y = (torch.rand(n, generator=g) < torch.sigmoid(z @ w_true * 0.8)).long()
    clf = fit_token_classifier(x, y, l2=l2)
    zs = StandardScaler().fit_transform(x.double().numpy())
    ref = LogisticRegression(C=1 / l2, tol=1e-12, max_iter=10000).fit(zs, y.numpy())
    np.testing.assert_allclose(clf.coef.numpy(), ref.coef_[0], atol=1e-3, rtol=1e-3)
    assert clf.intercept == pytest.approx(ref.intercept_[0], abs=1e-3)
    np.testing.assert_allclose(clf.predict_proba(x).numpy(), ref.predict_proba(zs)[:, 1], atol=1e-3)
    np.testing.assert_allclose(clf.decision_function(x).numpy(), ref.decision_function(zs), atol=2e-3)
    assert torch.equal(clf.predict(x), clf.predict_proba(x) > 0.5)


@pytest.mark.parametrize("newton", [True, False])
def test_balanced_token_classifier_matches_sklearn_by_newton_and_by_lbfgs(newton, monkeypatch):
    """class_weight="balanced" on a rare positive class (a few foreground tokens), by the Newton solve and by the
    L-BFGS one used above NEWTON_MAX_DIM features."""
    from sightline.perception import readouts

    monkeypatch.setattr(readouts, "NEWTON_MAX_DIM", 1024 if newton else 0)
    g = torch.Generator().manual_seed(3)
    n, d = 320, 16
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] + 0.7 * x[:, 1] + 0.5 * torch.randn(n, generator=g) > 1.9).long()
    assert 5 <= int(y.sum()) <= 30
    for cw in (None, "balanced"):
        clf = fit_token_classifier(x, y, l2=1.0, class_weight=cw)
        zs = StandardScaler().fit_transform(x.double().numpy())
        ref = LogisticRegression(C=1.0, class_weight=cw, tol=1e-12, max_iter=10000).fit(zs, y.numpy())
        np.testing.assert_allclose(clf.coef.numpy(), ref.coef_[0], atol=1e-4, rtol=1e-4)
        assert clf.intercept == pytest.approx(ref.intercept_[0], abs=1e-4)
    # balancing predicts more of the rare class
    assert fit_token_classifier(x, y, class_weight="balanced").predict(x).sum() > fit_token_classifier(x, y).predict(x).sum()
    with pytest.raises(UserError, match="class_weight"):
        fit_token_classifier(x, y, class_weight="equal")


def test_token_classifier_without_standardising_and_with_one_class():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 6, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(200, generator=g) > 0).long()
    clf = fit_token_classifier(x, y, l2=2.0, standardize=False)
    ref = LogisticRegression(C=0.5, tol=1e-12, max_iter=10000).fit(x.double().numpy(), y.numpy())
    np.testing.assert_allclose(clf.coef.numpy(), ref.coef_[0], atol=1e-3)
    for c in (0, 1):
        one = fit_token_classifier(x, torch.full((200,), c), l2=1.0)
        assert torch.equal(one.predict_proba(x[:7]), torch.full((7,), float(c)))
        assert torch.equal(one.predict(x[:3]), torch.full((3,), bool(c)))
    with pytest.raises(UserError, match="l2"):
        fit_token_classifier(x, y, l2=-1.0)


# ---- k-means ------------------------------------------------------------------------------------


def brute_lloyd(x, c, max_iter=100):
    x, c = x.double().numpy(), c.double().numpy().copy()

    def assign(c):
        return np.array([min(range(len(c)), key=lambda j: (((xi - c[j]) ** 2).sum(), j)) for xi in x])

    labels = assign(c)
    for _ in range(max_iter):
        for j in range(len(c)):
            if (labels == j).any():
                c[j] = x[labels == j].mean(0)
        new = assign(c)
        if (new == labels).all():
            break
        labels = new
    return labels, c


@pytest.mark.parametrize("cosine", [True, False])
def test_kmeans_equals_a_brute_force_lloyd_loop_from_the_same_init(cosine):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(120, 5, generator=g) + 3 * torch.randn(4, 5, generator=g).repeat_interleave(30, 0)
    labels, cents = kmeans(x, 4, seed=7, n_init=1, cosine=cosine)
    xs = F.normalize(x, dim=1) if cosine else x
    init = xs[kmeans_plusplus(xs, 4, torch.Generator().manual_seed(7))]
    want_labels, want_c = brute_lloyd(xs, init)
    np.testing.assert_array_equal(labels.numpy(), want_labels)
    np.testing.assert_allclose(cents.numpy(), want_c, atol=1e-5)


def test_kmeans_agrees_with_sklearn_on_separated_blobs():
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(5, 8, generator=g) * 6
    x = centres.repeat_interleave(60, 0) + torch.randn(300, 8, generator=g)
    labels, _ = kmeans(x, 5, seed=0, cosine=False)
    ref = KMeans(5, n_init=10, random_state=0).fit_predict(x.numpy())
    assert adjusted_rand_score(ref, labels.numpy()) >= 0.99
    labels_cos, _ = kmeans(x, 5, seed=0, cosine=True)
    ref_cos = KMeans(5, n_init=10, random_state=0).fit_predict(F.normalize(x, dim=1).numpy())
    assert adjusted_rand_score(ref_cos, labels_cos.numpy()) >= 0.99
    with pytest.raises(UserError, match="k = "):
        kmeans(x[:3], 5, seed=0)


# ---- co-segmentation ----------------------------------------------------------------------------


def planted_set(n_images=5, hw=(8, 8), d=64, shared_frame=False, seed=0):
    """Each image: its own background direction, a shared object direction on a 3x3..4x4 block
    away from the border; optionally a shared direction on the border ring ("a frame")."""
    g = torch.Generator().manual_seed(seed)
    obj = torch.randn(d, generator=g)
    frame = torch.randn(d, generator=g)
    feats, masks = [], []
    h, w = hw
    for i in range(n_images):
        bg = torch.randn(d, generator=g)
        m = torch.zeros(h, w, dtype=torch.bool)
        size = 3 + i % 2
        y0, x0 = 1 + i % 3, 1 + (i * 2) % 3
        m[y0:y0 + size, x0:x0 + size] = True
        f = bg.repeat(h * w, 1)
        f[m.reshape(-1)] = obj
        if shared_frame:
            ring = torch.zeros(h, w, dtype=torch.bool)
            ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
            f[ring.reshape(-1)] = frame
        feats.append(f + 0.05 * torch.randn(h * w, d, generator=g))
        masks.append(m.reshape(-1))
    return feats, masks, [hw] * n_images


def test_cosegment_recovers_the_planted_common_object_exactly():
    feats, masks, grids = planted_set()
    got = cosegment(feats, grids, n_clusters=6)
    for m, want in zip(got, masks):
        assert torch.equal(m, want)


def test_cosegment_background_prior_drops_a_shared_border():
    feats, masks, grids = planted_set(shared_frame=True, seed=1)
    with_prior = cosegment(feats, grids, n_clusters=7)
    without = cosegment(feats, grids, n_clusters=7, background_prior=False)
    ring = torch.zeros(8, 8, dtype=torch.bool)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    for m, want, m2 in zip(with_prior, masks, without):
        assert torch.equal(m, want)
        assert torch.equal(m2, want | ring.reshape(-1))
    with pytest.raises(UserError, match="grids_hw"):
        cosegment(feats, None)


def test_cosegment_returns_empty_masks_when_nothing_is_shared():
    g = torch.Generator().manual_seed(4)
    feats = []
    for _ in range(3):  # two private directions per image, 6 clusters in all
        a, b = torch.randn(2, 32, generator=g)
        f = torch.cat([a.repeat(30, 1), b.repeat(34, 1)]) + 0.05 * torch.randn(64, 32, generator=g)
        feats.append(f)
    got = cosegment(feats, [(8, 8)] * 3, n_clusters=6)
    assert all(not m.any() for m in got)
    # with vote_fraction 1/3 every present cluster counts: everything not on the border ring
    assert any(m.any() for m in cosegment(feats, n_clusters=6, vote_fraction=0.3, background_prior=False))


# ---- text queries, thresholds, nearest neighbours -------------------------------------------------


def test_query_scores_and_normalize():
    g = torch.Generator().manual_seed(5)
    f, q = torch.randn(10, 4, generator=g), torch.randn(4, generator=g)
    torch.testing.assert_close(query_scores(f, q), f @ q)
    torch.testing.assert_close(query_scores(f, q, "cosine"), F.cosine_similarity(f, q[None], dim=1))
    s = torch.tensor([2.0, float("nan"), 4.0, 3.0])
    out = normalize_scores(s)
    assert torch.isnan(out[1]) and torch.equal(out[[0, 2, 3]], torch.tensor([0.0, 1.0, 0.5]))
    assert torch.equal(normalize_scores(torch.ones(3)), torch.zeros(3))
    with pytest.raises(UserError, match="how"):
        query_scores(f, q, "l2")


def test_threshold_search_matches_brute_force_and_breaks_ties_low():
    rng = np.random.default_rng(6)
    ts = ThresholdSearch()
    maps = []
    for _ in range(6):
        gt = (rng.random((9, 11)) < 0.35).astype(np.uint8)
        gt[rng.random((9, 11)) < 0.1] = 255
        s = np.clip(gt * 0.3 + rng.random((9, 11)) * 0.7, 0, 1)
        s[rng.random((9, 11)) < 0.1] = np.nan
        ts.add(s, gt)
        maps.append((s, gt))
    best_iou, best_t = -1, None
    for t in np.linspace(0, 1, 21):
        inter = union = 0
        for s, gt in maps:
            for v, g in zip(s.ravel(), gt.ravel()):
                if g == 255:
                    continue
                p = (not np.isnan(v)) and v >= t
                inter += p and g == 1
                union += p or g == 1
        if inter / union > best_iou:
            best_iou, best_t = inter / union, t
    t, iou = ts.best()
    assert t == pytest.approx(best_t) and iou == pytest.approx(best_iou)
    tie = ThresholdSearch([0.2, 0.4, 0.9])
    tie.add(np.array([[0.1, 0.95]]), np.array([[0, 1]], np.uint8))  # 0.2 and 0.4 both give IoU 1
    assert tie.best() == (0.2, 1.0)


def test_nearest_neighbours_match_brute_force_and_take_the_first_tie():
    g = torch.Generator().manual_seed(7)
    src, tgt = torch.randn(23, 6, generator=g), torch.randn(17, 6, generator=g)
    tgt[9] = tgt[4] * 3  # same direction as row 4: cosine tie, row 4 must win
    src[0] = tgt[4]
    got = nearest_neighbours(src, tgt, chunk=5)
    for i in range(23):
        sims = [float(F.cosine_similarity(src[i], tgt[j], dim=0)) for j in range(17)]
        assert got[i] == int(np.argmax(sims)) or sims[int(got[i])] == pytest.approx(max(sims), abs=1e-6)
    assert got[0] == 4


# ---- label propagation ----------------------------------------------------------------------------


def brute_propagate(target, ctx_feats, ctx_labels, grid_hw, topk, radius, temperature):
    """DINO's formulas token by token, in float64."""
    h, w = grid_hw
    t = F.normalize(target.double(), dim=1)
    out = torch.zeros(target.shape[0], ctx_labels[0].shape[1], dtype=torch.float64)
    for q in range(h * w):
        qi, qj = divmod(q, w)
        affs, labs = [], []
        for f, lab in zip(ctx_feats, ctx_labels):
            fs = F.normalize(f.double(), dim=1)
            for s in range(h * w):
                si, sj = divmod(s, w)
                inside = radius <= 0 or (abs(si - qi) <= radius and abs(sj - qj) <= radius)
                affs.append(float(torch.exp(fs[s] @ t[q] / temperature)) if inside else 0.0)
                labs.append(lab[s].double())
        kth = sorted(affs, reverse=True)[topk - 1]
        kept = [a if a >= kth else 0.0 for a in affs]
        total = sum(kept)
        out[q] = sum(a / total * lab for a, lab in zip(kept, labs))
    return out


def context(seed, n_ctx=3, hw=(5, 6), d=8, c=3):
    g = torch.Generator().manual_seed(seed)
    n = hw[0] * hw[1]
    feats = [torch.randn(n, d, generator=g) for _ in range(n_ctx)]
    labels = [torch.softmax(torch.randn(n, c, generator=g) * 3, 1) for _ in range(n_ctx)]
    return torch.randn(n, d, generator=g), feats, labels


@pytest.mark.parametrize("radius", [1, 2, 0])
def test_propagate_equals_dense_and_dino_brute_force(radius):
    target, feats, labels = context(8)
    hw = (5, 6)
    dense = propagate_dense(target, feats, labels, hw, topk=5, radius=radius)
    for chunk in (1, 7, 30, 1000):
        torch.testing.assert_close(propagate(target, feats, labels, hw, topk=5, radius=radius, chunk=chunk),
                                   dense, atol=1e-5, rtol=1e-5)
    brute = brute_propagate(target, feats, labels, hw, 5, radius, 0.1).float()
    torch.testing.assert_close(dense, brute, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense.sum(1), labels[0].sum(1), atol=1e-5, rtol=0)  # convex combination


def test_propagate_is_stable_at_low_temperature():
    target, feats, labels = context(9)
    out = propagate(target, feats, labels, (5, 6), topk=3, radius=2, temperature=0.005)
    assert torch.isfinite(out).all()  # DINO's unshifted exp(cos / 0.005) overflows float32
    assert not torch.isfinite(propagate_dense(target, feats, labels, (5, 6), topk=3, radius=2,
                                              temperature=0.005)).all()
    brute = brute_propagate(target, feats, labels, (5, 6), 3, 2, 0.005).float()  # float64: no overflow
    torch.testing.assert_close(out, brute, atol=1e-4, rtol=1e-4)


def test_clip_propagator_keeps_the_first_frame_and_the_last_n_soft_maps_as_dino():
    hw = (4, 5)
    n, d, c = 20, 6, 3
    g = torch.Generator().manual_seed(10)
    first_feats = torch.randn(n, d, generator=g)
    first_labels = labels_to_onehot(torch.randint(0, c, (n,), generator=g), c)
    frames = [torch.randn(n, d, generator=g) for _ in range(11)]
    prop = ClipPropagator(first_labels, first_feats, hw, n_last=7, topk=4, radius=2)
    # DINO's loop, with its queue.Queue(n_last_frames)
    que = queue.Queue(7)
    for step, tar in enumerate(frames, 1):
        used_feats = [first_feats] + [p[0] for p in list(que.queue)]
        used_segs = [first_labels] + [p[1] for p in list(que.queue)]
        want = propagate_dense(tar, used_feats, used_segs, hw, topk=4, radius=2)
        if que.qsize() == 7:
            que.get()
        que.put([tar, want.clone()])
        got = prop.step(tar)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        ctx = prop.context()
        assert len(ctx) == 1 + min(step, 7)
        assert ctx[0][0] is first_feats
        assert all(a is b for (a, _), b in zip(ctx[1:], frames[max(0, step - 7):step]))
        assert not torch.equal(ctx[-1][1], ctx[-1][1].round())  # soft maps are queued, not argmax
    only_first = ClipPropagator(first_labels, first_feats, hw, n_last=0, topk=4, radius=2)
    for tar in frames[:3]:
        only_first.step(tar)
    assert len(only_first.context()) == 1


def test_label_helpers_match_dino():
    lab = torch.tensor([0, 2, 1, 255, 2])
    oh = labels_to_onehot(lab, 3)
    assert torch.equal(oh, torch.tensor([[1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0], [0, 0, 1]], dtype=torch.float32))
    blocks = np.kron(np.arange(12, dtype=np.uint8).reshape(3, 4), np.ones((8, 8), np.uint8))
    assert torch.equal(downsample_labels(blocks, (3, 4)), torch.arange(12))
    g = torch.Generator().manual_seed(11)
    m = torch.rand(3, 4, 5, generator=g)
    m[1] = -m[1]  # max <= 0: left alone

    def dino_norm_mask(mask):
        c, _, _ = mask.size()
        for cnt in range(c):
            mask_cnt = mask[cnt, :, :]
            if mask_cnt.max() > 0:
                mask_cnt = mask_cnt - mask_cnt.min()
                mask_cnt = mask_cnt / mask_cnt.max()
                mask[cnt, :, :] = mask_cnt
        return mask

    torch.testing.assert_close(norm_mask(m), dino_norm_mask(m.clone()))

"""Zero-shot readouts from per-token features: what each perception task does with image tokens.

- Few-shot segmentation: `fit_token_classifier` (a per-token logistic regression on the support
  images' tokens).
- Co-segmentation: `kmeans`, `cosegment` (joint clustering of a set, after Amir et al. 2021).
- Text-query segmentation: `query_scores`, `normalize_scores`, `ThresholdSearch` (a threshold
  chosen on held-out images).
- Semantic correspondence: `nearest_neighbours` (cosine).
- Temporal correspondence: `propagate`, `propagate_dense`, `ClipPropagator`, `labels_to_onehot`,
  `downsample_labels`, `norm_mask` (DINO's DAVIS label propagation).

Features are rows of a [n_tokens, D] tensor, on CPU or GPU; computation is float32 (float64 for the
tiny logistic solve) and chunked so that memory stays bounded by the chunk size, not the set size.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sightline.errors import UserError
from sightline.perception.tasks import IGNORE

# ---- few-shot segmentation: per-token logistic regression ---------------------------------------


@dataclass
class TokenClassifier:
    """A fitted binary logistic regression on token features.

    `coef` [D] and `intercept` act on standardised features (x - mean) / std; `constant` is set (0
    or 1) when the training labels had a single class, and the classifier then predicts it."""

    coef: torch.Tensor
    intercept: float
    mean: torch.Tensor
    std: torch.Tensor
    constant: int | None = None

    def decision_function(self, x: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """Logit per row of x [N, D] -> [N] float32 (+-30 for a single-class fit)."""
        n = x.shape[0]
        if self.constant is not None:
            return torch.full((n,), 30.0 if self.constant else -30.0, device=x.device)
        w = (self.coef / self.std).to(x.device, torch.float32)  # no standardised copy of x
        b = float(self.intercept - (self.mean * self.coef / self.std).sum())
        out = torch.empty(n, device=x.device, dtype=torch.float32)
        for s in range(0, n, chunk):
            out[s:s + chunk] = x[s:s + chunk].to(torch.float32) @ w + b
        return out

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Probability of the foreground class per row of x [N, D] -> [N]."""
        if self.constant is not None:
            return torch.full((x.shape[0],), float(self.constant), device=x.device)
        return torch.sigmoid(self.decision_function(x))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Foreground (probability > 0.5) per row -> [N] bool."""
        return self.predict_proba(x) > 0.5


def _solve_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


NEWTON_MAX_DIM = 1024  # fit_token_classifier: exact Newton steps up to this many features, L-BFGS above


def fit_token_classifier(x: torch.Tensor, y: torch.Tensor, l2: float = 1.0, standardize: bool = True,
                         max_iter: int = 200, class_weight: str | None = None) -> TokenClassifier:
    """Binary logistic regression of y [N] (0/1) on x [N, D], full batch.

    Objective: sum_i s_i log-loss_i + l2 / 2 * ||w||^2, intercept unpenalised: exactly scikit-learn's
    `LogisticRegression(C=1 / l2, class_weight=class_weight)` (its default C=1 is l2=1; s_i = 1, or
    with class_weight="balanced" N / (2 N_class(i)) as sklearn). With `standardize` the features are
    first scaled to zero mean and unit population std (constant dimensions keep std 1), as
    sklearn's StandardScaler. Solved in float64 (float32 on MPS): by Newton's method with a
    backtracking line search (the objective is strictly convex in w; a few exact steps) when
    D <= NEWTON_MAX_DIM, else by L-BFGS (`max_iter` iterations). A single-class y gives a
    classifier that predicts that class."""
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise UserError(f"fit_token_classifier wants x [N, D] and y [N]; got {tuple(x.shape)} and "
                        f"{tuple(y.shape)}")
    if l2 < 0:
        raise UserError(f"l2 = {l2} is negative; pass l2 >= 0 (sklearn's C = 1 / l2)")
    if class_weight not in (None, "balanced"):
        raise UserError(f"class_weight={class_weight!r}; pass None or 'balanced'")
    dt = _solve_dtype(x.device)
    xd = x.to(dt)
    yd = (y.to(x.device) > 0).to(dt)
    d = x.shape[1]
    if standardize:
        mean = xd.mean(0)
        std = xd.std(0, unbiased=False) if x.shape[0] > 1 else torch.ones_like(mean)
        std = torch.where(std > 1e-12 * mean.abs().clamp_min(1.0), std, torch.ones_like(std))
    else:
        mean, std = torch.zeros(d, dtype=dt, device=x.device), torch.ones(d, dtype=dt, device=x.device)
    classes = torch.unique(yd)
    if classes.numel() < 2:
        c = int(classes.item()) if classes.numel() else 0
        return TokenClassifier(torch.zeros(d, dtype=dt, device=x.device), 0.0, mean, std, constant=c)
    z = (xd - mean) / std
    n = z.shape[0]
    sw = torch.ones(n, dtype=dt, device=x.device)
    if class_weight == "balanced":
        n_pos = yd.sum()
        sw = torch.where(yd > 0, n / (2 * n_pos), n / (2 * (n - n_pos)))
    if d <= NEWTON_MAX_DIM and l2 > 0:
        w = _newton_logistic(z, yd, sw, l2)
    else:
        w = _lbfgs_logistic(z, yd, sw, l2, max_iter)
    return TokenClassifier(w[:d].clone(), float(w[d]), mean, std)


def _logistic_loss(zb: torch.Tensor, y: torch.Tensor, sw: torch.Tensor, l2: float, w: torch.Tensor) -> torch.Tensor:
    logits = zb @ w
    return (sw * F.binary_cross_entropy_with_logits(logits, y, reduction="none")).sum() + 0.5 * l2 * (w[:-1] ** 2).sum()


def _newton_logistic(z: torch.Tensor, y: torch.Tensor, sw: torch.Tensor, l2: float, max_iter: int = 50,
                     tol: float = 1e-10) -> torch.Tensor:
    """Newton's method on the weighted, L2-penalised logistic loss; parameters [D + 1] (intercept last)."""
    n, d = z.shape
    zb = torch.cat([z, torch.ones(n, 1, dtype=z.dtype, device=z.device)], 1)
    reg = torch.full((d + 1,), float(l2), dtype=z.dtype, device=z.device)
    reg[d] = 0.0
    w = torch.zeros(d + 1, dtype=z.dtype, device=z.device)
    loss = _logistic_loss(zb, y, sw, l2, w)
    for _ in range(max_iter):
        p = torch.sigmoid(zb @ w)
        grad = zb.T @ (sw * (p - y)) + reg * w
        if float(grad.abs().max()) <= tol * max(1.0, float(sw.sum())):
            break
        h = (zb * (sw * p * (1 - p))[:, None]).T @ zb + torch.diag(reg)
        h[d, d] += 1e-12 * float(sw.sum())  # a saturated intercept: keep the system solvable
        step = torch.linalg.solve(h, grad)
        t = 1.0
        while True:  # backtracking (Armijo) line search
            new = w - t * step
            new_loss = _logistic_loss(zb, y, sw, l2, new)
            if new_loss <= loss - 1e-4 * t * float(grad @ step) or t < 1e-10:
                break
            t *= 0.5
        if float(loss - new_loss) <= 1e-15 * max(1.0, abs(float(loss))):
            w = new
            break
        w, loss = new, new_loss
    return w


def _lbfgs_logistic(z: torch.Tensor, y: torch.Tensor, sw: torch.Tensor, l2: float, max_iter: int) -> torch.Tensor:
    """L-BFGS (strong Wolfe) on the same objective, for many features."""
    n, d = z.shape
    params = torch.zeros(d + 1, dtype=z.dtype, device=z.device, requires_grad=True)
    opt = torch.optim.LBFGS([params], lr=1.0, max_iter=max_iter, max_eval=max_iter * 2,
                            tolerance_grad=1e-10, tolerance_change=1e-14, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = z @ params[:d] + params[d]
        # divided by n for conditioning; the minimiser is the same
        loss = ((sw * F.binary_cross_entropy_with_logits(logits, y, reduction="none")).sum()
                + 0.5 * l2 * (params[:d] ** 2).sum()) / n
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return params.detach()


# ---- co-segmentation: k-means and joint clustering -----------------------------------------------


def _sq_dists_argmin(x: torch.Tensor, c: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid (first on ties) and its squared distance per row of x, in chunks."""
    c2 = (c * c).sum(1)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        d = ((xs * xs).sum(1, keepdim=True) - 2 * xs @ c.T + c2).clamp_min_(0)
        dist[s:s + chunk], labels[s:s + chunk] = d.min(1)
    return labels, dist


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): indices [k] of the rows chosen as initial
    centroids; the first uniformly, each next with probability proportional to its squared
    distance to the nearest chosen one. Draws come from `generator` (a CPU torch.Generator)."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator).item())
    chosen = [first]
    d2 = ((x - x[first]) ** 2).sum(1).clamp_min(0)
    for _ in range(1, k):
        p = d2.double().cpu()
        if p.sum() <= 0:  # fewer distinct points than k: any row
            nxt = int(torch.randint(n, (1,), generator=generator).item())
        else:
            nxt = int(torch.multinomial(p / p.sum(), 1, generator=generator).item())
        chosen.append(nxt)
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    return torch.tensor(chosen, dtype=torch.long, device=x.device)


def lloyd(x: torch.Tensor, centroids: torch.Tensor, max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Lloyd iterations from the given centroids: assign (nearest, first on ties), move each
    centroid to its members' mean (an empty cluster keeps its centroid), until the assignment no
    longer changes or max_iter updates. Returns (labels [N], centroids [k, D], inertia)."""
    c = centroids.clone()
    k = c.shape[0]
    labels, _ = _sq_dists_argmin(x, c)
    for _ in range(max_iter):
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
        new, _ = _sq_dists_argmin(x, c)
        if torch.equal(new, labels):
            break
        labels = new
    _, dist = _sq_dists_argmin(x, c)
    return labels, c, float(dist.sum())


def kmeans(x: torch.Tensor, k: int, seed: int, n_init: int = 3, max_iter: int = 100,
           cosine: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of the rows of x [N, D]: `n_init` runs of k-means++ seeding (one
    torch.Generator(seed) drawn in turn) + `lloyd`; the run of lowest inertia (first on ties) wins.

    With `cosine` the rows are L2-normalised first and clustered by Euclidean distance (as Amir et
    al. do with faiss); centroids are plain means, not re-normalised. Returns (labels [N] long,
    centroids [k, D] float32, in the normalised space when cosine)."""
    if x.ndim != 2 or x.shape[0] == 0:
        raise UserError(f"kmeans wants a non-empty [N, D] tensor; got {tuple(x.shape)}")
    if not 1 <= k <= x.shape[0]:
        raise UserError(f"kmeans: k = {k} clusters for {x.shape[0]} rows; pass 1 <= k <= N")
    x = x.to(torch.float32)
    if cosine:
        x = F.normalize(x, dim=1)
    gen = torch.Generator().manual_seed(int(seed))
    inits = torch.stack([x[kmeans_plusplus(x, k, gen)] for _ in range(max(1, n_init))])
    labels, c, inertia = _lloyd_batch(x, inits, max_iter)
    i = int(torch.argmin(inertia))  # lowest inertia, first on ties
    return labels[i], c[i]


def _lloyd_batch(x: torch.Tensor, centroids: torch.Tensor, max_iter: int = 100
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`lloyd` from B initialisations [B, k, D] at once: each run is updated until its assignment no longer changes
    (then it stays at its fixed point) or max_iter updates. Returns (labels [B, N], centroids [B, k, D],
    inertia [B])."""
    c = centroids.clone()
    b, k, _ = c.shape
    x2 = (x * x).sum(1)

    def assign(c):
        d = (x2[None, :, None] - 2 * torch.einsum("nd,bkd->bnk", x, c) + (c * c).sum(2)[:, None, :]).clamp_min_(0)
        return d.min(2)

    dist, labels = assign(c)
    active = torch.ones(b, dtype=torch.bool, device=x.device)
    offsets = (torch.arange(b, device=x.device) * k)[:, None]
    for _ in range(max_iter):
        flat = (labels + offsets).reshape(-1)
        sums = torch.zeros(b * k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, flat, x.repeat(b, 1))
        counts = torch.bincount(flat, minlength=b * k).to(x.dtype)
        new_c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c.reshape(b * k, -1)).reshape(c.shape)
        c = torch.where(active[:, None, None], new_c, c)
        dist, new = assign(c)
        changed = (new != labels).any(1) & active
        labels = torch.where(active[:, None], new, labels)
        active = changed
        if not bool(active.any()):
            break
    dist, _ = assign(c)
    return labels, c, dist.sum(1)


def border_ring(grid_hw: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """[h * w] bool: tokens on the outer ring (first/last row, first/last column) of a row-major grid."""
    h, w = grid_hw
    ring = torch.zeros(h, w, dtype=torch.bool, device=device)
    ring[0, :] = ring[-1, :] = True
    ring[:, 0] = ring[:, -1] = True
    return ring.reshape(-1)


def cosegment(features: Sequence[torch.Tensor], grids_hw: Sequence[tuple[int, int]] | None = None,
              n_clusters: int = 6, vote_fraction: float = 1.0, min_fraction: float = 0.02, seed: int = 0,
              background_prior: bool = True) -> list[torch.Tensor]:
    """Co-segment a set of images from their token features (features[i] [n_i, D], row-major
    grids grids_hw[i]); returns per image an [n_i] bool foreground mask.

    After Amir et al. 2021 ("Deep ViT Features as Dense Visual Descriptors", co-segmentation;
    github ShirAmir/dino-vit-features, cosegmentation.py). KEPT: the descriptors of ALL images are
    clustered jointly by k-means on L2-normalised features, and a cluster is foreground when it is
    voted for by at least ceil(vote_fraction * n_images) images. DIFFERS: (1) Amir et al. vote with
    the CLS-attention saliency (an image votes for a cluster whose mean saliency > 0.065); a
    language model has no CLS token, so here an image votes for a cluster that covers >=
    `min_fraction` of its tokens ("present"); (2) their votes threshold is 75% of the images, the
    default here is all of them (vote_fraction=1.0); (3) the number of clusters is fixed
    (`n_clusters`) rather than picked by their elbow rule (0.975, 1..14 clusters, faiss, 10
    restarts of 300 iterations on every 100th descriptor): here 3 restarts on all descriptors;
    (4) no GrabCut refinement (the masks are per token); (5) `background_prior`: a cluster with
    more than half of its tokens on the outer ring of their grids is background (saliency's role
    of ruling out shared backgrounds). A set of one image has every present cluster in common."""
    if not features:
        return []
    if background_prior and grids_hw is None:
        raise UserError("cosegment: background_prior needs grids_hw (one (h, w) per image); pass "
                        "the grids or background_prior=False")
    sizes = [int(f.shape[0]) for f in features]
    if grids_hw is not None and (len(grids_hw) != len(features)
                                 or any(h * w != n for (h, w), n in zip(grids_hw, sizes))):
        raise UserError(f"cosegment: grids {list(grids_hw)} do not match the token counts {sizes}")
    x = torch.cat([f.to(torch.float32) for f in features])
    k = min(int(n_clusters), x.shape[0])
    labels, _ = kmeans(x, k, seed=seed, cosine=True)
    per_image = torch.split(labels, sizes)
    votes = torch.zeros(k, dtype=torch.long, device=labels.device)
    for lab, n in zip(per_image, sizes):
        frac = torch.bincount(lab, minlength=k).to(torch.float32) / max(n, 1)
        votes += (frac >= min_fraction).long()
    needed = math.ceil(len(features) * vote_fraction - 1e-9)
    common = votes >= needed
    if background_prior:
        ring = torch.cat([border_ring(g, labels.device) for g in grids_hw])
        total = torch.bincount(labels, minlength=k).to(torch.float32)
        on_ring = torch.bincount(labels[ring], minlength=k).to(torch.float32)
        common &= ~(on_ring > 0.5 * total)
    return [common[lab] for lab in per_image]


# ---- text-query segmentation --------------------------------------------------------------------


def query_scores(image_feats: torch.Tensor, query: torch.Tensor, how: str = "dot") -> torch.Tensor:
    """Score each image token [n, D] against a query vector [D]: "dot" or "cosine" -> [n] float32."""
    if how not in ("dot", "cosine"):
        raise UserError(f"query_scores: unknown how={how!r}; pass 'dot' or 'cosine'")
    f = image_feats.to(torch.float32)
    q = query.to(f.device, torch.float32).reshape(-1)
    if how == "cosine":
        f, q = F.normalize(f, dim=1), F.normalize(q, dim=0)
    return f @ q


def normalize_scores(scores: torch.Tensor) -> torch.Tensor:
    """Min-max scale one image's scores to [0, 1] (NaN stay NaN; a constant map becomes 0)."""
    s = scores.to(torch.float32)
    finite = ~torch.isnan(s)
    if not finite.any():
        return s.clone()
    lo, hi = s[finite].min(), s[finite].max()
    if hi <= lo:
        return torch.where(finite, torch.zeros_like(s), s)
    return (s - lo) / (hi - lo)


class ThresholdSearch:
    """Choose a score threshold on held-out images: `add` score maps and masks, then `best`.

    A pixel is predicted foreground when score >= threshold (NaN = no score = background).
    Per candidate, foreground intersection and union are accumulated over all images (ignore
    pixels excluded); `best` returns the candidate of highest accumulated IoU, the FIRST such
    candidate in the given order on ties (for the default ascending grid: the lowest threshold)."""

    def __init__(self, candidates=None) -> None:
        self.candidates = np.asarray(np.linspace(0, 1, 21) if candidates is None else candidates, dtype=np.float64)
        self.inter = np.zeros(len(self.candidates), dtype=np.int64)
        self.union = np.zeros(len(self.candidates), dtype=np.int64)
        self.n = 0

    def add(self, score_map, gt: np.ndarray) -> None:
        """Accumulate one image: score_map [H, W] float (NaN allowed), gt [H, W] uint8 with IGNORE."""
        s = score_map.detach().cpu().numpy() if isinstance(score_map, torch.Tensor) else np.asarray(score_map)
        s = s.astype(np.float64)
        gt = np.asarray(gt)
        if s.shape != gt.shape:
            raise UserError(f"score map {s.shape} and mask {gt.shape} differ; resize the scores to the mask")
        valid = gt != IGNORE
        fg = (gt == 1) & valid
        scored = valid & ~np.isnan(s)
        all_sorted = np.sort(s[scored])
        fg_sorted = np.sort(s[fg & scored])
        c = self.candidates
        pred = len(all_sorted) - np.searchsorted(all_sorted, c, side="left")  # count of s >= t
        inter = len(fg_sorted) - np.searchsorted(fg_sorted, c, side="left")
        self.inter += inter
        self.union += pred + int(fg.sum()) - inter
        self.n += 1

    def ious(self) -> np.ndarray:
        """Accumulated foreground IoU per candidate (1 where the union is empty)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.union > 0, self.inter / np.maximum(self.union, 1), 1.0)

    def best(self) -> tuple[float, float]:
        """(threshold, accumulated foreground IoU at it); the first best candidate on ties."""
        if not self.n:
            raise UserError("ThresholdSearch.best: no held-out image was added; add calibration images first")
        ious = self.ious()
        i = int(np.argmax(ious))
        return float(self.candidates[i]), float(ious[i])


# ---- semantic correspondence ---------------------------------------------------------------------


def nearest_neighbours(src: torch.Tensor, tgt: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """For each row of src [n, D], the index of the most cosine-similar row of tgt [m, D] (the
    first on ties) -> [n] long; similarities are computed `chunk` source rows at a time."""
    if src.shape[1] != tgt.shape[1]:
        raise UserError(f"nearest_neighbours: source dim {src.shape[1]} != target dim {tgt.shape[1]}")
    t = F.normalize(tgt.to(torch.float32), dim=1)
    out = torch.empty(src.shape[0], dtype=torch.long, device=src.device)
    for s in range(0, src.shape[0], chunk):
        q = F.normalize(src[s:s + chunk].to(t.device, torch.float32), dim=1)
        out[s:s + chunk] = (q @ t.T).argmax(1).to(src.device)
    return out


# ---- temporal correspondence: DINO's label propagation -------------------------------------------


def labels_to_onehot(label_map_tokens: torch.Tensor, n_classes: int) -> torch.Tensor:
    """[n] long labels -> [n, n_classes] float32 one-hot; labels outside 0..n_classes-1 (void 255)
    get an all-zero row (DINO's to_one_hot would add channels up to the largest label instead)."""
    lab = label_map_tokens.reshape(-1).long()
    ok = (lab >= 0) & (lab < n_classes)
    out = torch.zeros(lab.shape[0], n_classes, dtype=torch.float32, device=lab.device)
    out[ok] = F.one_hot(lab[ok], n_classes).to(torch.float32)
    return out


def downsample_labels(label_map: np.ndarray, grid_hw: tuple[int, int]) -> torch.Tensor:
    """A label map [H, W] resized to the token grid by nearest neighbour, as DINO reads the first
    frame (PIL `resize(..., NEAREST)`), -> [h * w] long, row-major."""
    from PIL import Image

    h, w = grid_hw
    small = Image.fromarray(np.asarray(label_map, dtype=np.uint8)).resize((w, h), Image.NEAREST)
    return torch.from_numpy(np.asarray(small, dtype=np.int64).reshape(-1).copy())


def norm_mask(mask: torch.Tensor) -> torch.Tensor:
    """DINO's norm_mask: each channel of [C, H, W] with a positive max is min-max scaled to [0, 1]
    (a constant positive channel, which DINO turns into NaN, becomes 0). Returns a new tensor."""
    out = mask.clone()
    flat = out.reshape(out.shape[0], -1)
    lo, hi = flat.min(1).values, flat.max(1).values
    rng = hi - lo
    scale = (hi > 0)
    norm = torch.where(rng[:, None] > 0, (flat - lo[:, None]) / rng.clamp_min(1e-30)[:, None], torch.zeros_like(flat))
    flat[scale] = norm[scale]
    return out


def neighbourhood_mask(grid_hw: tuple[int, int], radius: int, rows: torch.Tensor | None = None,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """DINO's restrict_neighborhood: [n_source, len(rows)] float, 1 where the source token lies in
    the (2 radius + 1)^2 square window (grid units, clipped at the edges) around the target token
    (rows: target token indices, default all)."""
    h, w = grid_hw
    n = h * w
    idx = torch.arange(n, device=device)
    rows = idx if rows is None else rows.to(device)
    si, sj = idx // w, idx % w
    ti, tj = rows // w, rows % w
    near = ((si[:, None] - ti[None, :]).abs() <= radius) & ((sj[:, None] - tj[None, :]).abs() <= radius)
    return near.to(torch.float32)


def _check_context(target, context_feats, context_labels, grid_hw):
    n = target.shape[0]
    if grid_hw[0] * grid_hw[1] != n:
        raise UserError(f"propagate: grid {tuple(grid_hw)} does not hold the target's {n} tokens")
    if not context_feats or len(context_feats) != len(context_labels):
        raise UserError(f"propagate: {len(context_feats)} context frames with {len(context_labels)} "
                        "label maps; pass one label map per context frame (at least one)")
    for f, lab in zip(context_feats, context_labels):
        if f.shape != target.shape or lab.shape[0] != n:
            raise UserError(f"propagate: a context frame has {tuple(f.shape)} features / "
                            f"{tuple(lab.shape)} labels for a target of {tuple(target.shape)}; "
                            "all frames must share one token grid")


def propagate(target: torch.Tensor, context_feats: Sequence[torch.Tensor], context_labels: Sequence[torch.Tensor],
              grid_hw: tuple[int, int], topk: int = 5, radius: int = 12, temperature: float = 0.1,
              chunk: int = 1024) -> torch.Tensor:
    """DINO's label_propagation (facebookresearch/dino, eval_video_segmentation.py), chunked over
    target tokens: soft labels [n, C] of the target frame [n, D] from context frames' features
    [n, D] and soft labels [n, C].

    For a target token t and every context token s of every context frame: affinity
    exp(cos(t, s) / temperature), zero outside the square window |di|, |dj| <= radius of the grid
    (no window when radius <= 0); keep the affinities >= the topk-th largest over ALL context
    tokens (ties kept), normalise them to sum 1, and average the context labels with them. The
    exponent is shifted by each target's best in-window similarity, which cancels in the
    normalisation (DINO's exp without it overflows for temperature < ~0.0125). Peak memory is
    O(chunk * n_context * n)."""
    _check_context(target, context_feats, context_labels, grid_hw)
    n = target.shape[0]
    dev = target.device
    src = F.normalize(torch.cat([f.to(dev, torch.float32) for f in context_feats]), dim=1)  # [nc*n, D]
    labs = torch.cat([lab.to(dev, torch.float32) for lab in context_labels])  # [nc*n, C]
    tgt = F.normalize(target.to(torch.float32), dim=1)
    n_ctx = len(context_feats)
    out = torch.empty(n, labs.shape[1], dtype=torch.float32, device=dev)
    k = min(int(topk), src.shape[0])
    for s in range(0, n, chunk):
        rows = torch.arange(s, min(s + chunk, n), device=dev)
        sim = src @ tgt[rows].T  # [nc*n, c]
        if 0 < radius < max(grid_hw) - 1:  # a window that covers the whole grid masks nothing
            mask = neighbourhood_mask(grid_hw, radius, rows, dev).repeat(n_ctx, 1)
            shift = sim.masked_fill(mask == 0, -math.inf).max(0).values
            aff = torch.exp((sim - shift) / temperature) * mask
        else:
            aff = torch.exp((sim - sim.max(0).values) / temperature)
        kth = torch.topk(aff, k, dim=0).values.min(0).values
        aff = torch.where(aff < kth, torch.zeros_like(aff), aff)
        aff = aff / aff.sum(0, keepdim=True)
        out[rows] = (labs.T @ aff).T
    return out


def propagate_dense(target: torch.Tensor, context_feats: Sequence[torch.Tensor],
                    context_labels: Sequence[torch.Tensor], grid_hw: tuple[int, int], topk: int = 5,
                    radius: int = 12, temperature: float = 0.1) -> torch.Tensor:
    """The same propagation with one full affinity tensor [n_context, n, n], written as DINO's
    label_propagation (bmm, mask multiply, topk over all context tokens, column normalisation):
    the reference `propagate` is checked against, and the baseline for memory and speed."""
    _check_context(target, context_feats, context_labels, grid_hw)
    h, w = grid_hw
    dev = target.device
    n_ctx = len(context_feats)
    feat_tar = F.normalize(target.to(torch.float32), dim=1, p=2)  # h*w x dim
    feat_sources = F.normalize(torch.stack([f.to(dev, torch.float32).T for f in context_feats]), dim=1, p=2)
    feat_tar = feat_tar.unsqueeze(0).repeat(n_ctx, 1, 1)
    aff = torch.exp(torch.bmm(feat_tar, feat_sources) / temperature)  # n_ctx x tar x src
    if radius > 0:
        mask = neighbourhood_mask(grid_hw, radius, device=dev).T  # tar x src
        aff *= mask.unsqueeze(0).repeat(n_ctx, 1, 1)
    aff = aff.transpose(2, 1).reshape(-1, h * w)  # n_ctx*src x tar
    tk_val, _ = torch.topk(aff, dim=0, k=min(int(topk), aff.shape[0]))
    tk_val_min, _ = torch.min(tk_val, dim=0)
    aff[aff < tk_val_min] = 0
    aff = aff / torch.sum(aff, keepdim=True, axis=0)
    segs = torch.cat([lab.to(dev, torch.float32) for lab in context_labels])  # n_ctx*n x C
    return torch.mm(segs.T, aff).T


class ClipPropagator:
    """Propagate a clip's first-frame labels frame by frame, with DINO's context queue.

    The context of each step is the first frame (its features and one-hot labels, always) plus the
    `n_last` most recent propagated frames, oldest first, each with the SOFT label map that
    `propagate` returned for it (DINO queues `frame_tar_avg` before upsampling, norm_mask and
    argmax). n_last = 0 keeps the first frame only (DINO's queue.Queue(0) would be unbounded)."""

    def __init__(self, first_labels: torch.Tensor, first_feats: torch.Tensor, grid_hw: tuple[int, int],
                 n_last: int = 7, **propagate_kwargs) -> None:
        if n_last < 0:
            raise UserError(f"ClipPropagator: n_last = {n_last}; pass 0 or more previous frames")
        self.first = (first_feats, first_labels.to(torch.float32))
        self.grid_hw = tuple(grid_hw)
        self.n_last = int(n_last)
        self.kwargs = propagate_kwargs
        self.queue: deque[tuple[torch.Tensor, torch.Tensor]] = deque()

    def context(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (features, labels) frames the next step reads: first frame, then the queue."""
        return [self.first, *self.queue]

    def step(self, target_feats: torch.Tensor) -> torch.Tensor:
        """Soft labels [n, C] of the next frame; the frame then joins the queue."""
        ctx = self.context()
        out = propagate(target_feats, [f for f, _ in ctx], [lab for _, lab in ctx], self.grid_hw, **self.kwargs)
        if self.n_last:
            if len(self.queue) == self.n_last:
                self.queue.popleft()
            self.queue.append((target_feats, out.clone()))
        return out


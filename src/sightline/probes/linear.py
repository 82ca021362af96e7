"""Multinomial logistic-regression probes in torch: many sites (and label sets) fitted at once,
full batch, L2 strength chosen on a validation split.

The objective per probe is scikit-learn's: mean cross-entropy + l2 / 2 * ||W||^2 on standardised
features, intercept unpenalised (sklearn's C = 1 / (l2 * n_train)). It is solved by L-BFGS, after
reductions that change nothing about the optimum:

- Rotation to the principal axes of the training features (eigh of the n x n Gram matrix when
  n <= d, else of the d x d covariance; axes with variance below 1e-6 of the largest are dropped).
  The optimal W lies in the span of the training rows, so when n < d the problem shrinks from d
  to n dimensions; and in this basis the Hessian of the loss is close to diagonal,
  (c_k * s_j^2 / n + l2) for axis j and class k, where c_k is the mean of p_k(1 - p_k). That
  diagonal, rescaled by the newest curvature pair, is the L-BFGS initial Hessian (a Jacobi
  preconditioner), so a fit takes about ten iterations, not hundreds.
- Warm starts along the L2 path, strong to weak, keeping the L-BFGS memory (its curvature pairs
  are corrected exactly for the change of penalty).

Every batch member (site x label set) has its own line search and stopping rule: the estimated
gap to the optimum, -g.d / 2 for the L-BFGS direction d, at most tol * objective. Sites whose
members have all stopped leave the batch, so the cost follows the slowest site only while it runs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sightline.errors import UserError

DEFAULT_L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
MAX_ROTATE = 3072  # above this min(n, d) the eigendecomposition costs more than it saves
SMALL_WORK = 1e8  # B * n * min(n, d) * T * K below which a CPU fit runs on one thread


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto'/None -> cuda if available else cpu; otherwise the device asked for (sightline.runtime)."""
    from sightline.runtime import resolve_device as resolve

    return torch.device(resolve("auto" if device is None else str(device)))


@contextlib.contextmanager
def one_thread_if_small(device: torch.device, work: float):
    """Run a small CPU solve (work = B * n * min(n, d) * T * K below SMALL_WORK) on one thread.

    A small solve is many small ops: threads only add synchronisation, and on a busy machine
    (another job holding the cores) each OpenMP barrier can wait for a descheduled thread, which
    made fits 15-20x slower in our measurements."""
    if device.type != "cpu" or work >= SMALL_WORK or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def standardise_stats(x_bnd: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and population std over rows ([B, d] each); constant dims get std 1 (as sklearn)."""
    mean = x_bnd.mean(1)
    std = x_bnd.std(1, unbiased=False) if x_bnd.shape[1] > 1 else torch.ones_like(mean)
    std = torch.where(std > eps * mean.abs().clamp_min(1.0), std, torch.ones_like(std))
    return mean, std


class _Basis:
    """Orthonormal principal axes V [B, d, r] of the training rows X and the rotated training
    features Z = X V. In the Gram route (n <= d) V = X^T A with A = U / sqrt(eigenvalues) is never
    formed: other rows rotate as (x X^T) A and weights map back as X^T (A W), which costs n, not d,
    per output column."""

    def __init__(self, x_bnd: torch.Tensor, rotate: bool | None, rel_eps: float = 1e-6):
        b, n, d = x_bnd.shape
        if rotate is None:
            rotate = min(n, d) <= MAX_ROTATE
        self.x = self.a = self.v = None
        if not rotate:
            self.z = x_bnd
        elif n <= d:
            gram = torch.bmm(x_bnd, x_bnd.transpose(1, 2))
            evals, u = torch.linalg.eigh(gram.double())
            keep = evals > rel_eps * evals[:, -1:].clamp_min(1e-30)
            r = int(keep.sum(1).max())
            evals, u, keep = evals[:, -r:].flip(-1), u[:, :, -r:].flip(-1), keep[:, -r:].flip(-1)
            root = torch.where(keep, evals.clamp_min(1e-300).sqrt(), torch.zeros_like(evals))
            self.x = x_bnd
            self.a = torch.where(keep[:, None, :], u / root.clamp_min(1e-300)[:, None, :], 0.0).to(x_bnd.dtype)
            self.z = (u * root[:, None, :]).to(x_bnd.dtype)  # = X V, from the eigendecomposition
        else:
            cov = torch.bmm(x_bnd.transpose(1, 2), x_bnd)
            evals, vv = torch.linalg.eigh(cov.double())
            keep = evals > rel_eps * evals[:, -1:].clamp_min(1e-30)
            r = int(keep.sum(1).max())
            # the same width for every member: dropped axes become zero columns (their weights stay 0)
            vv = (vv * keep.to(vv.dtype)[:, None, :])[:, :, -r:].flip(-1)
            self.v = vv.to(x_bnd.dtype).contiguous()
            self.z = torch.bmm(x_bnd, self.v)
        self.s2 = (self.z * self.z).sum(1)  # [B, r]

    def rotate(self, x_bnd: torch.Tensor) -> torch.Tensor:
        """Other rows [B, m, d] in the rotated basis [B, m, r]."""
        if self.a is not None:
            return torch.bmm(torch.bmm(x_bnd, self.x.transpose(1, 2)), self.a)
        return x_bnd if self.v is None else torch.bmm(x_bnd, self.v)

    def unrotate(self, w_brk: torch.Tensor) -> torch.Tensor:
        """Weights in the rotated basis [B, r, ...] back to feature space [B, d, ...]."""
        shape = w_brk.shape
        flat = w_brk.reshape(shape[0], shape[1], -1)
        if self.a is not None:
            out = torch.bmm(self.x.transpose(1, 2), torch.bmm(self.a, flat))
        elif self.v is not None:
            out = torch.bmm(self.v, flat)
        else:
            return w_brk
        return out.reshape(shape[0], out.shape[1], *shape[2:])


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-member inner products of [B, r+1, T, K] tensors -> [B, T]."""
    return (a * b).sum((1, 3))


class _Objective:
    """Mean cross-entropy + l2/2 ||W||^2 for B sites x T label sets; theta is [B, r+1, T, K] (last row: bias)."""

    def __init__(self, z: torch.Tensor, y_tn: torch.Tensor, n_classes: int):
        self.z = z  # [B, n, r]
        self.n = z.shape[1]
        self.t = y_tn.shape[0]
        self.k = n_classes
        self.y_idx = y_tn.t().contiguous()  # [n, T]
        self.onehot = torch.nn.functional.one_hot(self.y_idx, n_classes).to(z.dtype)  # [n, T, K]

    def select(self, keep: torch.Tensor) -> None:
        self.z = self.z.index_select(0, keep)

    def __call__(self, theta: torch.Tensor, l2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(f [B, T], gradient [B, r+1, T, K], curvature c [B, T, K] = mean p(1 - p))."""
        b, r1, t, k = theta.shape
        w = theta[:, :-1].reshape(b, r1 - 1, t * k)
        logits = torch.baddbmm(theta[:, -1].reshape(b, 1, t * k), self.z, w).view(b, self.n, t, k)
        lse = torch.logsumexp(logits, -1, keepdim=True)
        true = (logits * self.onehot).sum(-1)  # [B, n, T]
        ce = (lse[..., 0] - true).mean(1)
        wsq = (theta[:, :-1] ** 2).sum((1, 3))
        f = ce + 0.5 * l2[:, None] * wsq
        p = torch.exp(logits.sub_(lse))  # probabilities, in place of the logits
        curv = (p * (1 - p)).mean(1)
        p.sub_(self.onehot).div_(self.n)  # dCE/dlogits
        g_w = torch.bmm(self.z.transpose(1, 2), p.view(b, self.n, t * k)).view(b, r1 - 1, t, k)
        g_w += l2[:, None, None, None] * theta[:, :-1]
        grad = torch.cat([g_w, p.sum(1)[:, None]], 1)
        return f, grad, curv


@dataclass
class PathResult:
    """What `fit_path` found per member (site b, label set t)."""

    theta: torch.Tensor  # [B, r+1, T, K] chosen solution (rotated basis; last row the bias)
    chosen: torch.Tensor  # [B, T] index into the grid
    val_accuracy: torch.Tensor  # [B, T, L]
    val_loss: torch.Tensor  # [B, T, L]
    train_loss: torch.Tensor  # [B, T, L]
    n_iter: torch.Tensor  # [B, T, L]
    converged: torch.Tensor  # [B, T, L] bool


def _lbfgs_phase(obj: _Objective, theta: torch.Tensor, l2v: float, s2: torch.Tensor, hist_s: torch.Tensor,
                 hist_y: torch.Tensor, hist_rho: torch.Tensor, tol: float, max_iter: int,
                 out_iter: torch.Tensor, out_conv: torch.Tensor) -> torch.Tensor:
    """Minimise every member at one L2 strength, in place (theta, the history, out_iter/out_conv
    [B, T]); returns the final objective [B, T]. Sites whose label sets have all stopped leave
    the working batch."""
    bsz, _, t, _ = theta.shape
    n = obj.n
    dev, dt = theta.device, theta.dtype
    m = hist_s.shape[0]
    members = torch.arange(bsz, device=dev)
    th = theta.clone()
    s2w = s2
    l2 = torch.full((bsz,), l2v, device=dev, dtype=dt)
    f, g, curv = obj(th, l2)
    f_end = f.clone()
    s_hist = list(hist_s.unbind(0))
    y_hist = list(hist_y.unbind(0))
    rho_hist = list(hist_rho.unbind(0))
    active = torch.ones(bsz, t, dtype=torch.bool, device=dev)
    n_it = torch.zeros(bsz, t, dtype=torch.long, device=dev)
    conv = torch.zeros(bsz, t, dtype=torch.bool, device=dev)

    def retire(local: torch.Tensor) -> None:
        gone = members[local]
        theta[gone] = th[local]
        f_end[gone] = f[local]
        for i in range(m):
            hist_s[i, gone] = s_hist[i][local]
            hist_y[i, gone] = y_hist[i][local]
            hist_rho[i, gone] = rho_hist[i][local]
        out_iter[gone.cpu()] = n_it[local].cpu()
        out_conv[gone.cpu()] = conv[local].cpu()

    while True:
        keep_b = active.any(1)
        if int(n_it.max()) >= max_iter:
            keep_b[:] = False
        if not keep_b.all():  # drop sites whose every label set has stopped
            retire(torch.nonzero(~keep_b)[:, 0])
            if not keep_b.any():
                return f_end
            kb = torch.nonzero(keep_b)[:, 0]
            members, th, f, g, curv, active, n_it, conv, l2, s2w = (
                a.index_select(0, kb) for a in (members, th, f, g, curv, active, n_it, conv, l2, s2w))
            obj.select(kb)
            s_hist = [a.index_select(0, kb) for a in s_hist]
            y_hist = [a.index_select(0, kb) for a in y_hist]
            rho_hist = [a.index_select(0, kb) for a in rho_hist]
        # L-BFGS two-loop recursion; the Jacobi preconditioner is the initial Hessian
        q = g.clone()
        alphas = []
        for s_i, y_i, rho_i in zip(reversed(s_hist), reversed(y_hist), reversed(rho_hist)):
            a_i = rho_i * _dot(s_i, q)
            q -= a_i[:, None, :, None] * y_i
            alphas.append(a_i)
        h0 = torch.empty_like(q)
        c = curv.clamp_min(1e-6)  # [B, T, K]
        h0[:, :-1] = 1.0 / (c[:, None] * (s2w / n)[:, :, None, None] + l2[:, None, None, None])
        h0[:, -1] = 1.0 / c
        if rho_hist:  # rescale the diagonal to the newest pair's curvature: gamma = s.y / (y D y)
            yDy = _dot(y_hist[-1] * h0, y_hist[-1])
            sy_last = torch.where(rho_hist[-1] != 0, 1.0 / rho_hist[-1].clamp_min(1e-30), torch.zeros_like(yDy))
            gamma = torch.where((rho_hist[-1] != 0) & (yDy > 0), sy_last / yDy.clamp_min(1e-30), torch.ones_like(yDy))
            h0 *= gamma[:, None, :, None]
        q *= h0
        for s_i, y_i, rho_i, a_i in zip(s_hist, y_hist, rho_hist, reversed(alphas)):
            beta = rho_i * _dot(y_i, q)
            q += (a_i - beta)[:, None, :, None] * s_i
        direction = q.neg_()
        slope = _dot(g, direction)
        bad = slope >= 0  # not a descent direction (should not happen): fall back to the preconditioned gradient
        if bad.any():
            direction = torch.where(bad[:, None, :, None], -h0 * g, direction)
            slope = _dot(g, direction)
        # -slope estimates twice the gap to the optimum (exact for a quadratic with the true Hessian)
        done_now = active & (-slope <= 2 * tol * f.abs().clamp_min(1e-12))
        conv |= done_now
        active &= ~done_now
        if not active.any():
            continue
        direction *= active[:, None, :, None]
        slope = slope * active
        # backtracking (Armijo) line search, per member
        was_active = active.clone()
        step = torch.ones_like(f)
        pending = active.clone()
        new_th, new_f, new_g, new_c = th, f, g, curv
        for _ls in range(30):
            trial = th + step[:, None, :, None] * direction
            ft, gt, ct = obj(trial, l2)
            ok = pending & (ft <= f + 1e-4 * step * slope) & torch.isfinite(ft)
            if ok.any():
                m4 = ok[:, None, :, None]
                new_th = torch.where(m4, trial, new_th)
                new_g = torch.where(m4, gt, new_g)
                new_f = torch.where(ok, ft, new_f)
                new_c = torch.where(ok[..., None], ct, new_c)
            pending &= ~ok
            if not pending.any():
                break
            # backtrack by quadratic interpolation, kept within [0.1, 0.5] of the last step
            denom = 2 * (ft - f - step * slope)
            interp = torch.where(denom > 0, -slope * step * step / denom.clamp_min(1e-30), 0.5 * step)
            step = torch.where(pending, torch.minimum(torch.maximum(interp, 0.1 * step), 0.5 * step), step)
        stalled = pending  # no decrease found: at the precision limit
        conv |= stalled
        active &= ~stalled
        s_new = new_th - th
        y_new = new_g - g
        sy = _dot(s_new, y_new)
        rho = torch.where(sy > 1e-10 * _dot(y_new, y_new).clamp_min(1e-30), 1.0 / sy.clamp_min(1e-30),
                          torch.zeros_like(sy))
        upd = rho != 0  # members without a new pair keep their history as it is
        if upd.all():
            s_hist = s_hist[1:] + [s_new]
            y_hist = y_hist[1:] + [y_new]
            rho_hist = rho_hist[1:] + [rho]
        elif upd.any():
            u4 = upd[:, None, :, None]
            s_hist = [torch.where(u4, b, a) for a, b in zip(s_hist, s_hist[1:] + [s_new])]
            y_hist = [torch.where(u4, b, a) for a, b in zip(y_hist, y_hist[1:] + [y_new])]
            rho_hist = [torch.where(upd, b, a) for a, b in zip(rho_hist, rho_hist[1:] + [rho])]
        th, f, g, curv = new_th, new_f, new_g, new_c
        n_it += was_active.long()


def fit_path(z: torch.Tensor, y_tn: torch.Tensor, zv: torch.Tensor | None, yv_tn: torch.Tensor | None,
             s2: torch.Tensor, l2_grid: Sequence[float], n_classes: int, max_iter: int = 500, tol: float = 1e-4,
             history: int = 10, progress: bool = False) -> PathResult:
    """Fit every member along the L2 path (strong to weak, warm-started) with preconditioned L-BFGS
    and keep, per member, the solution with the best validation accuracy (ties: lower validation
    loss). z [B, n, r] rotated train features, y_tn [T, n]; zv/yv_tn the validation set (None: the
    grid must hold one value)."""
    from tqdm.auto import tqdm

    grid = sorted((float(x) for x in l2_grid), reverse=True)
    if not grid or any(x < 0 or not math.isfinite(x) for x in grid):
        raise UserError(f"l2 grid must hold non-negative numbers, got {list(l2_grid)}")
    if (zv is None or zv.shape[1] == 0) and len(grid) > 1:
        raise UserError("choosing L2 from a grid needs a validation split; "
                        "give one L2 value or a validation fraction > 0")
    bsz, n, r = z.shape
    t = y_tn.shape[0]
    k = n_classes
    dev, dt = z.device, z.dtype
    n_l2 = len(grid)
    theta = torch.zeros(bsz, r + 1, t, k, device=dev, dtype=dt)
    best = theta.clone()
    best_acc = torch.full((bsz, t), -1.0, device=dev, dtype=torch.float64)
    best_loss = torch.full((bsz, t), math.inf, device=dev, dtype=torch.float64)
    chosen = torch.zeros(bsz, t, dtype=torch.long, device=dev)
    out_acc = torch.full((bsz, t, n_l2), math.nan, dtype=torch.float64)
    out_vloss = torch.full((bsz, t, n_l2), math.nan, dtype=torch.float64)
    out_tloss = torch.full((bsz, t, n_l2), math.nan, dtype=torch.float64)
    out_iter = torch.zeros(bsz, t, n_l2, dtype=torch.long)
    out_conv = torch.zeros(bsz, t, n_l2, dtype=torch.bool)
    # L-BFGS memory, kept across the path: m pairs per member, newest last (rho = 0 marks an empty slot)
    m = max(int(history), 1)
    hist_s = torch.zeros(m, bsz, r + 1, t, k, device=dev, dtype=dt)
    hist_y = torch.zeros_like(hist_s)
    hist_rho = torch.zeros(m, bsz, t, device=dev, dtype=dt)
    prev_l2 = None
    bar = tqdm(total=n_l2, desc="probe l2 path", disable=not progress, dynamic_ncols=True, leave=False)
    for li, l2v in enumerate(grid):
        if prev_l2 is not None:
            # the pairs stay valid for the new strength once the penalty's exact change is put in
            hist_y[:, :, :-1] += (l2v - prev_l2) * hist_s[:, :, :-1]
            sy = (hist_s * hist_y).sum((2, 4))
            hist_rho = torch.where((hist_rho != 0) & (sy > 0), 1.0 / sy.clamp_min(1e-30), torch.zeros_like(sy))
        prev_l2 = l2v
        f_end = _lbfgs_phase(_Objective(z, y_tn, k), theta, l2v, s2, hist_s, hist_y, hist_rho, tol, max_iter,
                             out_iter[:, :, li], out_conv[:, :, li])
        out_tloss[:, :, li] = f_end.double().cpu()
        # score on the validation split and keep the best per member
        if zv is not None and zv.shape[1] > 0:
            vlog = logits_rotated(zv, theta)  # [B, nv, T, K]
            vacc = (vlog.argmax(-1) == yv_tn.t()[None]).double().mean(1)  # [B, T]
            vloss = (torch.logsumexp(vlog, -1) - vlog.gather(-1, yv_tn.t()[None, ..., None].expand(
                bsz, -1, -1, 1))[..., 0]).double().mean(1)
        else:
            vacc = torch.zeros(bsz, t, dtype=torch.float64, device=dev)
            vloss = torch.zeros(bsz, t, dtype=torch.float64, device=dev)
        out_acc[:, :, li] = vacc.cpu()
        out_vloss[:, :, li] = vloss.cpu()
        better = (vacc > best_acc + 1e-12) | ((vacc >= best_acc - 1e-12) & (vloss < best_loss))
        best = torch.where(better[:, None, :, None], theta, best)
        best_acc = torch.where(better, vacc, best_acc)
        best_loss = torch.where(better, vloss, best_loss)
        chosen = torch.where(better, torch.full_like(chosen, li), chosen)
        bar.update(1)
    bar.close()
    return PathResult(best, chosen.cpu(), out_acc, out_vloss, out_tloss, out_iter, out_conv)


def logits_rotated(z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Logits [B, n, T, K] of rotated features z [B, n, r] under theta [B, r+1, T, K]."""
    b, r1, t, k = theta.shape
    return torch.baddbmm(theta[:, -1].reshape(b, 1, t * k), z, theta[:, :-1].reshape(b, r1 - 1, t * k)).view(
        b, z.shape[1], t, k)


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int,
                     groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Split row indices into len(fractions) + 1 parts (the last one takes the rest), per class, seeded.

    Rows of the same group (e.g. tokens of one image, or questions about one image) stay in one
    part; a group's class is that of its first row. Each class keeps at least one group in the
    last part (training) when it has any."""
    labels = np.asarray(labels)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    uniq, first = np.unique(groups, return_index=True)
    g_label = labels[first]
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(g_label):
        gs = uniq[g_label == c]
        gs = gs[rng.permutation(len(gs))]
        start = 0
        for i, frac in enumerate(fractions):
            take = int(round(frac * len(gs)))
            take = min(take, max(len(gs) - start - 1, 0))
            parts[i].append(gs[start : start + take])
            start += take
        parts[-1].append(gs[start:])
    out = []
    for p in parts:
        chosen_groups = np.concatenate(p) if p else np.zeros(0, dtype=groups.dtype)
        out.append(np.flatnonzero(np.isin(groups, chosen_groups)))
    return out


@dataclass
class LinearProbe:
    """One fitted probe: logits = ((x - mean) / std) @ weight.T + bias; weight [K, d] in standardised units."""

    weight: torch.Tensor  # [K, d]
    bias: torch.Tensor  # [K]
    mean: torch.Tensor  # [d]
    std: torch.Tensor  # [d]
    classes: list[str]
    l2: float
    meta: dict = field(default_factory=dict)

    def decision_function(self, acts_nd: torch.Tensor) -> torch.Tensor:
        """Logits [n, K] of raw activations [n, d] (or [n, *site_shape])."""
        x = acts_nd.reshape(len(acts_nd), -1).to(self.weight)
        return ((x - self.mean) / self.std) @ self.weight.T + self.bias

    def predict_proba(self, acts_nd: torch.Tensor) -> torch.Tensor:
        """Class probabilities [n, K]."""
        return torch.softmax(self.decision_function(acts_nd), -1)

    def predict(self, acts_nd: torch.Tensor) -> list[str]:
        """Predicted class names."""
        return [self.classes[i] for i in self.decision_function(acts_nd).argmax(-1).tolist()]

    def raw_weight(self) -> torch.Tensor:
        """[K, d] weights on raw activations (weight / std): the gradient of each logit."""
        return self.weight / self.std


class LogisticProbe:
    """Multinomial logistic regression for B feature sets at once (e.g. every layer of a site),
    with standardisation and the L2 strength chosen per member on a validation split.

    fit(X [B, n, d] or [n, d], y [n] or [T, n] class ids): T label sets (e.g. a task and its
    control) share the features and the basis; fitted arrays carry a leading T axis only when y
    was 2-D. Without X_val/y_val, a seeded stratified `val_frac` of the rows is held out.
    """

    def __init__(self, l2_grid: Sequence[float] = DEFAULT_L2_GRID, val_frac: float = 0.2, seed: int = 0,
                 max_iter: int = 500, tol: float = 1e-4, history: int = 10, standardise: bool = True,
                 rotate: bool | None = None, device: str | torch.device | None = "auto",
                 dtype: torch.dtype = torch.float32, progress: bool = False):
        self.l2_grid = tuple(float(x) for x in l2_grid)
        self.val_frac = val_frac
        self.seed = seed
        self.max_iter = max_iter
        self.tol = tol
        self.history = history
        self.standardise = standardise
        self.rotate = rotate
        self.device = resolve_device(device)
        self.dtype = dtype
        self.progress = progress

    # ------------------------------------------------------------------ fitting
    def _as_batch(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.dim() == 2:
            x = x[None]
        if x.dim() != 3:
            raise ValueError(f"features must be [n, d] or [B, n, d], got shape {tuple(x.shape)}")
        return x.to(self.device, self.dtype)

    def fit(self, X, y, X_val=None, y_val=None, n_classes: int | None = None) -> LogisticProbe:
        """Fit every member; returns self."""
        shape = torch.as_tensor(X).shape
        t = 1 if np.ndim(y) == 1 else np.shape(y)[0]
        work = (shape[0] if len(shape) == 3 else 1) * shape[-2] * min(shape[-2], shape[-1]) * t * (
            int(n_classes) if n_classes is not None else int(np.max(y)) + 1)
        with one_thread_if_small(self.device, work):
            return self._fit(X, y, X_val, y_val, n_classes)

    def _fit(self, X, y, X_val, y_val, n_classes: int | None) -> LogisticProbe:
        self._single_batch = torch.as_tensor(X).dim() == 2
        x = self._as_batch(X)
        y_t = torch.as_tensor(np.asarray(y), dtype=torch.long)
        self._single_task = y_t.dim() == 1
        y_t = y_t[None] if self._single_task else y_t
        if y_t.shape[1] != x.shape[1]:
            raise ValueError(f"labels have {y_t.shape[1]} rows but features have {x.shape[1]}")
        if X_val is None:
            if len(self.l2_grid) > 1 and self.val_frac > 0:
                val, tr = stratified_split(y_t[0].numpy(), [self.val_frac], self.seed)
                xv, yv = x[:, torch.from_numpy(val).to(self.device)], y_t[:, val]
                x, y_t = x[:, torch.from_numpy(tr).to(self.device)], y_t[:, tr]
            else:
                xv, yv = None, None
        else:
            xv = self._as_batch(X_val)
            yv = torch.as_tensor(np.asarray(y_val), dtype=torch.long)
            yv = yv[None] if yv.dim() == 1 else yv
        k = int(n_classes) if n_classes is not None else int(max(y_t.max(), -1 if yv is None else yv.max())) + 1
        self.n_classes = k
        if self.standardise:
            self.mean_, self.std_ = standardise_stats(x)
        else:
            self.mean_ = torch.zeros(x.shape[0], x.shape[2], device=self.device, dtype=self.dtype)
            self.std_ = torch.ones_like(self.mean_)
        xs = (x - self.mean_[:, None]) / self.std_[:, None]
        basis = _Basis(xs, self.rotate)
        zv = None
        if xv is not None:
            zv = basis.rotate((xv - self.mean_[:, None]) / self.std_[:, None])
        res = fit_path(basis.z, y_t.to(self.device), zv, None if yv is None else yv.to(self.device), basis.s2,
                       self.l2_grid, k, self.max_iter, self.tol, self.history, self.progress)
        grid = sorted(self.l2_grid, reverse=True)
        self.l2_path_ = grid
        w = basis.unrotate(res.theta[:, :-1])  # [B, d, T, K]
        self._coef = w.permute(2, 0, 3, 1).contiguous()  # [T, B, K, d]
        self._intercept = res.theta[:, -1].permute(1, 0, 2).contiguous()  # [T, B, K]
        self._l2 = torch.tensor(grid, dtype=torch.float64)[res.chosen.t()]  # [T, B]
        # public, sklearn-like: leading T / B axes only when y / X had them
        self.coef_ = self._squeeze(self._coef)
        self.intercept_ = self._squeeze(self._intercept)
        self.l2_ = self._squeeze(self._l2)
        self._path = {"val_top1": res.val_accuracy, "val_loss": res.val_loss, "train_objective": res.train_loss,
                      "n_iter": res.n_iter, "converged": res.converged}  # each [B, T, L]
        self.val_accuracy_ = self._squeeze(res.val_accuracy.permute(1, 0, 2))  # [T, B, L]
        self.val_loss_ = self._squeeze(res.val_loss.permute(1, 0, 2))
        self.train_loss_ = self._squeeze(res.train_loss.permute(1, 0, 2))
        self.n_iter_ = self._squeeze(res.n_iter.permute(1, 0, 2))
        self.converged_ = self._squeeze(res.converged.permute(1, 0, 2))
        self.n_train_ = int(x.shape[1])
        self.n_val_ = 0 if xv is None else int(xv.shape[1])
        return self

    # ------------------------------------------------------------------ prediction
    def _squeeze(self, a: torch.Tensor) -> torch.Tensor:
        if self._single_task:
            a = a[0]
            if self._single_batch:
                a = a[0]
        elif self._single_batch:
            a = a[:, 0]
        return a

    def decision_function(self, X) -> torch.Tensor:
        """Logits [T, B, n, K] (leading axes dropped as in fit)."""
        x = self._as_batch(X)
        xs = (x - self.mean_[:, None]) / self.std_[:, None]
        logits = torch.einsum("bnd,tbkd->tbnk", xs, self._coef) + self._intercept[:, :, None, :]
        return self._squeeze(logits)

    def predict_proba(self, X) -> torch.Tensor:
        """Probabilities, shaped as decision_function."""
        return torch.softmax(self.decision_function(X), -1)

    def predict(self, X) -> torch.Tensor:
        """Class ids [T, B, n] (leading axes dropped as in fit)."""
        return self.decision_function(X).argmax(-1)

    def score(self, X, y, k: int = 1) -> torch.Tensor:
        """Top-k accuracy per member ([T, B], leading axes dropped as in fit)."""
        from sightline.probes.metrics import topk_accuracy

        logits = self.decision_function(X)
        y_t = torch.as_tensor(np.asarray(y), dtype=torch.long, device=logits.device)
        return topk_accuracy(logits, y_t, k)

    def path(self, b: int = 0, t: int = 0) -> dict[str, list]:
        """The L2 path of member (b, t): strengths (strong to weak) and, per strength, validation top-1
        and loss, training objective, iterations and whether it converged."""
        out: dict[str, list] = {"l2": list(self.l2_path_)}
        for name, a in self._path.items():
            out[name] = [v.item() for v in a[b, t]]
        return out

    def probe(self, b: int = 0, t: int = 0, classes: Sequence[str] | None = None) -> LinearProbe:
        """Member (b, t) as a standalone LinearProbe (on CPU)."""
        names = list(classes) if classes is not None else [str(i) for i in range(self.n_classes)]
        l2 = float(self._l2[t, b])
        return LinearProbe(self._coef[t, b].cpu(), self._intercept[t, b].cpu(), self.mean_[b].cpu(),
                           self.std_[b].cpu(), names, l2,
                           {"n_train": self.n_train_, "n_val": self.n_val_,
                            "sklearn_C": 1.0 / (l2 * self.n_train_) if l2 > 0 else None})


def save_probes(path, probes: dict[str, LinearProbe], card: dict | None = None) -> None:
    """Write probes to one safetensors file: `{site}.weight` [K, d], `.bias`, `.mean`, `.std`
    (standardised units); classes and L2 per site go in the file's metadata (and the caller's card)."""
    import json

    from sightline.report.files import save_safetensors as save_file  # mode like every other file

    tensors = {}
    meta = {}
    for site, p in probes.items():
        for name in ("weight", "bias", "mean", "std"):
            tensors[f"{site}.{name}"] = getattr(p, name).detach().float().cpu().contiguous()
        meta[site] = {"classes": list(p.classes), "l2": p.l2, **p.meta}
    save_file(tensors, str(path), metadata={"probes": json.dumps(meta), "card": json.dumps(card or {})})


def load_probes(path) -> dict[str, LinearProbe]:
    """Read a file written by `save_probes` (or a run directory holding probes.safetensors)."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        p = p / "probes.safetensors"
    if not p.is_file():
        raise UserError(f"no probes at {p}: pass a probe run directory or its probes.safetensors")
    out = {}
    with safe_open(str(p), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("probes", "{}"))
        for site, m in meta.items():
            out[site] = LinearProbe(f.get_tensor(f"{site}.weight"), f.get_tensor(f"{site}.bias"),
                                    f.get_tensor(f"{site}.mean"), f.get_tensor(f"{site}.std"),
                                    list(m["classes"]), float(m["l2"]),
                                    {k: v for k, v in m.items() if k not in ("classes", "l2")})
    return out

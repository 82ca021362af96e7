"""Probe sweep speed: sightline's batched torch probes vs scikit-learn LogisticRegression(lbfgs).

Both fit the same job on the same features and splits: for every layer, standardise on the
training split, fit multinomial logistic regression at every L2 strength of the grid
(sklearn C = 1 / (l2 * n_train)), keep the one with the best validation accuracy (ties: lower
validation loss), and report top-1 accuracy on the test split. sightline fits all layers in one
batched call; scikit-learn fits one (layer, C) at a time, as a user would (--sklearn-warm-start
lets it warm-start along the grid instead, as LogisticRegressionCV does internally).

Features: synthetic Gaussian class clusters of realistic shape and geometry (default: 6 layers,
d = 4096 as in LLaVA-NeXT-7B, 50 classes x 20 examples): per layer, class means in a random
64-dimensional subspace with a signal that grows with depth, plus anisotropic noise (power-law
spectrum, a few high-variance "outlier" dimensions, as residual streams have) under a random
rotation.
`--store DIR --label L` runs on a real ActivationStore instead (mean-pooled image tokens).

Last line: `speedup=<median over repeats of sklearn/sightline time> accuracy_gap=<mean over layers of
|test top-1 difference|, points>`. With --threads 1 (the default) the times are CPU times of this
process, which other jobs on a shared machine do not inflate; wall times are printed too.

    python benchmarks/probe_speed.py                      # synthetic, 1 thread each, 3 repeats (~5 min)
    python benchmarks/probe_speed.py --store runs/acts --label label
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def synthetic_layers(n_layers: int, d: int, n_classes: int, per_class: int, seed: int):
    """[L, n, d] float32 features and [n] labels: class clusters in anisotropic, rotated noise."""
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(seed)
    n = n_classes * per_class
    y = np.repeat(np.arange(n_classes), per_class)
    rot, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    spectrum = (torch.arange(1, d + 1, dtype=torch.float32) ** -0.5)
    spectrum[torch.randperm(d, generator=g)[:4]] *= 30.0  # a few outlier dimensions
    sub, _ = torch.linalg.qr(torch.randn(d, 64, generator=g))
    means = torch.randn(n_classes, 64, generator=g) @ sub.T  # [K, d] in a 64-dim subspace
    xs = []
    for layer in range(n_layers):
        snr = 0.02 + 0.10 * layer / max(n_layers - 1, 1)
        noise = torch.randn(n, d, generator=g) * spectrum
        xs.append(((noise + snr * means[torch.from_numpy(y)]) @ rot.T).float())
    return torch.stack(xs), y


def store_layers(path: str, label: str, sites: str | None):
    """Mean-pooled features of every chosen site of a store and the labels, as [L, n, d]."""
    import numpy as np
    import torch

    from sightline.probes.features import pool_features, resolve_labels
    from sightline.probes.run import select_sites
    from sightline.store import ActivationStore

    store = ActivationStore.open(path)
    chosen = select_sites(store, sites)
    labels = resolve_labels(store.examples, label)
    keep = [j for j, v in enumerate(labels) if v is not None]
    ids = [store.examples[j]["example"] for j in keep]
    feats = pool_features(store, chosen, ids)
    dims = {feats.acts[s].shape[1] for s in chosen}
    if len(dims) != 1:
        raise SystemExit(f"sites of different widths {sorted(dims)}: pass --sites of one kind")
    classes = sorted({labels[j] for j in keep})
    y = np.array([classes.index(labels[j]) for j in keep])
    return torch.stack([feats.acts[s] for s in chosen]), y


def run_sightline(x, y, splits, grid, tol, max_iter):
    """((wall s, CPU s), test top-1 per layer, chosen l2 per layer)."""
    import torch

    from sightline.probes.linear import LogisticProbe

    val, test, train = splits
    t0, c0 = time.perf_counter(), time.process_time()
    probe = LogisticProbe(l2_grid=grid, tol=tol, max_iter=max_iter, device="cpu")
    probe.fit(x[:, train], y[train], x[:, val], y[val])
    acc = probe.score(x[:, test], y[test])
    return ((time.perf_counter() - t0, time.process_time() - c0), [float(a) for a in acc],
            [float(v) for v in torch.atleast_1d(probe.l2_)])


def run_sklearn(x, y, splits, grid, tol, max_iter, warm_start):
    """((wall s, CPU s), test top-1 per layer, chosen l2 per layer)."""
    import warnings

    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    val, test, train = splits
    xn = x.numpy()
    accs, chosen = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    for layer in range(xn.shape[0]):
        scaler = StandardScaler().fit(xn[layer, train])
        xtr, xva, xte = (scaler.transform(xn[layer, idx]) for idx in (train, val, test))
        best = None
        model = LogisticRegression(max_iter=max_iter, tol=tol, warm_start=warm_start)
        for l2 in sorted(grid, reverse=True):
            model.set_params(C=1.0 / (l2 * len(train)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(xtr, y[train])
            acc = model.score(xva, y[val])
            loss = log_loss(y[val], model.predict_proba(xva), labels=np.arange(int(y.max()) + 1))
            if best is None or acc > best[0] + 1e-12 or (acc >= best[0] - 1e-12 and loss < best[1]):
                best = (acc, loss, l2, model.score(xte, y[test]))
        accs.append(best[3])
        chosen.append(best[2])
    return (time.perf_counter() - t0, time.process_time() - c0), accs, chosen


def main() -> None:
    """Run the benchmark and print the figures (last line: speedup=... accuracy_gap=...)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--store", default=None, help="use this ActivationStore's features instead of synthetic ones")
    p.add_argument("--label", default="label")
    p.add_argument("--sites", default=None)
    p.add_argument("--grid", default="1e-1,1e-2,1e-3,1e-4,1e-5", help="L2 strengths (sklearn C = 1/(l2 n_train))")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="sightline's stopping rule: estimated objective gap <= tol * objective")
    p.add_argument("--sklearn-tol", type=float, default=1e-8,
                   help="sklearn's stopping rule (max |gradient|). Its default 1e-4, and 1e-6 too, stop far "
                        "from the optimum at weak L2 on these features, so it picks another L2 and loses "
                        "accuracy (3.5 points on a layer at 1e-6): 1e-8 makes the comparison at equal accuracy")
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch and BLAS threads for both")
    p.add_argument("--sklearn-warm-start", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch
    from threadpoolctl import threadpool_limits

    from sightline.probes.linear import stratified_split

    torch.set_num_threads(a.threads)
    threadpool_limits(a.threads)
    grid = [float(v) for v in a.grid.split(",")]
    if a.store:
        x, y = store_layers(a.store, a.label, a.sites)
        what = f"store {a.store} label {a.label}"
    else:
        x, y = synthetic_layers(a.layers, a.dim, a.classes, a.per_class, a.seed)
        what = f"synthetic class clusters: {a.classes} classes x {a.per_class}"
    splits = stratified_split(y, [0.2, 0.2], a.seed)  # val, test, train
    print(f"features: {what}; {x.shape[0]} layers, n={x.shape[1]}, d={x.shape[2]}; "
          f"train/val/test {len(splits[2])}/{len(splits[0])}/{len(splits[1])}; L2 grid {grid}; "
          f"tol sightline {a.tol} sklearn {a.sklearn_tol}; {a.threads} thread(s)")
    ratios, gaps, max_gaps = [], [], []
    clock = 1 if a.threads == 1 else 0  # one thread each: CPU time, which a shared machine does not inflate
    for rep in range(a.repeats):
        t_ours, acc_ours, l2_ours = run_sightline(x, y, splits, grid, a.tol, a.max_iter)
        t_sk, acc_sk, l2_sk = run_sklearn(x, y, splits, grid, a.sklearn_tol, a.max_iter, a.sklearn_warm_start)
        diffs = [abs(u - v) * 100 for u, v in zip(acc_ours, acc_sk)]
        ratios.append(t_sk[clock] / t_ours[clock])
        gaps.append(statistics.mean(diffs))
        max_gaps.append(max(diffs))
        print(f"repeat {rep}: sightline {t_ours[0]:.2f} s wall / {t_ours[1]:.2f} s CPU, sklearn {t_sk[0]:.2f} s wall / "
              f"{t_sk[1]:.2f} s CPU, ratio {ratios[-1]:.1f}x ({'CPU' if clock else 'wall'} time)")
        print(f"  test top-1 per layer: sightline {[round(v, 3) for v in acc_ours]}")
        print(f"                        sklearn   {[round(v, 3) for v in acc_sk]}")
        print(f"  chosen l2: sightline {l2_ours} sklearn {l2_sk}; "
              f"|gap| mean {gaps[-1]:.2f} max {max_gaps[-1]:.2f} points")
    # accuracy_gap: mean over layers of |test top-1 difference| (worst repeat), in points
    print(f"speedup={statistics.median(ratios):.1f} accuracy_gap={max(gaps):.2f}")


if __name__ == "__main__":
    main()

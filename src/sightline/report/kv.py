"""Figures of a keys run: flagged share per layer and head, statistics over the token grid, the PCA of two images'
keys (Liu et al.'s Figure 4) and the effects of blocking."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sightline.report.files import save_figure as _save


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_flagged_share(shares: Mapping[str, np.ndarray], layers: Sequence[int], path: str | os.PathLike,
                       threshold: float) -> Path:
    """Heatmaps [layer x KV head] of the share of image keys flagged, one panel per key kind."""
    plt = _plt()
    kinds = list(shares)
    fig, axes = plt.subplots(1, len(kinds), figsize=(2.2 + 1.6 * len(kinds) * max(1, shares[kinds[0]].shape[1]) / 2,
                                                      1.2 + 0.35 * len(layers)), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        s = shares[kind]
        im = ax.imshow(s, vmin=0, vmax=max(float(s.max()), 1e-9), cmap="magma", aspect="auto")
        for (i, j), v in np.ndenumerate(s):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.5 * s.max() else "black")
        ax.set_xticks(range(s.shape[1]))
        ax.set_yticks(range(len(layers)), [str(L) for L in layers])
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_title(f"{kind}: share flagged", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle(f"input-agnostic keys (var_ratio < {threshold:g})", fontsize=10)
    return _save(fig, path)


def plot_grid_maps(stat_lhp: np.ndarray, flags_lhp: np.ndarray, layers: Sequence[int], grid_hw: tuple[int, int],
                   path: str | os.PathLike, title: str) -> Path:
    """One small map per (layer, KV head) of a statistic over the token grid; flagged tokens boxed."""
    plt = _plt()
    nL, nH = stat_lhp.shape[:2]
    fig, axes = plt.subplots(nL, nH, figsize=(1.9 * nH + 0.8, 1.8 * nL + 0.4), squeeze=False)
    vmax = float(np.quantile(stat_lhp, 0.99)) or 1.0
    for i in range(nL):
        for h in range(nH):
            ax = axes[i, h]
            im = ax.imshow(stat_lhp[i, h].reshape(grid_hw), vmin=0, vmax=vmax, cmap="viridis")
            for r, c in zip(*np.nonzero(flags_lhp[i, h].reshape(grid_hw))):
                ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=1.2))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"layer {layers[i]} head {h}", fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.03)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_key_pca(keys_npd: Mapping[str, np.ndarray], flags_p: Mapping[str, np.ndarray], path: str | os.PathLike,
                 title: str) -> Path:
    """Liu et al.'s Figure 4: every image key of two images projected on their first two principal components
    (image 1 circles, image 2 triangles), the flagged positions in red; one panel per key kind."""
    plt = _plt()
    kinds = list(keys_npd)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        x = np.asarray(keys_npd[kind], dtype=np.float64)  # [n_images, P, d]
        flat = x.reshape(-1, x.shape[-1])
        c = flat - flat.mean(0)
        _, _, vt = np.linalg.svd(c, full_matrices=False)
        z = (c @ vt[:2].T).reshape(x.shape[0], x.shape[1], 2)
        f = np.asarray(flags_p[kind], dtype=bool)
        for i, marker in zip(range(x.shape[0]), ("o", "^", "s", "D")):
            ax.scatter(z[i, ~f, 0], z[i, ~f, 1], s=14, marker=marker, c="tab:blue", alpha=0.6,
                       label=f"image {i + 1}" if i < 2 else None)
            ax.scatter(z[i, f, 0], z[i, f, 1], s=30, marker=marker, c="tab:red", edgecolors="black", linewidths=0.4,
                       label=f"image {i + 1}, flagged" if f.any() else None)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.set_title(kind, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _accuracy_bars(values: Mapping[str, Sequence[float]], labels: Sequence[str], path: str | os.PathLike,
                   title: str, width: float, errors: Mapping[str, np.ndarray] | None = None,
                   tick_kw: Mapping | None = None) -> Path:
    """Grouped accuracy bars: one group per label, one bar per condition ({condition: values in label order}),
    optional [2, n] error bars per condition."""
    plt = _plt()
    conds = list(values)
    w = 0.8 / len(conds)
    fig, ax = plt.subplots(figsize=(width, 3.4))
    for k, c in enumerate(conds):
        ax.bar(np.arange(len(labels)) + (k - (len(conds) - 1) / 2) * w, values[c], w, label=c,
               **({"yerr": errors[c], "capsize": 2} if errors else {}))
    ax.set_xticks(range(len(labels)), labels, **(tick_kw or {}))
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_accuracy(acc: Mapping[str, Mapping[str, float]], path: str | os.PathLike, title: str) -> Path:
    """Grouped bars: accuracy per question type under each condition (none, agnostic, random)."""
    types = list(next(iter(acc.values())))
    return _accuracy_bars({c: [a.get(t, np.nan) for t in types] for c, a in acc.items()}, types, path, title,
                          1.0 + 0.7 * len(types), tick_kw={"rotation": 35, "ha": "right", "fontsize": 8})


def plot_readout(iou: Mapping[str, Mapping[int, float]], path: str | os.PathLike, title: str) -> Path:
    """Foreground IoU of the per-token probe on image values per layer, one line per condition."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    for c, per in iou.items():
        ls = sorted(per)
        ax.plot(ls, [per[L] for L in ls], marker="o", label=c)
    ax.set_xlabel("layer (values)")
    ax.set_ylabel("foreground IoU")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_bench_accuracy(tasks: Mapping[str, Mapping[str, Mapping]], path: str | os.PathLike, title: str) -> Path:
    """Grouped bars with Wilson 95% error bars: benchmark accuracy per task (and all) under each condition;
    `tasks`: {task: {condition: {"accuracy", "ci": [lo, hi]}}} as `sightline.kv.bench.bench_study` gives."""
    names = list(tasks)
    conds = list(tasks[names[0]])
    acc = {c: np.array([tasks[t][c]["accuracy"] for t in names]) for c in conds}
    ci = {c: np.array([tasks[t][c]["ci"] for t in names], dtype=float) for c in conds}
    errors = {c: np.stack([acc[c] - ci[c][:, 0], ci[c][:, 1] - acc[c]]) for c in conds}
    return _accuracy_bars(acc, [f"{t}\n(n = {tasks[t][conds[0]]['n']})" for t in names], path, title,
                          1.4 + 0.8 * len(names), errors, {"fontsize": 8})

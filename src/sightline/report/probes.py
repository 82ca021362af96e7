"""Figure of a probe run: held-out accuracy against layer, one panel per site kind, with the
control task and chance."""

from __future__ import annotations

import os
from pathlib import Path

from sightline.report.files import save_figure


def _kind_layer(site: str) -> tuple[str, float]:
    kind, _, layer = site.partition(".")
    return kind, (float(layer) if layer.isdigit() else -0.5)


def plot_accuracy_vs_layer(metrics: dict, path: str | os.PathLike, title: str | None = None) -> Path:
    """Test top-1, top-5 and control-task top-1 against layer for every site kind of
    `metrics` (the run's metrics.json), with uniform and majority-class chance; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_kind: dict[str, list[tuple[float, dict]]] = {}
    for site, m in metrics["sites"].items():
        kind, layer = _kind_layer(site)
        by_kind.setdefault(kind, []).append((layer, m))
    kinds = sorted(by_kind)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds) + 0.6, 3.6), squeeze=False, sharey=True)
    chance = metrics.get("chance", {})
    n_classes = len(metrics.get("classes", []))
    for ax, kind in zip(axes[0], kinds):
        pts = sorted(by_kind[kind], key=lambda p: p[0])
        xs = [p[0] for p in pts]
        top1 = [p[1]["test"]["top1"] for p in pts]
        top5 = [p[1]["test"]["top5"] for p in pts]
        marker = "o" if len(xs) > 1 else "s"
        ax.plot(xs, top1, marker=marker, lw=2, color="tab:blue", label="test top-1")
        if n_classes > 5:
            ax.plot(xs, top5, marker=marker, lw=1.4, ls="--", color="tab:blue", alpha=0.7, label="test top-5")
        if chance.get("majority", 0) > chance.get("uniform", 0) + 0.05:  # imbalanced: recall averaged over classes
            ax.plot(xs, [p[1]["test"]["balanced"] for p in pts], marker=marker, lw=1.2, color="tab:green",
                    label="test balanced accuracy")
        ctrl = [p[1].get("control", {}).get("test_top1") for p in pts]
        if any(c is not None for c in ctrl):
            ax.plot(xs, [float("nan") if c is None else c for c in ctrl], marker=marker, lw=1.4, ls=":",
                    color="tab:red", label="control task top-1")
            ctrl_tr = [p[1].get("control", {}).get("train_top1") for p in pts]
            ax.plot(xs, [float("nan") if c is None else c for c in ctrl_tr], lw=0.9, ls=":", color="tab:red",
                    alpha=0.45, label="control task, train")
        if "uniform" in chance:
            ax.axhline(chance["uniform"], color="black", lw=0.8, label="chance (1/K)")
        if chance.get("majority") is not None and abs(chance["majority"] - chance.get("uniform", -1)) > 1e-3:
            ax.axhline(chance["majority"], color="grey", lw=0.8, ls="--", label="majority class")
        ax.set_title(kind)
        ax.set_xlabel(f"layer ({kind}.L)" if any(x >= 0 for x in xs) else kind)
        if xs and all(float(x).is_integer() for x in xs):
            ax.set_xticks(xs)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy (share of images)")
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusion(counts_kk, classes: list[str], path: str | os.PathLike, title: str = "") -> Path:
    """Confusion matrix of a probe on held-out images: rows the true class, columns the predicted one,
    each cell the count with its row's share as the colour (so classes of unequal size compare)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    c = np.asarray(counts_kk, dtype=np.int64)
    rows = c.sum(1, keepdims=True)
    share = np.divide(c, rows, out=np.zeros(c.shape, dtype=np.float64), where=rows > 0)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * k, 0.6 + 0.5 * k))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if c[i, j]:
                ax.text(j, i, str(c[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), [f"{n} (n={int(r)})" for n, r in zip(classes, rows[:, 0])])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (held-out images)")
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the true class's images")
    acc = np.trace(c) / max(int(c.sum()), 1)
    ax.set_title(title or f"held-out accuracy {acc:.2f} ({int(np.trace(c))} of {int(c.sum())} images)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)

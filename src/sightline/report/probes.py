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
        ax.set_xlabel("layer" if any(x >= 0 for x in xs) else "")
        if xs and all(float(x).is_integer() for x in xs):
            ax.set_xticks(xs)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)

"""Figures of a steering run: efficacy and damage against the scale k, per layer and across layers, and the
judged swaps (four-way judgement and coherence of the free answers) against k."""

from __future__ import annotations

import os
from pathlib import Path

from sightline.report.files import save_figure as _save


def _nan(xs):
    return [float("nan") if x is None else x for x in xs]


def plot_layer(results: dict, site: str, path: str | os.PathLike) -> Path:
    """Efficacy and flip rate (left), damage accuracy and caption-NLL increase (right) against k at one
    site: the mean over pairs in bold, each pair thin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = results["pairs"]
    mean = results["summary"]["per_layer"][site]
    ks = mean["scales"]
    metric = results.get("efficacy_metric", "prob")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for p in pairs:
        lay = p["layers"][site]
        a.plot(ks, _nan(lay["efficacy"]), color="tab:blue", alpha=0.25, lw=0.8)
        a.plot(ks, _nan(lay["flip_rate"]), color="tab:orange", alpha=0.25, lw=0.8)
    a.plot(ks, _nan(mean["efficacy"]), color="tab:blue", lw=2.2, marker="o", ms=3, label=f"efficacy ({metric})")
    a.plot(ks, _nan(mean["flip_rate"]), color="tab:orange", lw=2.2, marker="o", ms=3, label="flip rate (free answer)")
    a.set_ylim(-0.03, 1.03)
    a.set_xlabel("k (multiple of the unit steering vector, residual-stream units)" if results.get("normalize") == "unit" else "k (scale of the steering vector)")
    a.set_ylabel("share of source-class images")
    a.set_title(f"{site}: efficacy")
    a.legend(fontsize=8, loc="best")
    a.grid(alpha=0.3)
    handles = []
    if any(x is not None for x in mean["damage_accuracy"]):
        handles += b.plot(ks, _nan(mean["damage_accuracy"]), color="tab:green", lw=2.2, marker="o", ms=3,
                          label="unrelated-question accuracy")
        b.set_ylim(-0.03, 1.03)
    b.set_xlabel(a.get_xlabel())
    b.set_ylabel("accuracy on the unrelated question")
    b.grid(alpha=0.3)
    c = b.twinx()
    handles += c.plot(ks, _nan(mean["caption_nll_increase"]), color="tab:red", lw=2.2, marker="s", ms=3,
                      label="caption NLL increase (nats/token)")
    c.set_ylabel("caption NLL increase (nats/token)")
    b.set_title(f"{site}: damage")
    b.legend(handles=handles, fontsize=8, loc="best")
    fig.suptitle(f"steering {len(pairs)} pair(s), {results.get('normalize', '')} vectors", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_overview(results: dict, path: str | os.PathLike) -> Path:
    """Flip rate, efficacy and damage accuracy against k, one line per layer (means over pairs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = results["summary"]["per_layer"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    cmap = plt.get_cmap("viridis")
    for j, (site, s) in enumerate(per.items()):
        col = cmap(j / max(len(per) - 1, 1))
        for ax, key in zip(axes, ("flip_rate", "efficacy", "damage_accuracy")):
            ax.plot(s["scales"], _nan(s[key]), color=col, lw=1.8, marker="o", ms=3, label=site)
    metric = results.get("efficacy_metric", "prob")
    for ax, title, ylabel in zip(axes, ("flip rate", f"efficacy ({metric})", "unrelated-question accuracy"),
                                 ("share of answers naming the target",
                                  "p(target)" if metric == "prob" else "p(target) / (p(source) + p(target))",
                                  "accuracy")):
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("k (multiple of the unit steering vector, residual-stream units)" if results.get("normalize") == "unit" else "k (scale of the steering vector)")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=9, title="layer", title_fontsize=9)
    best = results["summary"].get("best")
    if best:
        axes[0].plot([best["scale"]], [best["flip_rate"]], marker="*", ms=14, color="crimson", ls="none")
    fig.tight_layout()
    return _save(fig, path)


def plot_judged(results: dict, path: str | os.PathLike) -> Path:
    """Judged-target rate (solid) and judged-source rate (dashed) against k, and the coherence of the free
    answers (NLL per token under the unsteered model) against k, one colour per layer (means over pairs);
    the clean answers' values as grey lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = results["summary"]["per_layer"]
    clean = results["summary"].get("clean") or {}
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    cmap = plt.get_cmap("viridis")
    for j, (site, s) in enumerate(per.items()):
        col = cmap(j / max(len(per) - 1, 1))
        a.plot(s["scales"], _nan(s.get("judged_target_rate") or [None] * len(s["scales"])), color=col, lw=1.8,
               marker="o", ms=3, label=f"{site}: target")
        a.plot(s["scales"], _nan(s.get("judged_source_rate") or [None] * len(s["scales"])), color=col, lw=1.2,
               ls="--", label=f"{site}: source")
        b.plot(s["scales"], _nan(s.get("coherence") or [None] * len(s["scales"])), color=col, lw=1.8, marker="o",
               ms=3, label=site)
    if clean.get("coherence") is not None:
        b.axhline(clean["coherence"], color="0.5", lw=1, ls=":", label="clean answers")
    xlabel = ("k (multiple of the unit steering vector, residual-stream units)" if results.get("normalize") == "unit"
              else "k (scale of the steering vector)")
    a.set_title("four-way judgement of the free answer")
    a.set_ylabel("share of answers judged as that class")
    a.set_ylim(-0.03, 1.03)
    b.set_title("coherence of the free answer")
    b.set_ylabel("NLL per token, unsteered model (nats)")
    for ax in (a, b):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)

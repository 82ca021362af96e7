"""Figures of an SAE analysis: shared-latent fraction across layers, the image-share histogram, and a
latent's top images with its activations painted over them (PNG, matplotlib Agg)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sightline.report.files import save_figure


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    return save_figure(fig, path, dpi)


def plot_shared_by_layer(curve: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Fractions of shared, image-only and text-only latents against layer (the Line of Sight headline)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    xs = sorted({c["layer"] for c in curve})
    series = list(dict.fromkeys(c.get("series", "") for c in curve))  # several SAEs per site: one line each
    markers = "osD^vP*Xh"
    for i, name in enumerate(series):
        pts = [c for c in curve if c.get("series", "") == name]
        # a small x offset per series keeps overlapping lines visible
        dx = 0.0 if len(series) == 1 else (i - (len(series) - 1) / 2) * 0.08
        for key, colour, ls in (("shared", "#7b2cbf", "-"), ("image_only", "#e07a1f", "--"),
                                ("text_only", "#2a7ab0", ":")):
            label = key.replace("_", "-") + (f" ({name})" if len(series) > 1 else "")
            ax.plot([c["layer"] + dx for c in pts], [c[key] for c in pts], ls, marker=markers[i % len(markers)],
                    color=colour, label=label, lw=2 if key == "shared" else 1.2, ms=5, alpha=0.9)
    ax.set_xlabel("layer (resid.L)")
    ax.set_ylabel("fraction of live latents")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    ax.set_title(title or "SAE latents shared between image and text, by layer", fontsize=10)
    return _save(fig, path)


def plot_training_curves(log: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """FVU, L0 and the dead share of every SAE against step, from the lines of a run's train_log.jsonl."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    names = list(log[-1]["saes"]) if log else []
    steps = [r["step"] for r in log]
    for name in names:
        for ax, key in zip(axes, ("fvu", "l0", "dead_frac")):
            ax.plot(steps, [r["saes"].get(name, {}).get(key, float("nan")) for r in log], lw=1.5, label=name)
    for ax, label, ylabel in zip(axes, ("FVU (fraction of variance unexplained)", "L0 (active latents per token)",
                                        "dead latents (share)"),
                                 ("FVU (0 = perfect)", "latents active per token", "share of latents never firing")):
        ax.set_xlabel("training step (batches)")
        ax.set_ylabel(ylabel)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    if names:
        axes[0].legend(frameon=False, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_modality_hist(image_share: np.ndarray, path: str | os.PathLike, threshold: float = 0.1,
                       title: str = "") -> Path:
    """Histogram of the latents' image share (0 = text only, 1 = image only), the shared band shaded."""
    plt = _plt()
    s = np.asarray(image_share, np.float64)
    s = s[~np.isnan(s)]
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    ax.axvspan(threshold, 1 - threshold, color="#7b2cbf", alpha=0.08, label="shared band")
    ax.hist(s, bins=np.linspace(0, 1, 41), color="#444b5a")
    ax.set_xlabel("image share of per-token activation mass")
    ax.set_ylabel("latents (count)")
    ax.set_xlim(0, 1)
    ax.legend(frameon=False, fontsize=8)
    ax.set_title(title or f"{len(s)} live latents", fontsize=10)
    return _save(fig, path)


def plot_feature_images(images: Sequence[np.ndarray], heatmaps: Sequence[np.ndarray], path: str | os.PathLike,
                        vmax: float | None = None, height: int = 144, floor: float = 0.18) -> Path:
    """A row of original images lit by a latent's per-token activation, one PNG: each pixel keeps
    floor + (1 - floor) * activation / vmax of its brightness (pixels under no token, or where the latent
    is 0, keep `floor`), so the image's own colours stay visible where the latent fires (a colormap
    overlay would hide them, and colour is often the concept). Composed with PIL rather than a
    matplotlib figure: a page shows dozens of latents and a figure costs most of a second each;
    captions go in the HTML."""
    from PIL import Image

    finite = [float(np.nanmax(h)) for h in heatmaps if np.isfinite(h).any()]
    top = vmax if vmax is not None and vmax > 0 else max(finite + [1e-12])
    tiles = []
    for im, h in zip(images, heatmaps):
        im = np.asarray(im)
        if im.ndim == 2:
            im = np.stack([im] * 3, -1)
        scale = height / im.shape[0]
        size = (max(1, round(im.shape[1] * scale)), height)
        base = np.asarray(Image.fromarray(im[..., :3].astype(np.uint8)).resize(size, Image.BILINEAR), np.float32) / 255
        hm = np.nan_to_num(np.asarray(h, np.float32), nan=0.0)
        hm = np.asarray(Image.fromarray(hm).resize(size, Image.NEAREST), np.float32)
        light = floor + (1 - floor) * np.clip(hm / top, 0, 1)
        tiles.append(base * light[..., None])
    if not tiles:
        tiles = [np.ones((height, height, 3), np.float32)]
    gap = np.ones((height, 6, 3), np.float32)
    row = np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    Image.fromarray((row * 255).round().astype(np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def plot_direction_omp(result: dict[str, Any], path: str | os.PathLike, title: str = "") -> Path:
    """Cosine reached against the number of SAE latents used (orthogonal matching pursuit): the direction's
    curve beside the mean (band: min to max) of random directions of the same norm."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    cos = np.asarray(result["cosine"], dtype=float)
    xs = np.arange(1, len(cos) + 1)
    rnd = result.get("random")
    if rnd:
        ax.fill_between(xs, rnd["min"], rnd["max"], color="#8a91a3", alpha=0.25, lw=0,
                        label=f"random (min-max of {len(rnd['seeds'])})")
        ax.plot(xs, rnd["mean"], "--", color="#5b6170", lw=1.4, label="random, mean")
    ax.plot(xs, cos, "-", color="#7b2cbf", lw=2, label="class direction")
    ax.axhline(0.7, color="#bbb", lw=0.8, ls=":")
    ax.set_xlabel("latents used")
    ax.set_ylabel("cosine with the direction")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(0, len(cos) + 1)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    ax.set_title(title or "direction in the SAE basis", fontsize=9)
    return _save(fig, path)


def plot_sparse_probe(ks: Sequence[int], accuracy: Sequence[float], dense: float | None, path: str | os.PathLike,
                      all_latents: float | None = None, chance: float | None = None, title: str = "") -> Path:
    """Held-out accuracy of k-sparse probes over SAE latents against k, beside the dense probe on the residual
    (and on every latent) and chance."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    ax.plot(list(ks), list(accuracy), "o-", color="#7b2cbf", lw=2, label="k latents per class")
    if dense is not None:
        ax.axhline(dense, color="#e07a1f", ls="--", lw=1.4, label=f"dense probe, residual ({dense:.3f})")
    if all_latents is not None:
        ax.axhline(all_latents, color="#2a7ab0", ls="-.", lw=1.2, label=f"every latent ({all_latents:.3f})")
    if chance is not None:
        ax.axhline(chance, color="#999", ls=":", lw=1, label=f"chance ({chance:.3f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ks))
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("latents per class (k)")
    ax.set_ylabel("held-out top-1")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    ax.set_title(title or "sparse probes over SAE latents", fontsize=9)
    return _save(fig, path)

"""Figures and page of a perception run: score against layer (the paper's Figure 2), a layer x KV-head
heatmap, qualitative overlays of a few units, and the index.html that puts them beside the findings.

Everything here reads plain data: a perceive run's results.json (`summary`, and `rows` of {task, rep,
kind, layer, head, metric, value, ci_low, ci_high}) and the examples the run kept (uint8 thumbnails,
masks, keypoints; `thumbnail` / `resize_mask` make them). Matplotlib with the Agg backend; PNGs through
`save_figure`, the page through the one page builder (`sightline.report.html`).
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sightline.report.files import save_figure

METRIC_LABELS = {"miou": "mIoU", "fb_iou": "FB-IoU", "jaccard": "Jaccard", "precision": "precision",
                 "mean_image_iou": "mean IoU per expression", "pointing": "pointing accuracy",
                 "pck_bbox": "PCK@α (target box)", "pck_img": "PCK@α (image)", "J&F-Mean": "J&F", "J-Mean": "J",
                 "F-Mean": "F"}
SERIES = (("values", "#7b2cbf", "o", "-"), ("keys", "#e07a1f", "s", "-"), ("resid", "#2a7ab0", "^", "-"))
SEG_TASKS = ("fgseg", "coseg", "textseg", "refseg")
IGNORE = 255  # the masks' ignored label (sightline.data.tasks.IGNORE; report/ reads plain arrays)
_PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]], np.float32) / 255


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _f3(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def _ci(ci: Sequence[float] | None) -> str:
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] is not None and ci[1] is not None else ""


def metric_label(metric: str) -> str:
    """A metric's name as figures and pages show it (`pck_bbox` -> 'PCK@α (target box)')."""
    return METRIC_LABELS.get(metric, metric)


# ============================================================================= thumbnails (the run keeps these)
def thumbnail(image: Any, max_side: int = 160) -> np.ndarray:
    """A uint8 [h, w, 3] copy of a PIL image or array, its longer side at most `max_side` pixels."""
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image).astype(np.uint8))
    im = im.convert("RGB")
    scale = min(1.0, max_side / max(im.size))
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
    return np.asarray(im, np.uint8).copy()


def resize_mask(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """A label mask (bool or uint8) resized to `size_hw` by nearest neighbour, as uint8."""
    from PIL import Image

    m = np.asarray(mask)
    m = m.astype(np.uint8) if m.dtype != np.uint8 else m
    if m.shape[:2] == tuple(size_hw):
        return m.copy()
    return np.asarray(Image.fromarray(m).resize((size_hw[1], size_hw[0]), Image.NEAREST), np.uint8)


# ============================================================================= rows
def task_rows(rows: Sequence[Mapping[str, Any]], task: str, metric: str) -> list[Mapping[str, Any]]:
    """The rows of one task and metric."""
    return [r for r in rows if r["task"] == task and r["metric"] == metric]


def _kind_of(rep: str) -> str:
    return rep.split(".")[0]


def layer_series(rows: Sequence[Mapping[str, Any]], kind: str, rep_kind: str) -> tuple[np.ndarray, ...]:
    """(layers, values, ci_low, ci_high) of `rep_kind` (values, keys, resid, vision) over all heads, for `kind`
    (model, control), sorted by layer; NaN where a value or interval is missing."""
    pts = sorted((r["layer"], r["value"], r["ci_low"], r["ci_high"]) for r in rows
                 if r["kind"] == kind and _kind_of(r["rep"]) == rep_kind and r["layer"] is not None
                 and r["head"] is None)
    if not pts:
        return (np.zeros(0),) * 4
    arr = np.array([[np.nan if v is None else v for v in p] for p in pts], np.float64)
    return arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3]


def _value(rows, kind: str, rep: str) -> Mapping[str, Any] | None:
    return next((r for r in rows if r["kind"] == kind and r["rep"] == rep and r["value"] is not None), None)


def _best_chance(chance: Mapping[str, float | None]) -> tuple[str, float] | None:
    got = [(k, v) for k, v in (chance or {}).items() if v is not None]
    return max(got, key=lambda kv: kv[1]) if got else None


# ============================================================================= Figure 2: score against layer
def plot_layers(task: str, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                title: str = "") -> Path:
    """The task's primary score against language-model layer: values, keys and resid (all heads) with their
    bootstrap 95% bands, the random-weight control's values dashed; projector, external encoder, token-grid
    oracle and chance as horizontal lines; vision-tower layers in a narrow panel on the left."""
    plt = _plt()
    metric = summary["primary_metric"]
    rs = task_rows(rows, task, metric)
    vis = layer_series(rs, "model", "vision")
    vis_c = layer_series(rs, "control", "vision")
    if len(vis[0]):
        fig, (av, ax) = plt.subplots(1, 2, figsize=(9.6, 4.0), sharey=True,
                                     gridspec_kw={"width_ratios": [1, 3.2], "wspace": 0.06})
    else:
        fig, ax = plt.subplots(figsize=(8.0, 4.0))
        av = None
    top = 0.0
    for rep_kind, colour, marker, ls in SERIES:
        x, y, lo, hi = layer_series(rs, "model", rep_kind)
        if not len(x):
            continue
        ax.plot(x, y, ls, color=colour, marker=marker, ms=4.5, lw=2 if rep_kind == "values" else 1.4,
                label=f"{rep_kind} (all heads)" if rep_kind != "resid" else "resid (residual stream)")
        if np.isfinite(lo).any():
            ax.fill_between(x, lo, hi, color=colour, alpha=0.14, lw=0)
        top = max(top, np.nanmax(np.r_[y, hi]))
    xc, yc, _, _ = layer_series(rs, "control", "values")
    if len(xc):
        ax.plot(xc, yc, "--", color="#7b2cbf", alpha=0.75, lw=1.4, marker="o", ms=3, mfc="white",
                label="values, random-weight control")
        top = max(top, np.nanmax(yc))
    lines = []
    for label, r, colour, ls in (("projector (LM input)", _value(rs, "model", "projector"), "black", "-."),
                                 ("external encoder", _value(rs, "model", "encoder"), "#2e8b57", ":"),
                                 ("token-grid oracle", _value(rs, "oracle", "tokens"), "#c0392b", "-")):
        if r is not None:
            lines.append((label + f" {r['value']:.2f}", r["value"], colour, ls))
    chance = _best_chance(summary.get("chance") or {})
    if chance is not None:
        lines.append((f"chance ({chance[0].replace('_', ' ')}) {chance[1]:.2f}", chance[1], "grey", ":"))
    for label, v, colour, ls in lines:
        for a in (ax, av) if av is not None else (ax,):
            a.axhline(v, color=colour, ls=ls, lw=1.3, label=label if a is ax else None)
        top = max(top, v)
    if av is not None:
        x, y, lo, hi = vis
        av.plot(x, y, "-", color="#555b6e", marker="D", ms=4.5, lw=1.6)
        if np.isfinite(lo).any():
            av.fill_between(x, lo, hi, color="#555b6e", alpha=0.14, lw=0)
        if len(vis_c[0]):
            av.plot(vis_c[0], vis_c[1], "--", color="#555b6e", alpha=0.7, marker="D", ms=3, mfc="white")
        top = max(top, np.nanmax(np.r_[y, hi]))
        av.set_xlabel("vision-tower layer")
        av.set_ylabel(metric_label(metric))
        av.set_xticks(list(x))
        av.set_title("vision tower", fontsize=9)
        av.grid(alpha=0.3)
        ax.tick_params(labelleft=False)
    else:
        ax.set_ylabel(metric_label(metric))
    xs = sorted({r["layer"] for r in rs if r["layer"] is not None and r["kind"] == "model"
                 and _kind_of(r["rep"]) in ("values", "keys", "resid")})
    if xs:
        step = max(1, math.ceil(len(xs) / 16))
        ax.set_xticks(xs[::step])
    ax.set_xlabel("language-model layer")
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), min(1.05, max(0.05, top * 1.08)) if top <= 1 else top * 1.08)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    small = " — too few units to mean much" if summary.get("too_small") else ""
    ax.set_title(title or f"{task}: {metric_label(metric)} by layer ({summary.get('n_units')} units{small}); "
                 "bands: bootstrap 95%", fontsize=9.5)
    return save_figure(fig, path)


# ============================================================================= layer x KV head heatmap
def head_grid(rows: Sequence[Mapping[str, Any]], rep_kind: str, kind: str = "model"
              ) -> tuple[list[int], list[int], np.ndarray]:
    """(layers, heads, scores [layers, heads + 1]) of `rep_kind` per layer and KV head; the last column is the
    concatenation of all heads. NaN where not read."""
    got = [r for r in rows if r["kind"] == kind and _kind_of(r["rep"]) == rep_kind and r["layer"] is not None]
    layers = sorted({r["layer"] for r in got})
    heads = sorted({r["head"] for r in got if r["head"] is not None})
    grid = np.full((len(layers), len(heads) + 1), np.nan)
    for r in got:
        if r["value"] is None:
            continue
        col = len(heads) if r["head"] is None else heads.index(r["head"])
        grid[layers.index(r["layer"]), col] = r["value"]
    return layers, heads, grid


def plot_heads(task: str, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], path: str | os.PathLike,
               annotate_max: int = 160) -> Path | None:
    """Layer x KV-head heatmaps of the primary score for values and keys (one shared colour scale; the last
    column is all heads concatenated), numbers written in the cells when the grid has at most `annotate_max`
    cells. None when neither was read per head."""
    metric = summary["primary_metric"]
    rs = task_rows(rows, task, metric)
    grids = [(k, *head_grid(rs, k)) for k in ("values", "keys")]
    grids = [g for g in grids if g[1] and g[2]]  # a grid without single heads is the layer plot again
    if not grids:
        return None
    plt = _plt()
    vals = np.concatenate([g[3].ravel() for g in grids])
    vmin = float(np.nanmin(vals)) if np.isfinite(vals).any() else 0.0
    vmax = float(np.nanmax(vals)) if np.isfinite(vals).any() else 1.0
    n_rows = max(len(g[1]) for g in grids)
    n_cols = max(g[3].shape[1] for g in grids)
    fig, axes = plt.subplots(1, len(grids), figsize=(1.6 + 1.9 * len(grids) + 0.55 * n_cols * len(grids),
                                                     1.4 + 0.34 * n_rows), squeeze=False)
    im = None
    for ax, (name, layers, heads, grid) in zip(axes[0], grids):
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=vmin, vmax=max(vmax, vmin + 1e-9),
                       interpolation="nearest")
        ax.set_xticks(range(grid.shape[1]), [f"h{h}" for h in heads] + ["all"], fontsize=8)
        step = max(1, math.ceil(len(layers) / 24))
        ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)], fontsize=8)
        ax.set_xlabel("KV head")
        ax.set_ylabel("language-model layer")
        ax.set_title(name, fontsize=9.5)
        if len(heads):
            ax.axvline(len(heads) - 0.5, color="white", lw=2)
        if grid.size <= annotate_max:
            mid = (vmin + vmax) / 2
            for (i, j), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if v > mid else "white")
    fig.colorbar(im, ax=list(axes[0]), label=metric_label(metric), shrink=0.9)
    fig.suptitle(f"{task}: {metric_label(metric)} per layer and KV head", fontsize=10)
    return save_figure(fig, path)


# ============================================================================= qualitative overlays
def _overlay(image: np.ndarray, colours: Sequence[tuple[np.ndarray, Sequence[float]]], alpha: float = 0.5
             ) -> np.ndarray:
    out = image.astype(np.float32) / 255
    for mask, rgb in colours:
        m = np.asarray(mask, bool)
        out[m] = (1 - alpha) * out[m] + alpha * np.asarray(rgb, np.float32)
    return np.clip(out, 0, 1)


def seg_overlay(image: np.ndarray, pred: np.ndarray | None, gt: np.ndarray) -> np.ndarray:
    """The image with the ground truth (pred None: everything but the foreground darkened) or a prediction
    against it: correct foreground green, false positive red, missed foreground blue; ignored pixels greyed."""
    fg = gt == 1
    ign = gt == IGNORE
    if pred is None:
        return _overlay(image, [(~fg & ~ign, (0.0, 0.0, 0.0)), (ign, (0.6, 0.6, 0.6))], alpha=0.7)
    p = np.asarray(pred, bool) & ~ign
    return _overlay(image, [(p & fg, (0.1, 0.8, 0.2)), (p & ~fg, (0.95, 0.15, 0.1)),
                            (~p & fg, (0.15, 0.35, 1.0)), (ign, (0.6, 0.6, 0.6))])


def _grid_spacing(fig) -> None:
    """Spacing for a grid of image panels with small titles: fixed margins instead of tight_layout, which
    measures every axis and took seconds per figure of 50 panels."""
    h = fig.get_figheight()
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.45 / h, wspace=0.04, hspace=0.3)


def plot_seg_examples(examples: Mapping[str, Any], path: str | os.PathLike, title: str = "") -> Path | None:
    """Per kept unit a row: for each of its images the ground truth, the example rep's prediction and the
    token-grid oracle's over the image (green correct, red false positive, blue missed), the caption (class
    or referring expression) above. `examples`: {"rep", "units": [{"caption", "images", "gt", "preds": {name:
    [mask per image]}, "iou": {name: [IoU per image]}}]}. None when no unit was kept."""
    units = [u for u in examples.get("units", []) if u.get("images")]
    if not units:
        return None
    plt = _plt()
    names = [n for n in (examples.get("rep"), "oracle") if n is not None]
    n_img = max(len(u["images"]) for u in units)
    n_cols = n_img * (1 + len(names))
    fig, axes = plt.subplots(len(units), n_cols, figsize=(1.75 * n_cols, 1.95 * len(units) + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, u in enumerate(units):
        for k, (im, gt) in enumerate(zip(u["images"], u["gt"])):
            c0 = k * (1 + len(names))
            ax = axes[i, c0]
            ax.imshow(seg_overlay(im, None, gt))
            cap = u.get("caption") or ""
            ax.set_title(textwrap.shorten(f"truth: {cap}" if k == 0 and cap else "truth", 60), fontsize=7.5,
                         loc="left")
            for j, name in enumerate(names):
                preds = u["preds"].get(name) or []
                if k < len(preds):
                    axes[i, c0 + 1 + j].imshow(seg_overlay(im, preds[k], gt))
                    iou = (u.get("iou", {}).get(name) or [None] * len(preds))[k]
                    axes[i, c0 + 1 + j].set_title(f"{name}" + ("" if iou is None else f": IoU {iou:.2f}"), fontsize=7.5)
    fig.suptitle(title or f"predicted vs true masks ({examples.get('rep')}; green correct, red false positive, "
                 "blue missed)", fontsize=9)
    _grid_spacing(fig)
    return save_figure(fig, path)


def plot_corr_examples(examples: Mapping[str, Any], path: str | os.PathLike, title: str = "") -> Path | None:
    """Per kept pair, source and target side by side with a line from each source keypoint to the example
    rep's predicted target point: green within the PCK threshold of the true point, red outside; true target
    points as white crosses. `examples`: {"rep", "units": [{"caption", "source", "target", "source_xy",
    "target_xy", "preds": {name: [xy]}, "correct": {name: [bool]}}]} (thumbnail pixels)."""
    units = [u for u in examples.get("units", []) if u.get("source") is not None]
    rep = examples.get("rep")
    if not units or rep is None:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(units), 1, figsize=(6.4, 2.9 * len(units) + 0.4), squeeze=False)
    for ax, u in zip(axes[:, 0], units):
        s, t = u["source"], u["target"]
        h = max(s.shape[0], t.shape[0])
        gap = 8
        canvas = np.full((h, s.shape[1] + gap + t.shape[1], 3), 255, np.uint8)
        canvas[:s.shape[0], :s.shape[1]] = s
        canvas[:t.shape[0], s.shape[1] + gap:] = t
        dx = s.shape[1] + gap
        ax.imshow(canvas)
        ax.axis("off")
        src = np.asarray(u["source_xy"], np.float64).reshape(-1, 2)
        tgt = np.asarray(u["target_xy"], np.float64).reshape(-1, 2)
        pred = u["preds"].get(rep)
        pred = np.full_like(src, np.nan) if pred is None else np.asarray(pred, np.float64).reshape(-1, 2)
        ok = u["correct"].get(rep)
        ok = np.zeros(len(src), bool) if ok is None else np.asarray(ok, bool)
        ax.plot(tgt[:, 0] + dx, tgt[:, 1], "x", color="white", ms=5, mew=1.5)
        for (x0, y0), (x1, y1), good in zip(src, pred, ok):
            if not (np.isfinite(x1) and np.isfinite(y1)):
                continue
            colour = "#2ecc40" if good else "#ff4136"
            ax.plot([x0, x1 + dx], [y0, y1], "-", color=colour, lw=1.1, alpha=0.9)
            ax.plot([x0], [y0], "o", color=colour, ms=3)
        ax.set_title(f"{u.get('caption', '')}: {rep} {int(ok.sum())}/{len(ok)} within the threshold", fontsize=8)
    fig.suptitle(title or "correspondences, source -> target (green correct, red wrong, x true point)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def label_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The image with each object label (1..) painted in its own colour (DAVIS-like palette)."""
    lab = np.asarray(labels)
    pairs = [(lab == k, _PALETTE[k % len(_PALETTE)] if k % len(_PALETTE) else _PALETTE[1])
             for k in np.unique(lab) if 0 < k < IGNORE]
    return _overlay(image, pairs, alpha)


def plot_clip_examples(examples: Mapping[str, Any], path: str | os.PathLike, title: str = "") -> Path | None:
    """Per kept clip three rows over a few frames: the true labels, the example rep's propagated labels, the
    oracle's; the first column is frame 0 with the labels given. `examples`: {"rep", "units": [{"caption",
    "frames": {"t": [..], "images": [..]}, "first_labels", "gt": [..], "preds": {name: [labels per frame]}}]}."""
    units = [u for u in examples.get("units", []) if u.get("frames") and u["frames"].get("images")]
    if not units:
        return None
    plt = _plt()
    names = [n for n in (examples.get("rep"), "oracle") if n is not None]
    n_cols = 1 + max(len(u["frames"]["images"]) - 1 for u in units)
    n_rows = len(units) * (1 + len(names))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.7 * n_cols + 0.4, 1.45 * n_rows + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, u in enumerate(units):
        ims, ts = u["frames"]["images"], u["frames"]["t"]
        base = i * (1 + len(names))
        for r, name in enumerate(["truth", *names]):
            ax = axes[base + r, 0]
            ax.imshow(label_overlay(ims[0], u["first_labels"]))
            ax.set_title(f"{u.get('caption', '')} t=0 (given)" if r == 0 else "t=0 (given)", fontsize=7)
            ax.text(-0.08, 0.5, name, transform=ax.transAxes, rotation=90, ha="right", va="center", fontsize=7.5)
            labs = u["gt"] if name == "truth" else (u["preds"].get(name) or [])
            for c in range(1, len(ims)):
                if c - 1 < len(labs):
                    axes[base + r, c].imshow(label_overlay(ims[c], labs[c - 1]))
                    axes[base + r, c].set_title(f"t={ts[c]}", fontsize=7)
    fig.suptitle(title or f"label propagation ({examples.get('rep')}): truth, prediction, oracle", fontsize=9)
    _grid_spacing(fig)
    return save_figure(fig, path)


def plot_examples(task: str, examples: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """The task's qualitative figure (segmentation overlays, correspondence lines or propagated labels)."""
    if task in SEG_TASKS:
        return plot_seg_examples(examples, path)
    if task == "semcorr":
        return plot_corr_examples(examples, path)
    if task == "tempcorr":
        return plot_clip_examples(examples, path)
    return None


# ============================================================================= findings and page
def _best_layer(rows, task: str, s: Mapping[str, Any]) -> int | None:
    b = s.get("best_values")
    if not b:
        return None
    r = next((r for r in rows if r["task"] == task and r["rep"] == b["rep"] and r["kind"] == "model"), None)
    return None if r is None else r["layer"]


def findings(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> tuple[str, list[str]]:
    """(a paragraph of what the run found across tasks, one sentence per task with its numbers and intervals)."""
    tasks = summary.get("tasks", {})
    n_layers = (summary.get("model") or {}).get("n_layers")
    peaks, gains, enc_better, enc_worse, ctrl_below, ctrl_n, small = [], [], [], [], 0, 0, []
    per_task = []
    for task, s in tasks.items():
        b, bv = s.get("best"), s.get("best_values")
        layer = _best_layer(rows, task, s)
        if layer is not None:
            peaks.append((layer, task))
        if s.get("lm_gain") is not None:
            gains.append((task, s["lm_gain"]))
        if bv and s.get("encoder") is not None:
            (enc_better if s["encoder"] > bv["value"] else enc_worse).append(task)
        cv = s.get("control_best_values")
        if bv and cv:
            ctrl_n += 1
            ctrl_below += cv["value"] < bv["value"]
        if s.get("too_small"):
            small.append(task)
        if b is None:
            per_task.append(f"{task}: nothing was scored.")
            continue
        m = metric_label(s["primary_metric"])
        text = f"{task} ({m}, {s['n_units']} units): "
        if bv:
            text += f"best values {bv['rep']} {_f3(bv['value'])}{_ci(bv.get('ci'))}"
        if b["rep"] != (bv or {}).get("rep"):
            text += ("; " if bv else "") + f"best of all reps {b['rep']} {_f3(b['value'])}{_ci(b.get('ci'))}"
        if s.get("projector") is not None:
            text += f"; projector {_f3(s['projector'])}"
            if s.get("lm_gain") is not None:
                text += f" (language-model gain {s['lm_gain']:+.3f})"
        if s.get("encoder") is not None:
            text += f"; external encoder {_f3(s['encoder'])}"
        if cv:
            text += f"; random-weight control's best values {_f3(cv['value'])}{_ci(cv.get('ci'))}"
        text += f"; token-grid oracle {_f3(s.get('oracle'))}"
        ch = _best_chance(s.get("chance") or {})
        if ch:
            text += f"; chance {_f3(ch[1])} ({ch[0].replace('_', ' ')})"
        per_task.append(text + (" — too few units to mean much." if s.get("too_small") else "."))
    parts = []
    if peaks:
        layers = {p[0] for p in peaks}
        where = (f"layer {peaks[0][0]} on every task" if len(layers) == 1 and len(peaks) > 1 else
                 "layer " + ", ".join(f"{layer} ({task})" for layer, task in peaks))
        parts.append(f"Perception read from the image value tokens peaks at {where}"
                     + (f" of the language model's {n_layers} layers (0-{n_layers - 1})." if n_layers else "."))
    if gains:
        up = [t for t, g in gains if g > 0]
        parts.append(f"The language model improves on its input (best values layer minus projector) on {len(up)} of "
                     f"{len(gains)} tasks (" + ", ".join(f"{t} {g:+.3f}" for t, g in gains) + ").")
    if enc_better or enc_worse:
        parts.append("The external encoder scores higher than the best values layer on "
                     + (", ".join(enc_better) if enc_better else "no task")
                     + " and lower on " + (", ".join(enc_worse) if enc_worse else "no task") + ".")
    elif "encoder" in (summary.get("skipped_reps") or {}):
        parts.append(f"No external encoder was read ({summary['skipped_reps']['encoder']}).")
    if ctrl_n:
        parts.append(f"The random-weight control's best values layer stays below the model's on {ctrl_below} of "
                     f"{ctrl_n} tasks.")
    elif summary.get("control") is False:
        parts.append("No random-weight control was run.")
    parts.append("Every token-level readout is bounded by the token-grid oracle; chance levels and bootstrap 95% "
                 "intervals are given per task below.")
    if small:
        parts.append(("Every task" if len(small) == len(tasks) else ", ".join(small)) + " had too few units for its "
                     "scores to mean much: treat this run as a smoke test, not a measurement.")
    return " ".join(parts), per_task


def _table(task: str, s: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list]]:
    metrics = list(s.get("metrics") or [s["primary_metric"]])
    primary = s["primary_metric"]
    by: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r["task"] == task:
            d = by.setdefault((r["kind"], r["rep"]), {"layer": r["layer"], "head": r["head"]})
            d[r["metric"]] = r
    order = ["model", "control", "oracle", "chance"]
    out = []
    def key(kv):
        (kind, rep), d = kv
        return (order.index(kind) if kind in order else 9, _kind_of(rep), -1 if d["layer"] is None else d["layer"],
                d["head"] is not None, d["head"] or 0, rep)

    for (kind, rep), d in sorted(by.items(), key=key):
        p = d.get(primary)
        ci = f"[{p['ci_low']:.3f}, {p['ci_high']:.3f}]" if p and p["ci_low"] is not None else "–"
        headed = kind in ("model", "control") and _kind_of(rep) in ("values", "keys") and d["layer"] is not None
        head = "all" if headed and d["head"] is None else d["head"]
        out.append([kind, rep, d["layer"], head,
                    *[None if m not in d or d[m]["value"] is None else round(d[m]["value"], 4) for m in metrics], ci])
    header = ["kind", "rep", "layer", "KV head", *[metric_label(m) for m in metrics], f"95% CI ({metric_label(primary)})"]
    return header, out


def write_task_figures(folder: str | os.PathLike, task: str, s: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                       examples: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """Write the task's figures into folder/figures; (path relative to folder, caption) of each."""
    folder = Path(folder)
    m = metric_label(s["primary_metric"])
    ch = _best_chance(s.get("chance") or {})
    chance = f"chance {ch[1]:.3f} ({ch[0].replace('_', ' ')})" if ch else "no chance level"
    out = []
    p = plot_layers(task, s, rows, folder / "figures" / f"{task}_layers.png")
    out.append((p.relative_to(folder).as_posix(),
                (f"{task}: {m} against layer, over {s.get('n_units')} units; bands are bootstrap 95% intervals over "
                 f"units; token-grid oracle {_f3(s.get('oracle'))}, {chance}.")))
    p = plot_heads(task, s, rows, folder / "figures" / f"{task}_heads.png")
    if p is not None:
        out.append((p.relative_to(folder).as_posix(),
                    f"{task}: {m} per layer and KV head (values, keys; 'all' = the heads concatenated)."))
    if examples:
        p = plot_examples(task, examples, folder / "figures" / f"{task}_examples.png")
        if p is not None:
            out.append((p.relative_to(folder).as_posix(),
                        (f"{task}: the first {len(examples['units'])} units read from {examples.get('rep')} beside "
                         "the token-grid oracle.")))
    return out


def write_perceive_page(folder: str | os.PathLike, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                        examples: Mapping[str, Mapping[str, Any]] | None = None, subtitle: str = "") -> Path:
    """Write every task's figures and folder/index.html: the findings first, then the warnings, then per task its
    headline numbers, figures and the table of every rep's scores."""
    from sightline.report.html import Section, bullets, write_page

    folder = Path(folder)
    paragraph, per_task = findings(summary, rows)
    model = (summary.get("model") or {}).get("name", "the model")
    sections = [Section("What this run found", paragraph, html=bullets(per_task), anchor="findings")]
    if summary.get("warnings"):
        sections.append(Section("Warnings", html=bullets([f"Warning: {w}" for w in summary["warnings"]], cls="note"),
                                anchor="warnings"))
    for task, s in summary.get("tasks", {}).items():
        if s.get("best") is None:
            sections.append(Section(f"{task}", "Nothing was scored.", anchor=task))
            continue
        images = write_task_figures(folder, task, s, rows, (examples or {}).get(task))
        bv, cv = s.get("best_values"), s.get("control_best_values")
        ch = _best_chance(s.get("chance") or {})
        heads = {
            "units": s.get("n_units"),
            "best values layer": f"{bv['rep']} {_f3(bv['value'])}{_ci(bv.get('ci'))}" if bv else None,
            "best of all reps": f"{s['best']['rep']} {_f3(s['best']['value'])}{_ci(s['best'].get('ci'))}",
            "projector (LM input)": s.get("projector"),
            "language-model gain (best values - projector)": s.get("lm_gain"),
            "external encoder": s.get("encoder"),
            "random-weight control, best values": f"{cv['rep']} {_f3(cv['value'])}{_ci(cv.get('ci'))}" if cv else None,
            "token-grid oracle": s.get("oracle"),
            "chance": f"{_f3(ch[1])} ({ch[0]})" if ch else None,
        }
        text = (f"{s.get('read', '')}. Source: {s.get('source', '')}. {s.get('n_units')} units"
                + (f", {s.get('n_calibration')} calibration units" if s.get("n_calibration") else "")
                + (". Too few units to mean much." if s.get("too_small") else ".")
                + (" Not read: " + "; ".join(f"{k} ({v})" for k, v in s["skipped_reps"].items()) + "."
                   if s.get("skipped_reps") else ""))
        header, table_rows = _table(task, s, rows)
        sections.append(Section(f"{task}: {metric_label(s['primary_metric'])}", text,
                                figures={k: v for k, v in heads.items() if v is not None}, images=images,
                                tables=[("Every representation's scores", header, table_rows)], anchor=task))
    return write_page(folder / "index.html", "Perception readouts", subtitle or model, sections)


# ============================================================================= several models (Figure 3)
def plot_gain_scatter(scores: Sequence[float], gains: Sequence[float], names: Sequence[str], path: str | os.PathLike,
                      task: str = "", score_name: str = "perception score", stats: Mapping[str, Any] | None = None
                      ) -> Path:
    """One point per model: its language-model gain (best values layer minus projector) against its perception
    score, labelled, with the least-squares line; r, rho, n and the permutation p-values in the title."""
    plt = _plt()
    x, y = np.asarray(scores, np.float64), np.asarray(gains, np.float64)
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    ax.scatter(x, y, s=36, color="#7b2cbf", zorder=3)
    for xi, yi, name in zip(x, y, names):
        ax.annotate(str(name), (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if len(x) >= 2 and np.ptp(x) > 0:
        slope, icpt = np.polyfit(x, y, 1)
        xs = np.linspace(x.min(), x.max(), 2)
        ax.plot(xs, slope * xs + icpt, "--", color="grey", lw=1.2, label="least-squares line")
        ax.legend(fontsize=8, frameon=False, loc="best")
    ax.axhline(0, color="black", lw=0.8, alpha=0.6)
    ax.set_xlabel(score_name)
    ax.set_ylabel("language-model gain (best values - projector)")
    st = stats or {}
    f = (lambda v: "n/a" if v is None else f"{v:.2f}")
    ax.set_title(f"{task}: Pearson r {f(st.get('pearson_r'))} (p {f(st.get('pearson_p'))}), Spearman ρ "
                 f"{f(st.get('spearman_rho'))} (p {f(st.get('spearman_p'))}), n = {len(x)}"
                 + (" — few models" if len(x) < 10 else ""), fontsize=8.5)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)

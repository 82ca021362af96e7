"""Figure of how a VLM's image tokens tile an image: the token grid drawn over the original pixels."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sightline.report.files import save_figure


def plot_token_grid(image_hw3: np.ndarray, col_spans: np.ndarray, row_spans: np.ndarray, path: str | os.PathLike,
                    first_position: int | None = None, newline: bool = False, title: str = "",
                    highlight_rc: tuple[int, int] | None = None) -> Path:
    """The image with each image token's pixel box outlined and labelled by its (row, col); a grid's
    spans are (x0, x1) per column and (y0, y1) per row in ORIGINAL-image pixels (ViewGrid.spans()).
    With `first_position`, each box also shows its sequence position (newline tokens counted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    img = np.asarray(image_hw3)
    h, w = img.shape[:2]
    xs, ys = np.asarray(col_spans, float), np.asarray(row_spans, float)
    n_rows, n_cols = len(ys), len(xs)
    fig, ax = plt.subplots(figsize=(6.4, 6.4 * h / w + 0.4))
    ax.imshow(img, extent=(0, w, h, 0), interpolation="nearest")
    for r, (y0, y1) in enumerate(ys):
        for c, (x0, x1) in enumerate(xs):
            hi = highlight_rc == (r, c)
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2.2 if hi else 0.8,
                                   edgecolor="#ff2d95" if hi else "white", alpha=1 if hi else 0.85))
            label = f"{r},{c}"
            if first_position is not None:
                label += f"\n#{first_position + r * (n_cols + int(newline)) + c}"
            ax.text((x0 + x1) / 2, (y0 + y1) / 2, label, ha="center", va="center", fontsize=6.5, color="white",
                    bbox={"boxstyle": "round,pad=0.1", "fc": "black", "alpha": 0.45, "lw": 0})
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xlabel("x (pixels of the original image)")
    ax.set_ylabel("y (pixels)")
    ax.set_title(title or f"{n_rows} x {n_cols} image tokens over a {h} x {w} px image", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)

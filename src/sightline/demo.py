"""`sightline demo`: the whole pipeline end to end on a built-in model, offline, with no arguments.

Until the trained model organism ships (it becomes the demo's model), the demo builds a small
LLaVA-1.5 checkpoint from config with random weights, draws a labelled set of shape images,
extracts the residual stream, keys and values over the image tokens into an ActivationStore, and
writes summary.json with the headline figures of what exists so far.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from sightline.errors import UserError

MARKER = ".sightline-demo"
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220)}


def draw_shapes(root: Path, n: int, size: int = 112, seed: int = 0) -> None:
    """An imagefolder of n images (class = shape) with a coloured shape on a noisy background."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        bg = rng.integers(90, 160, (size, size, 3), dtype=np.uint8)
        im = Image.fromarray(bg)
        d = ImageDraw.Draw(im)
        r = int(rng.integers(size // 6, size // 3))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        box = [cx - r, cy - r, cx + r, cy + r]
        if shape == "circle":
            d.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            d.rectangle(box, fill=COLOURS[colour])
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
        (root / shape).mkdir(parents=True, exist_ok=True)
        im.save(root / shape / f"{i:04d}_{colour}.png")


def run_demo(out: str | Path = "sightline-demo", n: int = 48) -> dict:
    """Build the demo model and data, extract a store, and write summary.json; returns the summary."""
    from sightline.extract import ExtractConfig, extract
    from sightline.models.testing import build_tiny
    from sightline.store import ActivationStore

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise UserError(f"{out} exists and is not a sightline demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by sightline demo; safe to delete\n")
    t0 = time.perf_counter()
    model_dir = build_tiny("llava", out / "model", image_size=112, patch_size=14,
                           text={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4})
    draw_shapes(out / "data", n)
    store_dir = extract(ExtractConfig(model=str(model_dir), data=str(out / "data"), out=str(out / "store"),
                                      prompt="What is shown in this image?", sites="resid,keys,values",
                                      batch_size=8))
    store = ActivationStore.open(store_dir)
    summary = {
        "sightline_demo": {
            "model": store.manifest["model"],
            "examples": len(store),
            "image_tokens_per_example": int(store.examples[0]["n_tokens"]) if len(store) else 0,
            "tokens": store.n_tokens,
            "sites": store.sites,
            "store": str(store_dir),
            "seconds": round(time.perf_counter() - t0, 2),
            "note": "interim demo on a random LLaVA; the trained model organism replaces it",
        }
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"demo: {len(store)} images, {store.n_tokens} image tokens, {len(store.sites)} sites -> {out}/summary.json")
    return summary

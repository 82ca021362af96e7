"""Capture overhead: extraction into a store vs a bare forward pass, measured in one run.

    python benchmarks/capture_overhead.py        # ~60M LLaVA on CPU (the BENCHMARKS.md setting)
    python benchmarks/capture_overhead.py --family gemma3 --rss ""   # any family: its tiny builder, LM widened

(a) bare: `model(**inputs, logits_to_keep=1)` over prepared batches.
(b) extraction: the same batches through `Capture` (resid, keys and values at every layer, image
    tokens) with every example written to an ActivationStore (fp16 shards on disk, the last
    shard's write included).
Both run on the same prepared inputs, alternating (a) and (b) batch by batch so that both see the
same background load; each round gives sum(b) / sum(a), and the median over --repeats rounds is
reported. Then peak RSS of the full `sightline extract` job on 100 vs
1,000 images (separate processes), to show memory does not grow with the dataset.
The last output line is `overhead_ratio=<median ratio>`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def gradient(h, w, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([255 * x / w, 255 * y / h, 127 + 100 * np.sin((x + y) / 30 + seed)], -1)
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def build_cpu_model(root: Path) -> Path:
    """~60M-parameter LLaVA-1.5 layout: CLIP-style 336px/14 tower (576 tokens), LM hidden 512, 8 layers."""
    from sightline.models.testing import build_tiny

    return build_tiny(
        "llava", root / "llava60m", image_size=336, patch_size=14,
        text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32000),
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
    )


# The language model every other family is built with: the 60M LLaVA's width and depth (the vision side
# stays the family's tiny one, so the ratio measures hooks on a realistic LM).
SMALL_TEXT = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8)


def build_family_model(root: Path, family: str) -> Path:
    """The family's tiny checkpoint from config with its language model widened to SMALL_TEXT."""
    from sightline.models.testing import build_tiny

    if family == "llava":
        return build_cpu_model(root)
    text = dict(SMALL_TEXT)
    if family == "qwen3_5":  # one layer type per block: Qwen3.5's own pattern, softmax attention every fourth
        text["layer_types"] = (["linear_attention"] * 3 + ["full_attention"]) * (text["num_hidden_layers"] // 4)
    if family == "glm4v":  # M-RoPE sections for the widened head (64 dims, half rotated: 16 frequency pairs)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 4, 8],
                                   "partial_rotary_factor": 0.5}
    return build_tiny(family, root / family, text=text)


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def overhead(adapter, batches, repeats: int, store_root: Path, shard_examples: int = 0) -> dict:
    from sightline.capture import Capture, resolve_sites, site_shape
    from sightline.store import StoreWriter

    model = adapter.model
    sites = resolve_sites("resid,keys,values", "all", adapter.n_layers, adapter.n_vision_layers, adapter.kv_layers)
    cap = Capture(adapter, sites, dtype=torch.float16)
    shapes = {s: site_shape(s, adapter) for s in sites}
    dev = adapter.device
    dev_batches = []
    for b in batches:
        b.inputs = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in b.inputs.items()}
        dev_batches.append(b)

    @torch.no_grad()
    def bare(b):
        model(**b.inputs, logits_to_keep=1)

    def extract_batch(w, b, start):
        pos = [lay.image_positions for lay in b.layouts]
        res = cap.run(b, pos)
        for j, lay in enumerate(b.layouts):
            w.add(start + j, {}, lay.index_rows(pos[j], start + j), res[j])

    def round_(tag):
        """(a) and (b) alternate batch by batch, so both see the same background load."""
        n = sum(len(b) for b in dev_batches)
        w = StoreWriter(store_root / f"round{tag}", {"n_examples": n, "config": {}}, shapes, dtype="float16",
                        shard_examples=shard_examples)
        ta = tb = 0.0
        start = 0
        with w:
            for b in dev_batches:
                ta += timed(lambda: bare(b))
                tb += timed(lambda: extract_batch(w, b, start))
                start += len(b)
            tb += timed(w.close)  # the last shard's write counts against extraction
        return ta, tb

    round_("warm")  # warm-up (allocator, kernels, page cache)
    ratios, ta, tb = [], [], []
    for r in range(repeats):
        a, b = round_(r)
        ta.append(a)
        tb.append(b)
        ratios.append(b / a)
        print(f"  round {r}: bare {a:.3f}s  extract {b:.3f}s  ratio {b / a:.3f}", flush=True)
    n_img = sum(len(b) for b in dev_batches)
    return {
        "sites": len(sites),
        "images_per_round": n_img,
        "bare_s_median": statistics.median(ta),
        "extract_s_median": statistics.median(tb),
        "overhead_ratio_median": statistics.median(ratios),
        "bytes_per_image": int(sum(np.prod(s) for s in shapes.values()) * 2 * len(dev_batches[0].layouts[0].image_positions)),
    }


def peak_rss(model_dir: Path, n_images: int, root: Path) -> float:
    """Peak RSS (MiB) of one `sightline extract` process over n images."""
    data = root / f"data{n_images}" / "x"
    data.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        p = data / f"{i:05d}.png"
        if not p.exists():
            gradient(336, 336, i % 50).save(p)
    code = (
        "import resource, sys\n"
        "from sightline.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "sys.exit(rc)\n"
    )
    out = root / f"store{n_images}"
    r = subprocess.run(
        [sys.executable, "-c", code, "extract", "--model", str(model_dir), "--data", str(data.parent),
         "--sites", "resid.4", "--out", str(out), "--batch-size", "8", "--no-progress", "--shard-mb", "64"],
        capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
    )
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    kb = int(next(ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("PEAK_RSS_KB")))
    return kb / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16, help="images per timed round")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-examples", type=int, default=0,
                    help="close a shard every N examples (0: one shard per round, written at its end). A long "
                         "extraction writes each shard while the next ones compute; N = the batch size gives a "
                         "short round the same overlap, leaving only the last batch's write unhidden")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rss", default="100,1000", help="image counts for the peak-RSS runs ('' to skip)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--family", default="llava", help="model family (llava: the 60M LLaVA; others: tiny vision, "
                    "LM widened to hidden 512 x 8 layers)")
    a = ap.parse_args()
    torch.manual_seed(0)
    results: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "shard_examples": a.shard_examples}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = [gradient(336 + 16 * (i % 3), 336, i) for i in range(a.images)]
        from sightline.models import load_model

        model_dir = build_family_model(root, a.family)
        adapter = load_model(str(model_dir))
        n_params = sum(p.numel() for p in adapter.model.parameters())
        layout = "LLaVA-1.5 layout" if a.family == "llava" else f"{a.family} (tiny vision, LM 512 x 8)"
        results["model"] = f"{layout}, {n_params / 1e6:.1f}M params, fp32, CPU"
        results["family"] = a.family
        text = adapter.render_prompt("What is shown in this image?")
        batches = [adapter.prepare(images[k : k + a.batch_size], [text] * len(images[k : k + a.batch_size]))
                   for k in range(0, len(images), a.batch_size)]
        print(f"{results['model']}: {len(images)} images/round, batch {a.batch_size}, {a.repeats} rounds", flush=True)
        results.update(overhead(adapter, batches, a.repeats, root / "stores", a.shard_examples))
        if a.rss:
            del adapter, batches
            rss = {}
            for n in [int(x) for x in a.rss.split(",")]:
                t = time.perf_counter()
                rss[n] = peak_rss(model_dir, n, root)
                print(f"  peak RSS at {n} images: {rss[n]:.0f} MiB ({time.perf_counter() - t:.0f}s)", flush=True)
            ns = sorted(rss)
            results["peak_rss_mib"] = {str(k): round(v, 1) for k, v in rss.items()}
            results["peak_rss_growth"] = round(rss[ns[-1]] / rss[ns[0]] - 1, 4)
    print(json.dumps(results, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    print(f"overhead_ratio={results['overhead_ratio_median']:.4f}")


if __name__ == "__main__":
    main()

"""Key scan and key blocking cost: the detection scan against the forward passes it needs, a blocked forward against
the bare sdpa forward.

    OMP_NUM_THREADS=1 python benchmarks/key_scan.py      # ~60M LLaVA on CPU (the BENCHMARKS.md setting)

(a) bare: `model(**inputs, use_cache=True, logits_to_keep=1)` over the batches of N images (the forwards a scan
    cannot avoid: every layer's keys must be computed and cached).
(b) scan: `scan_keys` over the same images: every layer, every KV head, every image position, post- and pre-RoPE
    keys and the projector input control, float64 moments.
    scan_ratio = (b - a) / a: what the statistics add to the forwards (goal <= 0.2).
(c) blocked: the bare forward inside `apply_edits(block_edits(...))` blocking 8 different keys per layer and
    KV head (one BlockAttention per layer-head: a per-head mask) from the text queries and the later image queries.
    block_ratio = (c) / (a without the cache) (goal <= 1.10).
Each round alternates the variants batch by batch; medians over --repeats rounds. Last line:
`scan_ratio=<x> block_ratio=<y>`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from capture_overhead import build_cpu_model, gradient, timed


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8, help="images per timed round")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--per-head-keys", type=int, default=8, help="keys blocked per layer and KV head")
    ap.add_argument("--shared-heads", action="store_true",
                    help="block the same keys on every KV head of a layer (one edit and one mask per layer)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    from sightline.capture import apply_edits
    from sightline.kv import block_edits, scan_keys
    from sightline.models import load_model

    torch.manual_seed(0)
    results: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        ad = load_model(str(build_cpu_model(Path(tmp))))
        model = ad.model
        n_params = sum(p.numel() for p in model.parameters())
        results["model"] = f"LLaVA-1.5 layout, {n_params / 1e6:.1f}M params, fp32, CPU, {ad.attn_implementation}"
        text = ad.render_prompt("What is shown in this image?")
        images = [gradient(336, 336, i) for i in range(a.images)]
        batches = [ad.prepare(images[k:k + a.batch_size], [text] * len(images[k:k + a.batch_size]))
                   for k in range(0, len(images), a.batch_size)]
        lay = batches[0].layouts[0]
        grid = lay.grid_positions(0, 0).reshape(-1)
        rng = np.random.default_rng(0)
        block = {(L, h): rng.choice(len(grid), a.per_head_keys, replace=False)
                 for L in ad.kv_layers for h in range(ad.n_kv_heads)}
        if a.shared_heads:
            block = {(L, h): block[L, 0] for (L, h) in block}
        results["blocked_keys"] = f"{a.per_head_keys} per layer and KV head, " + (
            "the same on every head" if a.shared_heads else "different per head")
        S = batches[0].inputs["input_ids"].shape[1]
        edits = block_edits(ad, [grid], [int(lay.image_positions.max()) + 1], block, n_columns=S, image_queries=True,
                            broadcast=True)
        print(f"{results['model']}: {len(images)} images/round ({S} tokens, {len(grid)} image tokens), batch "
              f"{a.batch_size}, {ad.n_layers} layers x {ad.n_kv_heads} KV heads, {a.repeats} rounds", flush=True)

        @torch.no_grad()
        def bare(b, cache):
            model(**b.inputs, use_cache=cache, logits_to_keep=1)

        @torch.no_grad()
        def blocked(b):
            with apply_edits(ad, edits):
                model(**b.inputs, use_cache=False, logits_to_keep=1)

        def round_():
            t = {"fwd": 0.0, "scan": 0.0, "bare": 0.0, "blocked": 0.0}
            for b in batches:
                t["fwd"] += timed(lambda b=b: bare(b, True))
                t["bare"] += timed(lambda b=b: bare(b, False))
                t["blocked"] += timed(lambda b=b: blocked(b))
            t["scan"] = timed(lambda: scan_keys(ad, images, prompt="What is shown in this image?",
                                                batch_size=a.batch_size))
            return t

        round_()  # warm-up
        rounds = []
        for r in range(a.repeats):
            t = round_()
            t["scan_ratio"] = (t["scan"] - t["fwd"]) / t["fwd"]
            t["block_ratio"] = t["blocked"] / t["bare"]
            rounds.append(t)
            print(f"  round {r}: forwards {t['fwd']:.3f}s scan {t['scan']:.3f}s (ratio {t['scan_ratio']:.3f}); "
                  f"bare {t['bare']:.3f}s blocked {t['blocked']:.3f}s (ratio {t['block_ratio']:.3f})", flush=True)
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        results.update(images_per_round=len(images), tokens=S, medians=med,
                       scan_ratio_range=[min(r["scan_ratio"] for r in rounds), max(r["scan_ratio"] for r in rounds)],
                       block_ratio_range=[min(r["block_ratio"] for r in rounds), max(r["block_ratio"] for r in rounds)])
    print(json.dumps(results, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    print(f"scan_ratio={med['scan_ratio']:.4f} block_ratio={med['block_ratio']:.4f}")


if __name__ == "__main__":
    main()

"""Attention-edit overhead: blocking image keys from text queries at every layer vs the bare sdpa forward.

    python benchmarks/attention_block.py        # ~60M LLaVA on CPU (the BENCHMARKS.md setting)

(a) bare: `model(**inputs, logits_to_keep=1)` over prepared batches (sdpa; no padding, so HF passes
    no mask and sdpa runs causal).
(b) blocked: the same batches inside `apply_edits(adapter, [BlockAttention(every layer, image keys,
    text queries)])`: each layer's attention gets an explicit mask with those pairs removed.
(a) and (b) alternate batch by batch so both see the same background load; each round gives
sum(b) / sum(a), and the median over --repeats rounds is reported.
The last output line is `block_ratio=<median ratio>`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from capture_overhead import build_cpu_model, gradient, timed


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4, help="images per timed round")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    from sightline.capture import BlockAttention, apply_edits
    from sightline.models import load_model

    torch.manual_seed(0)
    results: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = load_model(str(build_cpu_model(Path(tmp))))
        model = adapter.model
        n_params = sum(p.numel() for p in model.parameters())
        results["model"] = f"LLaVA-1.5 layout, {n_params / 1e6:.1f}M params, fp32, CPU, {adapter.attn_implementation}"
        text = adapter.render_prompt("What is shown in this image?")
        images = [gradient(336, 336, i) for i in range(a.images)]
        batches = [adapter.prepare(images[k : k + a.batch_size], [text] * len(images[k : k + a.batch_size]))
                   for k in range(0, len(images), a.batch_size)]
        blocks = [BlockAttention(range(adapter.n_layers), [lay.image_positions for lay in b.layouts],
                                 [lay.text_positions for lay in b.layouts]) for b in batches]
        seq = batches[0].inputs["input_ids"].shape[1]
        print(f"{results['model']}: {len(images)} images/round ({seq} tokens), batch {a.batch_size}, "
              f"{a.repeats} rounds", flush=True)

        @torch.no_grad()
        def bare(b):
            model(**b.inputs, logits_to_keep=1)

        @torch.no_grad()
        def blocked(b, block):
            with apply_edits(adapter, [block]):
                model(**b.inputs, logits_to_keep=1)

        def round_():
            ta = tb = 0.0
            for b, block in zip(batches, blocks):
                ta += timed(lambda b=b: bare(b))
                tb += timed(lambda b=b, block=block: blocked(b, block))
            return ta, tb

        round_()  # warm-up
        ratios, ta, tb = [], [], []
        for r in range(a.repeats):
            x, y = round_()
            ta.append(x)
            tb.append(y)
            ratios.append(y / x)
            print(f"  round {r}: bare {x:.3f}s  blocked {y:.3f}s  ratio {y / x:.3f}", flush=True)
        results.update(images_per_round=len(images), tokens=seq, bare_s_median=statistics.median(ta),
                       blocked_s_median=statistics.median(tb), block_ratio_median=statistics.median(ratios),
                       block_ratio_range=[min(ratios), max(ratios)])
    print(json.dumps(results, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    print(f"block_ratio={results['block_ratio_median']:.4f}")


if __name__ == "__main__":
    main()

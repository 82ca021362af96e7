"""Perception sweep: readout cost against the forward passes that produced the features, and label
propagation (chunked) against a plain dense-affinity implementation.

    python benchmarks/perception_sweep.py                 # the organism, all six synthetic tasks
    python benchmarks/perception_sweep.py --units 40 --control

(1) `sightline perceive` on the organism: every task, every layer and KV head (values, keys, resid,
    projector, vision, encoder). The time inside the featurizers (the forward passes, one per batch of
    images, every site captured at once) is measured apart from the time spent making the synthetic
    data (rendering scenes and masks); the readout time is the rest of each task's time (classifiers,
    clustering, scoring, propagation, metrics). readout_ratio = readout / forward, summed over tasks.
(2) Label propagation of synthetic clips with `readouts.propagate` (chunked over target tokens,
    memory O(chunk * n_context * n)) and `readouts.propagate_dense` (one [n_context, n, n] affinity,
    written as DINO's code), alternated per clip: J&F of both (they must agree) and the time ratio
    dense / chunked on the organism's value features; then the same ratio on a LLaVA-OneVision-sized
    grid (27 x 27 = 729 tokens per frame, 8 context frames, 128-d head features) with random features.
    propagation_speedup = the median of the latter (dense time / chunked time).
The last output line is `readout_ratio=<x> propagation_speedup=<y>`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


class Timer:
    """Accumulates the wall time spent inside wrapped callables, per label."""

    def __init__(self):
        self.total: dict[str, float] = {}
        self.depth = 0

    def wrap(self, label, fn):
        def inner(*a, **kw):
            if self.depth:  # nested (a featurizer loading its images): counted by the outer label
                return fn(*a, **kw)
            self.depth += 1
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.total[label] = self.total.get(label, 0.0) + time.perf_counter() - t
                self.depth -= 1

        return inner


def sweep(units: int, control: bool, out: Path, model: str | None) -> dict:
    """One perceive run with the forward, data and per-task times separated."""
    import sightline.perception.represent as represent
    import sightline.perception.run as run
    from sightline.perception.run import PerceiveConfig, run_perceive

    timer = Timer()
    per_task: dict[str, dict] = {}
    orig_call = represent.Featurizer.__call__
    orig_task = run._run_task
    orig_image, orig_mask = run.load_image, run.load_mask

    def call(self, *a, **kw):
        return timer.wrap("forward", orig_call)(self, *a, **kw)

    def task(name, *a, **kw):
        before = dict(timer.total)
        t = time.perf_counter()
        res = orig_task(name, *a, **kw)
        wall = time.perf_counter() - t
        fwd = timer.total.get("forward", 0.0) - before.get("forward", 0.0)
        data = timer.total.get("data", 0.0) - before.get("data", 0.0)
        per_task[name] = {"seconds": wall, "forward": fwd, "data": data, "readout": wall - fwd - data}
        print(f"  {name:9s} {wall:7.2f}s  forward {fwd:6.2f}s  data {data:6.2f}s  readout {wall - fwd - data:6.2f}s",
              flush=True)
        return res

    represent.Featurizer.__call__ = call
    run._run_task = task
    run.load_image = timer.wrap("data", orig_image)
    run.load_mask = timer.wrap("data", orig_mask)
    try:
        res = run_perceive(PerceiveConfig(model=model, task="all", synthetic_units=units, control=control,
                                          out=str(out), progress=False))
    finally:
        represent.Featurizer.__call__ = orig_call
        run._run_task = orig_task
        run.load_image, run.load_mask = orig_image, orig_mask
    fwd = sum(t["forward"] for t in per_task.values())
    readout = sum(t["readout"] for t in per_task.values())
    n_reps = len(res.summary["reps"])
    return {"units_per_task": units, "control": control, "n_reps": n_reps, "per_task": per_task,
            "forward_s": fwd, "readout_s": readout, "readout_ratio": readout / fwd if fwd else None}


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def propagation_organism(n_clips: int, seed: int) -> dict:
    """Chunked vs dense propagation on the organism's values.1 over synthetic clips: J&F and time."""
    from sightline.data.perception import load_task
    from sightline.models import load_model
    from sightline.models.layout import mask_to_tokens, tokens_to_pixels
    from sightline.organism import checkpoint_path
    from sightline.perception.metrics import JFScores
    from sightline.perception.readouts import labels_to_onehot, propagate, propagate_dense
    from sightline.perception.represent import Featurizer, parse_reps
    from sightline.perception.tasks import load_image, load_mask

    ad = load_model(str(checkpoint_path()), progress=False)
    reps = parse_reps(["values.1"], "all", "concat", n_layers=ad.n_layers, n_kv_heads=ad.n_kv_heads,
                      n_vision_layers=ad.n_vision_layers)
    feat = Featurizer(ad, reps)
    data = load_task("tempcorr", "synthetic", None, seed=seed, synthetic={"n": n_clips, "n_frames": 8})
    scores = {"chunked": JFScores(), "dense": JFScores()}
    times = {"chunked": 0.0, "dense": 0.0}
    for ci, clip in enumerate(data.units):
        frames = [load_image(f) for f in clip.frames]
        masks = [load_mask(m) for m in clip.masks]
        fs = feat(frames)
        grid = fs[0].grid
        hw = (grid.rows, grid.cols)
        n_obj = int(masks[0][masks[0] != 255].max())
        cover = np.stack([mask_to_tokens(fs[0].layout, masks[0] == c) for c in range(n_obj + 1)], -1)
        first = labels_to_onehot(torch.as_tensor(np.nan_to_num(cover).argmax(-1).reshape(-1)), n_obj + 1)
        for how, fn in (("chunked", propagate), ("dense", propagate_dense)):
            ctx_f, ctx_l = [fs[0].feats["values.1"]], [first]
            preds = []
            for t in range(1, len(frames)):
                soft, dt = _timed(lambda: fn(fs[t].feats["values.1"], ctx_f[:1] + ctx_f[1:][-7:],
                                             ctx_l[:1] + ctx_l[1:][-7:], hw))
                times[how] += dt
                ctx_f.append(fs[t].feats["values.1"])
                ctx_l.append(soft)
                lab = soft.argmax(1).reshape(hw).numpy().astype(np.float32)
                preds.append(np.nan_to_num(tokens_to_pixels(fs[t].layout, lab)).astype(np.uint8))
            scores[how].add(f"clip{ci}", preds, masks[1:], n_obj)
    jf = {k: s.to_json()["J&F-Mean"] for k, s in scores.items()}
    return {"clips": n_clips, "grid": list(hw), "jf": jf, "seconds": times,
            "speedup": times["dense"] / times["chunked"] if times["chunked"] else None}


def propagation_large(rounds: int, grid: int = 27, d: int = 128, n_ctx: int = 8, chunk: int = 256) -> dict:
    """Dense vs chunked on one LLaVA-OneVision-sized frame (grid x grid tokens), random features."""
    from sightline.perception.readouts import propagate, propagate_dense

    g = torch.Generator().manual_seed(0)
    n = grid * grid
    feats = [torch.randn(n, d, generator=g) for _ in range(n_ctx + 1)]
    labs = [torch.softmax(torch.randn(n, 4, generator=g), 1) for _ in range(n_ctx)]
    ratios, td, tc = [], [], []
    diff = 0.0
    for _ in range(rounds):
        a, t_dense = _timed(lambda: propagate_dense(feats[0], feats[1:], labs, (grid, grid)))
        b, t_chunk = _timed(lambda: propagate(feats[0], feats[1:], labs, (grid, grid), chunk=chunk))
        diff = max(diff, float((a - b).abs().max()))
        td.append(t_dense)
        tc.append(t_chunk)
        ratios.append(t_dense / t_chunk)
    return {"grid": [grid, grid], "dim": d, "n_context": n_ctx, "chunk": chunk,
            "dense_s_median": statistics.median(td), "chunked_s_median": statistics.median(tc),
            "speedup_median": statistics.median(ratios), "max_abs_diff": diff,
            "affinity_bytes_dense": n_ctx * n * n * 4, "affinity_bytes_chunked": n_ctx * n * chunk * 4}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=20, help="synthetic units per task")
    ap.add_argument("--control", action="store_true", help="also score the random-weight control")
    ap.add_argument("--model", default=None, help="model folder (default: the organism)")
    ap.add_argument("--clips", type=int, default=10, help="synthetic clips for the propagation comparison")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the large-grid propagation timing")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    results: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"sweep: every task, {a.units} units each, control {'on' if a.control else 'off'}", flush=True)
        results["sweep"] = sweep(a.units, a.control, Path(tmp) / "perceive", a.model)
    s = results["sweep"]
    print(f"sweep: {s['n_reps']} reps; forward {s['forward_s']:.2f}s, readout {s['readout_s']:.2f}s, "
          f"ratio {s['readout_ratio']:.3f}", flush=True)
    results["propagation_organism"] = propagation_organism(a.clips, seed=1)
    po = results["propagation_organism"]
    print(f"propagation on the organism ({po['clips']} clips, grid {po['grid']}): J&F chunked "
          f"{po['jf']['chunked']:.4f} dense {po['jf']['dense']:.4f}; dense/chunked time {po['speedup']:.2f}",
          flush=True)
    results["propagation_large"] = propagation_large(a.rounds)
    pl = results["propagation_large"]
    print(f"propagation on a {pl['grid'][0]}x{pl['grid'][1]} grid, {pl['n_context']} context frames: dense "
          f"{pl['dense_s_median'] * 1e3:.1f} ms, chunked {pl['chunked_s_median'] * 1e3:.1f} ms (max diff "
          f"{pl['max_abs_diff']:.1e}); affinity memory {pl['affinity_bytes_dense'] / 2**20:.1f} MiB dense vs "
          f"{pl['affinity_bytes_chunked'] / 2**20:.1f} MiB per chunk", flush=True)
    print(json.dumps(results, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    print(f"readout_ratio={s['readout_ratio']:.4f} propagation_speedup={pl['speedup_median']:.4f}")


if __name__ == "__main__":
    main()

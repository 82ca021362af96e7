"""A store writer run as a separate process by tests/test_store.py (ranks, kill-and-resume).

    python tests/store_worker.py PATH --rank R --world-size W --n N --shard-bytes B
                                 [--resume] [--sleep S] [--hang-before-commit K]

Writes the synthetic examples of `make_example` whose id % W == R and that are not yet done.
--hang-before-commit K makes the K-th shard commit of this process (0-based) wait forever after its
tensor files are written and before its commit record is, so a test can kill it at that moment.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

SITES = {"resid.2": (6,), "resid.10": (5,), "keys.1": (2, 3)}
CONFIG = {"model": "synthetic", "layers": [1, 2, 10], "positions": "all"}


def n_tokens_of(i: int) -> int:
    """Ragged token counts, zero included."""
    return (i * 7919 + 3) % 11


def is_skipped(i: int) -> bool:
    return i % 9 == 4


def make_example(i: int, sites: dict = SITES) -> tuple[dict, np.ndarray, dict[str, torch.Tensor]]:
    """Deterministic example i: (meta, index int32 [n, 7], tensors float32 per site)."""
    n = n_tokens_of(i)
    g = torch.Generator().manual_seed(1000 + i)
    pos = 3 + np.arange(n)
    modality = np.arange(n) % 4
    is_img = modality == 1
    index = np.stack([
        np.full(n, i), pos, modality,
        np.where(is_img, 0, -1), np.where(is_img, i % 2, -1), np.where(is_img, pos // 4, -1), np.where(is_img, pos % 4, -1),
    ], axis=1).astype(np.int32)
    tensors = {s: torch.randn((n, *shape), generator=g) * 3 for s, shape in sites.items()}
    meta = {"source": f"img{i:04d}.png", "label": int(i % 5), "size_hw": [32 + i, 48]}
    return meta, index, tensors


def manifest(n: int) -> dict:
    return {"model_id": "synthetic", "config": CONFIG, "n_examples": n, "prompt": "describe"}


def write(path, rank=0, world_size=1, n=40, shard_bytes=1 << 20, resume=False, sleep=0.0, dtype="float16", ids=None):
    """Write this rank's share of examples 0..n-1 (skipping those already done)."""
    from sightline.store import StoreWriter

    with StoreWriter(path, manifest(n), SITES, dtype=dtype, rank=rank, world_size=world_size,
                     resume=resume, shard_bytes=shard_bytes) as w:
        for i in (range(n) if ids is None else ids):
            if i % world_size != rank or i in w.done:
                continue
            meta, index, tensors = make_example(i)
            if is_skipped(i):
                w.skip(i, meta, reason="corrupt image")
            else:
                w.add(i, meta, index, tensors)
            if sleep:
                time.sleep(sleep)
    return w


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--shard-bytes", type=int, default=1 << 20)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--hang-before-commit", type=int, default=-1)
    a = ap.parse_args(argv)
    if a.hang_before_commit >= 0:
        from sightline.store import format as fmt

        real, commits = fmt.write_text_atomic, [0]

        def slow_commit(path, text, tag, **kw):
            if path.name == fmt.RECORD:
                if commits[0] == a.hang_before_commit:
                    time.sleep(3600)
                commits[0] += 1
            return real(path, text, tag, **kw)

        fmt.write_text_atomic = slow_commit
    write(a.path, a.rank, a.world_size, a.n, a.shard_bytes, a.resume, a.sleep)


if __name__ == "__main__":
    main(sys.argv[1:])

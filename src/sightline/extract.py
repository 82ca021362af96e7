"""The extraction job: a dataset through a VLM, chosen sites captured, streamed into an ActivationStore.

Runs on one process or under `torchrun` (each rank takes examples id % world_size and writes its
own shards of the same store). Batches are formed from the rank's fixed example order before done
examples are removed, so a resumed run computes every batch exactly as an uninterrupted run would
and writes bit-identical tensors.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from sightline import __version__
from sightline.errors import BadImageError, UserError

POSITIONS = ("image", "text", "all")
STORE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class ExtractConfig:
    """Everything an extraction run depends on; saved in the store's manifest."""

    model: str
    """local checkpoint folder or hub id"""
    data: str
    """image folder (class subfolders or flat) or a .jsonl manifest"""
    out: str
    """store folder"""
    prompt: str | None = None
    """text after the image for examples without their own prompt (default: the image alone)"""
    prefix: str | None = None
    """text placed before the image in the user turn, for examples without their own"""
    raw_prompt: bool = False
    """feed the prompt as is, not through the model's chat template"""
    sites: str = "resid"
    """kinds (resid,keys,values,keys_prerope,attn_out,mlp_out,vision,projector) and/or exact sites (resid.3)"""
    layers: str = "all"
    """layers of the kinds given without one: all, 0,4,8 or 4-12"""
    positions: str = "image"
    """tokens kept: image, text or all"""
    dtype: str = "float16"
    """store dtype: float16, bfloat16 or float32"""
    model_dtype: str = "auto"
    """auto (bfloat16 on GPU, float32 on CPU), float32, float16, bfloat16"""
    batch_size: int = 8
    """examples per forward pass"""
    device: str = "auto"
    """auto, cpu, cuda, cuda:1, ..."""
    device_map: str | None = None
    """e.g. "auto" to spread a large model over GPUs (accelerate)"""
    revision: str | None = None
    """hub revision (branch, tag or commit)"""
    trust_remote_code: bool = False
    """run code shipped with the checkpoint (off unless you ask)"""
    resume: bool = False
    """continue an interrupted store"""
    limit: int | None = None
    """only the first N examples"""
    skip_bad: bool = False
    """record unreadable images in the store and go on"""
    shard_mb: float = 256.0
    """shard size in MiB"""
    progress: bool = True
    """show a progress bar"""

    # fields that change what is written: a resume must match them
    CONTENT_FIELDS = ("model", "data", "prompt", "prefix", "raw_prompt", "sites", "layers", "positions", "dtype",
                      "model_dtype", "revision", "limit", "batch_size")

    def content(self) -> dict:
        return {k: getattr(self, k) for k in self.CONTENT_FIELDS}

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA device is available; use --device cpu")
    return device


def _dist_info() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; initialises torch.distributed when > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def extract(cfg: ExtractConfig) -> Path:
    """Run an extraction; returns the store path. User mistakes raise UserError before anything is written."""
    import torch

    from sightline.capture import Capture, resolve_sites, site_shape
    from sightline.data import open_dataset
    from sightline.models import load_model
    from sightline.store import StoreWriter

    if cfg.positions not in POSITIONS:
        raise UserError(f"--positions must be one of {', '.join(POSITIONS)}, not {cfg.positions!r}")
    if cfg.dtype not in STORE_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(STORE_DTYPES)}, not {cfg.dtype!r}")
    if cfg.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    out = Path(cfg.out)
    rank, world = _dist_info()
    fresh = not (out.exists() and any(out.iterdir()))
    # fail before loading anything; under torchrun the writer does this check, allowing for sibling ranks
    if world == 1 and not fresh and not cfg.resume:
        raise UserError(f"output {out} exists and is not empty; pass --resume to continue it or choose another --out")

    device = _resolve_device(cfg.device) if cfg.device_map is None else None
    model_dtype = cfg.model_dtype
    if model_dtype == "auto":
        model_dtype = "bfloat16" if (device or "").startswith("cuda") or cfg.device_map else "float32"
    dataset = open_dataset(cfg.data, limit=cfg.limit)
    adapter = load_model(cfg.model, dtype=model_dtype, device=device, device_map=cfg.device_map,
                         revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    sites = resolve_sites(cfg.sites, cfg.layers, adapter.n_layers, adapter.n_vision_layers, adapter.kv_layers)
    shapes = {s: site_shape(s, adapter) for s in sites}
    texts = {}
    for ex in dataset:  # render every prompt up front: a template problem fails before any work
        p = ex.prompt if ex.prompt is not None else cfg.prompt
        texts.setdefault(p, adapter.render_prompt(p, prefix=cfg.prefix, raw=cfg.raw_prompt))

    manifest = {
        "sightline_version": __version__,
        "model": adapter.describe(),
        "config": cfg.content(),
        "run": cfg.to_json(),
        "dataset": {"kind": dataset.kind, "root": str(dataset.root), "classes": list(dataset.classes)},
        "n_examples": len(dataset),
        "world_size": world,
    }
    store_dtype = cfg.dtype
    capture = Capture(adapter, sites, dtype=getattr(torch, store_dtype))
    writer = StoreWriter(out, manifest, shapes, dtype=store_dtype, rank=rank, world_size=world,
                         resume=cfg.resume, shard_bytes=int(cfg.shard_mb * (1 << 20)))
    try:
        with writer:
            _run(cfg, dataset, adapter, capture, writer, texts, rank, world)
    except UserError:
        if fresh and world == 1:  # no half-written store for a user mistake (other ranks may still write)
            shutil.rmtree(out, ignore_errors=True)
        raise
    _barrier(world)
    return out


def _run(cfg, dataset, adapter, capture, writer, texts, rank, world) -> None:
    from tqdm.auto import tqdm

    from sightline.data import load_image

    mine = [i for i in range(len(dataset)) if i % world == rank]
    batches = [mine[k : k + cfg.batch_size] for k in range(0, len(mine), cfg.batch_size)]
    todo = [b for b in batches if any(i not in writer.done for i in b)]
    n_todo = sum(sum(i not in writer.done for i in b) for b in todo)

    def load(batch_ids):
        """Load and preprocess one batch (runs in a worker thread, overlapping the forward)."""
        good, images, bad = [], [], []
        for i in batch_ids:
            ex = dataset[i]
            try:
                images.append(load_image(ex.path))
                good.append(i)
            except BadImageError as e:
                if not cfg.skip_bad:
                    raise
                bad.append((i, e.reason))
        prompts = [texts[dataset[i].prompt if dataset[i].prompt is not None else cfg.prompt] for i in good]
        batch = adapter.prepare(images, prompts) if good else None
        return good, bad, batch

    bar = tqdm(total=n_todo, desc=f"extract[rank {rank}]" if world > 1 else "extract", unit="img",
               disable=not cfg.progress or (rank != 0 and world > 1), dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(load, todo[0]) if todo else None
        for k in range(len(todo)):
            good, bad, batch = future.result()
            if k + 1 < len(todo):
                future = pool.submit(load, todo[k + 1])
            for i, reason in bad:
                if i not in writer.done:
                    writer.skip(i, dataset[i].to_json(), reason)
                    bar.update(1)
            if batch is None:
                continue
            positions = [lay.positions(cfg.positions) for lay in batch.layouts]
            results = capture.run(batch, positions)
            for j, i in enumerate(good):
                if i in writer.done:
                    continue  # recomputed only so that the batch is the same as in the first run
                lay = batch.layouts[j]
                meta = dataset[i].to_json()
                meta.update(
                    text=batch.texts[j],
                    image_size_hw=list(batch.image_sizes_hw[j][0]),
                    seq_len=len(lay),
                    layout=[_grid_json(g, s) for g, s in zip(lay.grids, lay.grid_start)],
                )
                writer.add(i, meta, lay.index_rows(positions[j], i), results[j])
                bar.update(1)
    bar.close()


def _grid_json(g, start: int) -> dict:
    """A grid's facts, enough to map the store's (row, col) back to pixels."""
    return {
        "image": g.image,
        "view": g.view,
        "rows": g.rows,
        "cols": g.cols,
        "first_position": int(start),
        "newline": g.newline,
        "interpolated": g.interpolated,
        "image_size_hw": list(g.image_size_hw),
        "origin_xy": [float(v) for v in g.origin_xy],
        "step_xy": [float(v) for v in g.step_xy],
        # exact per-column / per-row pixel spans (x0, x1) / (y0, y1): differ from origin + k * step
        # where crops are not whole patches (LLaVA-OneVision's 384-px tiles)
        "col_spans": np.round(g.spans()[0], 4).tolist(),
        "row_spans": np.round(g.spans()[1], 4).tolist(),
    }


def config_from_json(path: str) -> ExtractConfig:
    """Read an ExtractConfig saved as JSON (e.g. a store manifest's `run`)."""
    d = json.loads(Path(path).read_text())
    d = d.get("run", d)
    known = {f.name for f in fields(ExtractConfig)}
    return ExtractConfig(**{k: v for k, v in d.items() if k in known})



"""The extraction job: a dataset through a VLM, chosen sites captured, streamed into an ActivationStore.

Runs on one process or under `torchrun` (each rank takes examples id % world_size and writes its
own shards of the same store). Batches are formed from the rank's fixed example order before done
examples are removed, so a resumed run computes every batch exactly as an uninterrupted run would
and writes bit-identical tensors.

An interrupt (Ctrl-C, or SIGTERM from a scheduler or `kill`) keeps every example captured so far:
the writer commits its buffer, and shards also close every `shard_examples` examples or
`shard_seconds` seconds, so even a hard kill loses little. `--resume` continues.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from sightline import __version__
from sightline.errors import BadImageError, Interrupted, UserError
from sightline.runtime import barrier, dist_info, resolve_placement

if TYPE_CHECKING:
    from sightline.data.datasets import Example

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
    """text placed before the image in the user turn, for examples without their own (a JSONL `prefix` column;
    an empty string there means no prefix)"""
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
    shard_examples: int = 1000
    """a shard also closes after this many examples (0: no limit), so a killed run loses at most these"""
    shard_seconds: float = 60.0
    """a shard also closes this many seconds after its first example (0: no limit)"""
    progress: bool = True
    """show a progress bar"""

    # fields that change what is written: a resume must match them
    CONTENT_FIELDS = ("model", "data", "prompt", "prefix", "raw_prompt", "sites", "layers", "positions", "dtype",
                      "model_dtype", "revision", "limit", "batch_size")

    def content(self) -> dict:
        return {k: getattr(self, k) for k in self.CONTENT_FIELDS}

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def extract(cfg: ExtractConfig) -> Path:
    """Run an extraction; returns the store path. User mistakes raise UserError before anything is written."""
    from sightline.models.base import check_model_folder, looks_local

    # what can be checked without torch is checked first: a mistake answers in a second
    if looks_local(cfg.model):
        check_model_folder(cfg.model)
    if cfg.positions not in POSITIONS:
        raise UserError(f"--positions must be one of {', '.join(POSITIONS)}, not {cfg.positions!r}")
    if cfg.dtype not in STORE_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(STORE_DTYPES)}, not {cfg.dtype!r}")
    if cfg.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if cfg.shard_mb <= 0 or cfg.shard_examples < 0 or cfg.shard_seconds < 0:
        raise UserError("--shard-mb must be positive and --shard-examples, --shard-seconds at least 0 (0: no limit)")
    out = Path(cfg.out)
    check_store_out(out)
    rank, world = dist_info()
    fresh = not (out.exists() and any(out.iterdir()))
    # fail before loading anything; under torchrun the writer does this check, allowing for sibling ranks
    if world == 1 and not fresh and not cfg.resume:
        raise UserError(f"output {out} exists and is not empty; pass --resume to continue it or choose another --out")

    import torch

    from sightline.capture import Capture, resolve_sites, site_shape
    from sightline.data import open_dataset
    from sightline.models import load_model
    from sightline.store import StoreWriter

    device, model_dtype = resolve_placement(cfg.device, cfg.model_dtype, cfg.device_map)
    dataset = open_dataset(cfg.data, limit=cfg.limit)
    adapter = load_model(cfg.model, dtype=model_dtype, device=device, device_map=cfg.device_map,
                         revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, progress=cfg.progress)
    sites = resolve_sites(cfg.sites, cfg.layers, adapter.n_layers, adapter.n_vision_layers, adapter.kv_layers)
    shapes = {s: site_shape(s, adapter) for s in sites}
    texts = {}
    for ex in dataset:  # render every prompt up front: a template problem fails before any work
        key = text_of(ex, cfg)
        if key not in texts:
            # an empty prefix is no prefix: the same text, hence the same tensors
            texts[key] = adapter.render_prompt(key[0], prefix=key[1] or None, raw=cfg.raw_prompt)

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
                         resume=cfg.resume, shard_bytes=max(1, int(cfg.shard_mb * (1 << 20))),
                         shard_examples=cfg.shard_examples, shard_seconds=cfg.shard_seconds)
    try:
        with sigterm_interrupts(), writer:
            _run(cfg, dataset, adapter, capture, writer, texts, rank, world)
    except UserError:
        if fresh and world == 1:  # no half-written store for a user mistake (other ranks may still write)
            shutil.rmtree(out, ignore_errors=True)
        raise
    except (KeyboardInterrupt, Interrupted) as e:
        # the writer has committed what it held: say what is kept and how to go on, in the exception
        msg = (f"{len(writer.done)} of {len(dataset)} examples are kept in {out}; "
               "rerun the same command with --resume to continue")
        raise type(e)(msg) from None
    barrier(world)
    return out


def text_of(example: Example, cfg: ExtractConfig) -> tuple[str | None, str | None]:
    """The (prompt, prefix) an example is rendered with: its own where it has one (not None), else the run's."""
    prompt = example.prompt if example.prompt is not None else cfg.prompt
    prefix = example.prefix if example.prefix is not None else cfg.prefix
    return prompt, prefix


def _example_meta(example: Example, cfg: ExtractConfig) -> dict:
    """The store's per-example metadata: the dataset's facts, with the prompt and prefix actually used."""
    prompt, prefix = text_of(example, cfg)
    return {**example.to_json(), "prompt": prompt, "prefix": prefix}


def check_store_out(out: Path) -> None:
    """Refuse an --out that is a file, or under a folder we cannot write to, before any work."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file, not a store folder; choose another --out")
    existing = out if out.exists() else out.absolute().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create {out}: {existing} is a file; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {existing} (permission denied); choose another --out")


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises `Interrupted` (as Ctrl-C raises KeyboardInterrupt), once.

    Only the main thread can set signal handlers; elsewhere this does nothing. The previous
    handler is restored on leaving. A second SIGTERM while the buffer commits is ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise Interrupted(f"stopped by signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


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
                    raise e.with_fix("fix or remove the file, or pass --skip-bad to record it and go on") from None
                bad.append((i, e.reason))
        prompts = [texts[text_of(dataset[i], cfg)] for i in good]
        batch = adapter.prepare(images, prompts) if good else None
        return good, bad, batch

    # closed on leaving, so an interrupt's message comes after the bar's last line
    with tqdm(total=n_todo, desc=f"extract[rank {rank}]" if world > 1 else "extract", unit="img",
              disable=not cfg.progress or (rank != 0 and world > 1), dynamic_ncols=True) as bar:
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(load, todo[0]) if todo else None
            for k in range(len(todo)):
                good, bad, batch = future.result()
                if k + 1 < len(todo):
                    future = pool.submit(load, todo[k + 1])
                for i, reason in bad:
                    if i not in writer.done:
                        writer.skip(i, _example_meta(dataset[i], cfg), reason)
                        bar.update(1)
                if batch is None:
                    continue
                positions = [lay.positions(cfg.positions) for lay in batch.layouts]
                results = capture.run(batch, positions)
                for j, i in enumerate(good):
                    if i in writer.done:
                        continue  # recomputed only so that the batch is the same as in the first run
                    lay = batch.layouts[j]
                    meta = _example_meta(dataset[i], cfg)
                    meta.update(
                        text=batch.texts[j],
                        image_size_hw=list(batch.image_sizes_hw[j][0]),
                        seq_len=len(lay),
                        layout=[g.to_json(s) for g, s in zip(lay.grids, lay.grid_start)],
                    )
                    writer.add(i, meta, lay.index_rows(positions[j], i), results[j])
                    bar.update(1)


def config_from_json(path: str) -> ExtractConfig:
    """Read an ExtractConfig saved as JSON (e.g. a store manifest's `run`)."""
    d = json.loads(Path(path).read_text())
    d = d.get("run", d)
    known = {f.name for f in fields(ExtractConfig)}
    return ExtractConfig(**{k: v for k, v in d.items() if k in known})



"""Train several SAEs in one pass over an ActivationStore: streaming, checkpoints with exact resume, DDP.

Data: tokens of one site stream from the store with its local shard shuffle (`iter_batches(shuffle=True)`,
a new seed per epoch), epoch after epoch, cut into fixed-size batches on a background thread.
modality "image" takes image and image-newline tokens, "text" text tokens, "both" a fixed share
`image_fraction` of image tokens in every batch (two streams; by default the store's own share,
as the paper trains on the image and text tokens it extracted); special (chat-template) tokens
are never used. Every SAE of the run sees the same batches.

Exact resume: each batch carries the stream position after it (epoch, tokens taken from that
epoch), saved with the checkpoint; a resumed run restarts the epoch's shuffled stream and skips
that many tokens (reading at most one epoch again), so it computes exactly the batches an
uninterrupted run would, and ends with the same weights.

DDP (`torchrun`): every rank streams the same global batch and trains on its 1/world slice;
losses are normalised by global-batch quantities and gradients summed across ranks, so the
update equals the one-process update up to float summation order (BatchTopK's batch-level
selection is the exception: it is over the rank's slice). Dead-latent counters and BatchTopK
thresholds are synchronised; rank 0 writes every file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import queue
import shutil
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sightline.config import FlagGroup, from_dict, to_dict
from sightline.errors import UserError
from sightline.models.layout import MODALITIES, TEXT
from sightline.report.files import RunFolder, RunResult, dumps, read_json, write_json
from sightline.runtime import barrier, dist_info, resolve_device
from sightline.sae.features import IMAGE_CODES
from sightline.sae.models import ARCHITECTURES, SAE, SAEConfig

# the token modalities (names in models.layout.MODALITIES) of each stream
MODALITY_CODES = {"image": tuple(MODALITIES[c] for c in IMAGE_CODES), "text": (MODALITIES[TEXT],)}
STREAM_TAGS = {"image": 0, "text": 1}
CHECKPOINT = "checkpoint"
LOG_FILE = "train_log.jsonl"
AUTO_MAX_BATCH = 4096  # the auto batch starts here ...
AUTO_MIN_BATCH = 256  # ... and is halved down to this at most
AUTO_MAX_EPOCHS = 100.0  # auto epochs repeat a small store at most this many times
# fields that change speed, not results: a resume may change them
RUNTIME_FIELDS = ("device", "threads", "prefetch", "progress")


def _values(v: Any, kind: type, what: str) -> tuple:
    """A tuple of numbers from a number, a sequence, or a comma-separated string ("1024,4096")."""
    items = v.split(",") if isinstance(v, str) else (v if isinstance(v, (list, tuple)) else [v])
    try:
        out = tuple(kind(x) for x in items)
    except (TypeError, ValueError):
        raise UserError(f"--{what} must be a number or a comma-separated list of numbers, got {v!r}") from None
    if not out:
        raise UserError(f"--{what} is empty")
    return out


def sae_grid(arch: str = "topk", widths: Any = (0,), ks: Any = (32,), l1_coeffs: Any = (5.0,),
             **common: Any) -> tuple[SAEConfig, ...]:
    """One SAEConfig per combination of width and k (topk/batchtopk) or width and l1_coeff (relu).

    Each list may be a comma-separated string ("1024,4096"), as the CLI passes it; `common` holds
    further SAEConfig fields (lr, aux_coeff, ...)."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown SAE architecture {arch!r}: use one of {', '.join(ARCHITECTURES)}")
    widths = _values(widths, int, "width")
    second = ("l1_coeff", _values(l1_coeffs, float, "l1-coeff")) if arch == "relu" else ("k", _values(ks, int, "k"))
    return tuple(SAEConfig(arch=arch, width=w, **{second[0]: v}, **common) for w in widths for v in second[1])


def _add_grid_flags(parser) -> None:
    """--arch --width --k --l1-coeff and the per-SAE knobs: one SAE per (width, k) or (width, l1_coeff)."""
    g = parser.add_argument_group("SAEs trained together (one per width x k, or width x l1-coeff for relu)")
    g.add_argument("--arch", dest="arch", default=argparse.SUPPRESS, help="topk, batchtopk or relu (default: topk)")
    g.add_argument("--width", dest="width", default=argparse.SUPPRESS,
                   help="latents, a comma list (0: --expansion x d; default 0)")
    g.add_argument("--k", dest="k", default=argparse.SUPPRESS,
                   help="active latents per token, a comma list (default 32)")
    g.add_argument("--l1-coeff", dest="l1_coeff", default=argparse.SUPPRESS,
                   help="relu: L1 strength, a comma list (default 5)")
    g.add_argument("--expansion", dest="expansion", type=int, default=argparse.SUPPRESS,
                   help="width = expansion x d when --width is 0 (default 8)")
    g.add_argument("--lr", dest="lr", type=float, default=argparse.SUPPRESS,
                   help="Adam lr (default: relu 5e-5, topk scaled by width)")
    g.add_argument("--aux-k", dest="aux_k", type=int, default=argparse.SUPPRESS,
                   help="AuxK: dead latents used to reconstruct the residual (0: d/2)")
    g.add_argument("--aux-coeff", dest="aux_coeff", type=float, default=argparse.SUPPRESS,
                   help="AuxK weight (default 1/32 for topk/batchtopk, off for relu)")
    g.add_argument("--grad-clip", dest="grad_clip", type=float, default=argparse.SUPPRESS,
                   help="clip each SAE's gradient norm (default: relu 1, else off)")


def _build_grid(values: dict[str, Any]) -> tuple[SAEConfig, ...]:
    grid = {k: values[k] for k in ("arch", "width", "k", "l1_coeff") if k in values}
    common = {k: values[k] for k in ("expansion", "lr", "aux_k", "aux_coeff", "grad_clip") if k in values}
    return sae_grid(grid.get("arch", "topk"), grid.get("width", (0,)), grid.get("k", (32,)),
                    grid.get("l1_coeff", (5.0,)), **common)


SAE_GRID_FLAGS = FlagGroup(_add_grid_flags, _build_grid,
                           ("arch", "width", "k", "l1_coeff", "expansion", "lr", "aux_k", "aux_coeff", "grad_clip"))


@dataclass(frozen=True)
class SAETrainConfig:
    """Everything an SAE training run depends on (saved as OUT/config.json)."""

    store: str = field(default="", metadata={"positional": True})
    """ActivationStore folder to train on."""
    site: str = ""
    """The site whose tokens the SAEs reconstruct, e.g. resid.2."""
    out: str = "sae-run"
    """Output folder (config.json, results.json, figures/, index.html, one SAELens folder per SAE)."""
    modality: str = "image"
    """Tokens trained on: image, text or both."""
    image_fraction: float = 0.0
    """modality both: share of image tokens in every batch; 0: the store's own share."""
    batch_size: int = 0
    """Tokens per step (the global batch under torchrun); 0: auto, 4096 halved (not below 256) until the run
    makes at least --min-steps steps."""
    total_tokens: int = 0
    """Tokens to train on; 0: --epochs passes over the chosen tokens."""
    epochs: float = 0.0
    """Passes over the chosen tokens when --total-tokens is 0; 0: auto, one pass, or more (at most 100) when one
    pass is too little: enough for --min-steps steps of the batch (256 when auto) and for --min-tokens-per-latent
    tokens per latent of the widest SAE."""
    min_steps: int = 200
    """Fewest optimiser steps that make a run meaningful: auto batch/epochs aim for it, and a run with fewer is
    flagged too short (a warning, `too_short` in results.json)."""
    min_tokens_per_latent: float = 10.0
    """Tokens a run should see per latent of its widest SAE: auto epochs aim for it; fewer is flagged too short."""
    allow_incomplete: bool = False
    """Train on an incomplete store (an interrupted extraction) instead of refusing; the run warns and records
    `incomplete` and the store's counts in results.json."""
    lr_warmup_frac: float = 0.0
    """Linear lr warm-up over this fraction of the steps."""
    lr_decay_frac: float = 0.2
    """Linear decay to 0 over the last fraction of the steps (paper: 20%)."""
    dead_tokens: int = 0
    """A latent silent this many tokens is dead (AuxK, metrics); 0: min(10M, total / 10)."""
    seed: int = 0
    """Seed of the token order and of every SAE's initialisation."""
    saes: tuple[SAEConfig, ...] = field(default=(SAEConfig(),), metadata={"group": SAE_GRID_FLAGS})
    """The SAEs trained together on the same batches (flags: --arch --width --k --l1-coeff ...)."""
    checkpoint_every: int = 500
    """Steps between checkpoints (an interrupted run resumes from the last)."""
    log_every: int = 20
    """Steps between lines of train_log.jsonl."""
    shuffle_shards: int = 4
    """Store shards shuffled together."""
    scale_tokens: int = 65536
    """Tokens used to estimate the input scale and the initial decoder bias."""
    device: str = "auto"
    """auto (the local rank's CUDA device if any, else cpu), cpu, cuda:0."""
    threads: int = 0
    """torch threads; 0: torch's default."""
    prefetch: bool = True
    """Read batches on a background thread."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field (sightline.config.to_dict)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAETrainConfig:
        """The config `to_dict` (a run's config.json) describes."""
        return from_dict(cls, d)

    def content(self) -> dict[str, Any]:
        """The fields that determine the result (a resume must match them)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}


# ---------------------------------------------------------------------- distributed
def _all_reduce(t: torch.Tensor, world: int, op: str = "sum") -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


# ---------------------------------------------------------------------- data
def _epoch_seed(seed: int, tag: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, tag, epoch]).generate_state(1)[0])


class TokenStream:
    """Endless deterministic stream of [n, d] chunks of one site's tokens of some modalities, epoch after epoch.

    Each chunk comes with the position after it, (epoch, tokens taken from that epoch's shuffled
    order); a stream started at that position continues exactly where the first left off."""

    def __init__(self, store, site: str, modalities: tuple[str, ...], n: int, seed: int, tag: int,
                 shuffle_shards: int, start: tuple[int, int] = (0, 0)):
        self.store, self.site, self.modalities, self.n = store, site, modalities, n
        self.seed, self.tag, self.shuffle_shards, self.start = seed, tag, shuffle_shards, start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, tuple[int, int]]]:
        epoch, skip = self.start
        buf: list[torch.Tensor] = []
        have = 0
        while True:
            taken = 0
            seen = False
            for b in self.store.iter_batches([self.site], batch_size=self.n, shuffle=True,
                                             seed=_epoch_seed(self.seed, self.tag, epoch),
                                             modality=list(self.modalities), shuffle_shards=self.shuffle_shards):
                t = b[self.site]
                t = t.reshape(len(t), -1)
                seen = True
                if skip:
                    drop = min(skip, len(t))
                    t, skip, taken = t[drop:], skip - drop, taken + drop
                while len(t):
                    m = min(self.n - have, len(t))
                    buf.append(t[:m])
                    t, have, taken = t[m:], have + m, taken + m
                    if have == self.n:
                        yield (buf[0] if len(buf) == 1 else torch.cat(buf)), (epoch, taken)
                        buf, have = [], 0
            if not seen:
                raise UserError(f"store {self.store.path} has no {'/'.join(self.modalities)} tokens at {self.site}")
            epoch += 1


class Batches:
    """Global batches [batch_size, d] (store dtype) with the stream positions after each; optionally prefetched."""

    def __init__(self, store, cfg: SAETrainConfig, starts: list[tuple[int, int]] | None = None, tag_offset: int = 0):
        self.parts = _stream_sizes(cfg, store)
        starts = starts or [(0, 0)] * len(self.parts)
        self.streams = [TokenStream(store, cfg.site, MODALITY_CODES[m], n, cfg.seed, STREAM_TAGS[m] + tag_offset,
                                    cfg.shuffle_shards, start)
                        for (m, n), start in zip(self.parts, starts)]
        # "both": interleave the two streams' tokens in a fixed order, so DDP slices hold both modalities
        self.perm = (torch.randperm(cfg.batch_size, generator=torch.Generator().manual_seed(cfg.seed))
                     if len(self.parts) > 1 else None)
        self.load_seconds = 0.0  # time spent producing batches
        self.wait_seconds = 0.0  # time the consumer waited for them
        self._prefetch = cfg.prefetch
        self._q: queue.Queue | None = None
        self._stop = threading.Event()

    def _produce(self) -> Iterator[tuple[torch.Tensor, list[tuple[int, int]]]]:
        its = [iter(s) for s in self.streams]
        while True:
            t0 = time.perf_counter()
            got = [next(it) for it in its]
            x = got[0][0] if len(got) == 1 else torch.cat([g[0] for g in got]).index_select(0, self.perm)
            self.load_seconds += time.perf_counter() - t0
            yield x, [g[1] for g in got]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[tuple[int, int]]]]:
        gen = self._produce()
        if not self._prefetch:
            while True:
                t0 = time.perf_counter()
                item = next(gen)
                self.wait_seconds += time.perf_counter() - t0
                yield item
        self._q = q = queue.Queue(maxsize=3)

        def work() -> None:
            try:
                for item in gen:
                    while not self._stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
            except BaseException as e:  # handed to the consumer
                q.put(e)

        th = threading.Thread(target=work, daemon=True, name="sae-batches")
        th.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                self.wait_seconds += time.perf_counter() - t0
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._stop.set()
            th.join(timeout=5)


def _count(store, part: str) -> int:
    """Tokens of a modality part ("image" or "text") in the store."""
    return int(np.isin(store.index["modality"], [MODALITIES.index(m) for m in MODALITY_CODES[part]]).sum())


def _stream_sizes(cfg: SAETrainConfig, store) -> list[tuple[str, int]]:
    """(modality part, tokens per batch) of each stream."""
    if cfg.modality != "both":
        return [(cfg.modality, cfg.batch_size)]
    frac = cfg.image_fraction
    if frac <= 0:
        n_img, n_txt = _count(store, "image"), _count(store, "text")
        frac = n_img / max(1, n_img + n_txt)
    n_img = int(round(cfg.batch_size * frac))
    for part, n in (("image", n_img), ("text", cfg.batch_size - n_img)):
        if n < 1:
            raise UserError(f"a batch of {cfg.batch_size} holds no {part} tokens (image share {frac:.3f} of the store "
                            f"{store.path}); set --image-fraction, or extract with --positions all")
    return [("image", n_img), ("text", cfg.batch_size - n_img)]


# ---------------------------------------------------------------------- schedule and checkpoints
def lr_factor(step: int, total: int, warmup_frac: float, decay_frac: float) -> float:
    """Multiplier of the base lr at `step`: linear warm-up, constant, linear decay to 0 over the last decay_frac."""
    f = 1.0
    if warmup_frac > 0:
        f = min(f, (step + 1) / max(1.0, warmup_frac * total))
    if decay_frac > 0:
        start = (1 - decay_frac) * total
        if step >= start:
            f = min(f, (total - step) / max(1.0, decay_frac * total))
    return f


def _save_checkpoint(path: Path, saes: list[SAE], opts: list[torch.optim.Optimizer], since_fired: list[torch.Tensor],
                     state: dict[str, Any]) -> None:
    """Weights, buffers, dead counters and Adam state (safetensors) + step and stream positions (JSON); atomic."""
    from sightline.report.files import save_safetensors as save_file  # mode like every other file

    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for i, (sae, opt, dead) in enumerate(zip(saes, opts, since_fired)):
        tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
        tensors["_since_fired"] = dead.cpu()
        save_file(tensors, str(tmp / f"sae_{i}.safetensors"))
        names = {id(p): n for n, p in sae.named_parameters()}
        adam = {}
        for group in opt.param_groups:
            for p in group["params"]:
                for k, v in opt.state.get(p, {}).items():
                    adam[f"{names[id(p)]}::{k}"] = torch.as_tensor(v).detach().cpu().clone()
        save_file(adam, str(tmp / f"adam_{i}.safetensors"))
    write_json(tmp / "state.json", state, indent=1)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def _load_checkpoint(path: Path, saes: list[SAE], opts: list[torch.optim.Optimizer],
                     since_fired: list[torch.Tensor]) -> dict[str, Any]:
    from safetensors.torch import load_file

    for i, (sae, opt, dead) in enumerate(zip(saes, opts, since_fired)):
        dev = sae.W_enc.device
        tensors = load_file(str(path / f"sae_{i}.safetensors"))
        dead.copy_(tensors.pop("_since_fired"))
        sae.load_state_dict(tensors)
        params = dict(sae.named_parameters())
        for key, v in load_file(str(path / f"adam_{i}.safetensors")).items():
            name, k = key.split("::")
            opt.state[params[name]][k] = v if k == "step" else v.to(dev)
    return json.loads((path / "state.json").read_text())


# ---------------------------------------------------------------------- the run
def _check(cfg: SAETrainConfig, store) -> tuple[int, list[str]]:
    """Validate against the store; returns (d_in, SAE folder names)."""
    if cfg.modality not in ("image", "text", "both"):
        raise UserError(f"--modality must be image, text or both, not {cfg.modality!r}")
    if cfg.modality == "both" and not 0 <= cfg.image_fraction < 1:
        raise UserError(f"--image-fraction must be in [0, 1) (0: the store's own share), got {cfg.image_fraction}")
    if cfg.batch_size != 0 and cfg.batch_size < 2:
        raise UserError("--batch-size must be at least 2 (or 0: auto)")
    if cfg.total_tokens < 0 or cfg.epochs < 0:
        raise UserError("--total-tokens and --epochs must be >= 0 (0: auto)")
    if cfg.min_steps < 1 or cfg.min_tokens_per_latent < 0:
        raise UserError("--min-steps must be at least 1 and --min-tokens-per-latent >= 0")
    if not cfg.saes:
        raise UserError("no SAEs to train: give at least one variant")
    if not cfg.site:
        raise UserError("no --site given: choose one of the store's sites, e.g. resid.2")
    store.shape(cfg.site)  # UserError listing the sites if absent
    d_in = int(np.prod(store.shape(cfg.site)))
    names = [s.name or s.default_name() for s in cfg.saes]
    seen: dict[str, int] = {}
    for j, n in enumerate(names):
        if n in seen:
            if cfg.saes[j].name:
                raise UserError(f"two SAEs are named {n!r}; give them different names")
            seen[n] += 1
            names[j] = f"{n}-{seen[n]}"
        else:
            seen[n] = 0
    for s in cfg.saes:
        s.resolved(d_in)  # k > width etc. fail here
    return d_in, names


@dataclass(frozen=True)
class Schedule:
    """How long a run trains, as resolved from its config and its store (the rule in the field docstrings)."""

    batch_size: int
    total_tokens: int  # asked for; the run trains steps * batch_size of them
    steps: int
    epochs: float  # passes over the distinct tokens that steps * batch_size makes
    too_short: bool  # fewer steps than min_steps or fewer tokens than min_tokens_per_latent x width
    warnings: tuple[str, ...]  # why it is too short, or otherwise doubtful


def plan_schedule(cfg: SAETrainConfig, n_avail: int, max_width: int) -> Schedule:
    """Batch size, tokens and steps of a run over `n_avail` distinct tokens whose widest SAE has `max_width`
    latents; auto values (0) follow the rule in SAETrainConfig's docstrings, given ones are kept, and the
    warnings say when the result is still too short (< min_steps steps or < min_tokens_per_latent x width)."""
    need_tokens = int(math.ceil(cfg.min_tokens_per_latent * max_width))
    if cfg.total_tokens:
        total = cfg.total_tokens
    elif cfg.epochs > 0:
        total = int(cfg.epochs * n_avail)
    else:
        floor = cfg.batch_size or AUTO_MIN_BATCH
        want = max(n_avail, cfg.min_steps * floor, need_tokens)
        total = int(min(want, AUTO_MAX_EPOCHS * n_avail))
    batch = cfg.batch_size
    if not batch:
        batch = AUTO_MAX_BATCH
        while batch > AUTO_MIN_BATCH and total // batch < cfg.min_steps:
            batch //= 2
    steps = max(1, total // batch)
    seen = steps * batch
    warnings = []
    too_short = steps < cfg.min_steps or seen < need_tokens
    if steps < cfg.min_steps:
        warnings.append(f"too short: {steps} optimiser step(s) of {batch} tokens (fewer than --min-steps "
                        f"{cfg.min_steps}); the SAEs are barely trained: extract more images, or lower --batch-size")
    if seen < need_tokens:
        warnings.append(f"too short: {seen:,} tokens seen for {max_width:,} latents (fewer than "
                        f"{cfg.min_tokens_per_latent:g} per latent); extract more images, raise --epochs, or train "
                        "narrower SAEs")
    if n_avail < max_width:
        warnings.append(f"only {n_avail:,} distinct tokens for {max_width:,} latents: the dictionary can memorise "
                        "them; extract more images")
    return Schedule(batch, total, steps, round(seen / max(n_avail, 1), 4), too_short, tuple(warnings))


def _n_tokens(store, cfg: SAETrainConfig) -> int:
    """Tokens the run draws from (image, text or both)."""
    return sum(_count(store, part) for part in (("image", "text") if cfg.modality == "both" else (cfg.modality,)))


def _estimate_scale(store, cfg: SAETrainConfig, d_in: int) -> tuple[float, torch.Tensor]:
    """Input scale sqrt(d) / mean token norm over `scale_tokens` tokens, and up to 8192 of them scaled (for init)."""
    small = dataclasses.replace(cfg, prefetch=False)
    norm_sum, n, keep = 0.0, 0, []
    for x, _ in Batches(store, small, tag_offset=100):  # its own shuffle: training batches stay untouched
        x = x.float()
        take = min(len(x), max(1, cfg.scale_tokens) - n)
        norm_sum += float(x[:take].norm(dim=1).sum())
        n += take
        if sum(len(k) for k in keep) < 8192:
            keep.append(x[:take])
        if n >= cfg.scale_tokens:
            break
    mean_norm = norm_sum / max(n, 1)
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise UserError(f"the {cfg.site} activations in {store.path} have mean norm {mean_norm}; cannot scale them")
    scale = math.sqrt(d_in) / mean_norm
    return scale, torch.cat(keep)[:8192] * scale


class _Interrupted(Exception):
    """The session ended early (`stop_after`): the partial folder stays, to be resumed."""


def _finished_run(out: Path, cfg: SAETrainConfig, names: list[str]) -> RunResult | None:
    """The finished run in `out` if it is this config's; None if `out` is empty or absent; else a UserError."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not (out / "config.json").is_file() or not (out / "results.json").is_file():
        raise UserError(f"output {out} exists and is not an SAE run (or not a finished one); choose another --out")
    _check_same_run(out, cfg)
    if not all((out / n).is_dir() for n in names):
        raise UserError(f"{out} holds an SAE run without all of its SAE folders; choose another --out or delete it")
    return RunResult(out, read_json(out / "results.json")["summary"])


def _check_same_run(folder: Path, cfg: SAETrainConfig) -> None:
    """UserError unless folder/config.json is a config with the same content as `cfg` (a resume may change
    only RUNTIME_FIELDS)."""
    try:
        saved = SAETrainConfig.from_dict(read_json(folder / "config.json"))
    except (ValueError, TypeError, UserError) as e:
        raise UserError(f"{folder / 'config.json'} is not a readable SAE run config ({e}); "
                        "choose another --out") from None
    if saved.content() != cfg.content():
        raise UserError(f"{folder} holds an SAE run with another config; choose another --out or delete it")


def train_saes(config: SAETrainConfig, progress: bool = True, stop_after: int | None = None) -> RunResult | None:
    """Train every SAE of `config` in one pass into the run folder `config.out` (docs/outputs.md): one
    SAELens folder per SAE (OUT/<name>), config.json, results.json, figures/, index.html, train_log.jsonl.

    Work happens in OUT.partial, which an interruption leaves behind: the next call with the same config
    resumes from its checkpoint exactly. A finished run with the same config returns at once.
    `stop_after` ends the session after that many steps in total (as an interruption would) and returns
    None. The summary's `paths` lists the SAE folders."""
    from sightline.store import ActivationStore

    from sightline.store.completeness import require_complete

    cfg = config
    progress = progress and cfg.progress
    store = ActivationStore.open(cfg.store)
    d_in, names = _check(cfg, store)
    store_state, store_warnings = require_complete(store, cfg.allow_incomplete)
    n_avail = _n_tokens(store, cfg)
    if n_avail == 0:
        raise UserError(f"store {store.path} has no {cfg.modality} tokens; extract with --positions all or image")
    sched = plan_schedule(cfg, n_avail, max(s.resolved(d_in).width for s in cfg.saes))
    # the run trains with the resolved batch and token count; config.json keeps what was asked (auto: 0)
    run_cfg = dataclasses.replace(cfg, batch_size=sched.batch_size, total_tokens=sched.total_tokens)
    _stream_sizes(run_cfg, store)  # a batch without one of the modalities fails here
    device = torch.device(resolve_device(cfg.device))
    rank, world = dist_info()
    out = Path(cfg.out)
    done = _finished_run(out, cfg, names)
    if done is not None:
        return done
    work = out.with_name(out.name + ".partial")
    if (work / "config.json").exists():
        _check_same_run(work, cfg)
    barrier(world)
    try:
        with (RunFolder(out, keep_partial=True) if rank == 0 else contextlib.nullcontext(work)) as work:
            if rank == 0 and not (work / "config.json").exists():
                write_json(work / "config.json", to_dict(cfg))
            barrier(world)
            notes = {"schedule": sched, "warnings": [*store_warnings, *sched.warnings], "store_state": store_state}
            threads = torch.get_num_threads()
            try:  # cfg.threads is the training's, not the calling process's: put torch's setting back after
                summary = _train(run_cfg, store, d_in, names, n_avail, device, rank, world, work, out, progress,
                                 stop_after, notes)
            finally:
                torch.set_num_threads(threads)
            if summary is None:
                raise _Interrupted
    except _Interrupted:
        return None
    barrier(world)
    return RunResult(out, summary)


def _train(cfg: SAETrainConfig, store, d_in: int, names: list[str], n_avail: int, device: torch.device, rank: int,
           world: int, work: Path, out: Path, progress: bool, stop_after: int | None,
           notes: dict[str, Any]) -> dict[str, Any] | None:
    """The training loop, in the partial folder `work` (cfg: batch_size and total_tokens resolved); the run's
    summary, or None when stopped early. `notes`: the schedule, warnings and store state for the summary."""
    from tqdm.auto import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sched: Schedule = notes["schedule"]
    n_steps = sched.steps
    dead_tokens = cfg.dead_tokens or min(10_000_000, max(cfg.batch_size, n_steps * cfg.batch_size // 10))

    ckpt = work / CHECKPOINT
    state: dict[str, Any] | None = None
    if (ckpt / "state.json").exists():
        state = json.loads((ckpt / "state.json").read_text())
    if state is not None:
        scale, x0 = float(state["input_scale"]), None
    else:
        scale, x0 = _estimate_scale(store, cfg, d_in)
    model_name = str(store.manifest.get("config", {}).get("model", "")) if isinstance(store.manifest, dict) else ""

    saes: list[SAE] = []
    for s, name in zip(cfg.saes, names):
        sc = dataclasses.replace(s.resolved(d_in), site=cfg.site, modality=cfg.modality, input_scale=scale, name=name)
        sae = ARCHITECTURES[sc.arch](sc)
        # seeded by name, not place in the list: an SAE trains the same alone or beside others
        sae.reset_parameters(torch.Generator().manual_seed(_epoch_seed(cfg.seed, zlib.crc32(name.encode()), 1)))
        if x0 is not None:
            sae.init_from_data(x0)
        sae.model_name = model_name
        saes.append(sae.to(device))
    opts = [torch.optim.Adam(s.parameters(), lr=s.cfg.lr) for s in saes]
    since_fired = [torch.zeros(s.cfg.width, dtype=torch.long, device=device) for s in saes]
    start, log_lines, starts = 0, 0, None
    if state is not None:
        state = _load_checkpoint(ckpt, saes, opts, since_fired)
        start, log_lines, starts = int(state["step"]), int(state["log_lines"]), [tuple(p) for p in state["streams"]]
    log_path = work / LOG_FILE
    if rank == 0:
        lines = log_path.read_text().splitlines(keepends=True)[:log_lines] if log_path.exists() else []
        tmp = log_path.with_name(LOG_FILE + ".tmp")
        tmp.write_text("".join(lines))
        tmp.rename(log_path)

    lo, hi = rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world
    # fvu, l0, aux, loss summed over the steps since the last log line (this rank's share)
    acc = torch.zeros(len(saes), 4, dtype=torch.float64, device=device)
    acc_steps = 0
    if state is not None:
        acc_steps = int(state["window_steps"])
        if rank == 0:  # saved summed over ranks: rank 0 carries them, the others start at 0
            acc.copy_(torch.tensor(state["window"], dtype=torch.float64))
    last = {}
    batches = Batches(store, cfg, starts)
    t_start = time.perf_counter()
    bar = tqdm(total=n_steps, initial=start, desc="sae train", unit="step", disable=not progress or rank != 0,
               dynamic_ncols=True)
    it = iter(batches)
    step = start
    try:
        while step < n_steps:
            x_lp, positions = next(it)
            x = x_lp.to(device, non_blocking=True).float().mul_(scale)
            total_var = (x - x.mean(0)).pow(2).sum()
            x_local = x[lo:hi]
            progress_frac = step / n_steps
            lr_f = lr_factor(step, n_steps, cfg.lr_warmup_frac, cfg.lr_decay_frac)
            outs = []
            for sae, opt, dead in zip(saes, opts, since_fired):
                opt.zero_grad(set_to_none=True)
                o = sae.training_losses(x_local, total_var, cfg.batch_size, progress_frac, dead >= dead_tokens)
                o.loss.backward()
                outs.append(o)
            if world > 1:
                grads = [p.grad for s in saes for p in s.parameters()]
                flat = _all_reduce(torch.cat([g.reshape(-1) for g in grads]), world)
                off = 0
                for g in grads:
                    g.copy_(flat[off : off + g.numel()].view_as(g))
                    off += g.numel()
                fired_all = _all_reduce(torch.cat([o.fired for o in outs]).to(torch.int32), world, "max").bool()
                fired = fired_all.split([s.cfg.width for s in saes])
            else:
                fired = [o.fired for o in outs]
            for j, (sae, opt, o) in enumerate(zip(saes, opts, outs)):
                sae.before_step()
                if sae.cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(sae.parameters(), sae.cfg.grad_clip)
                for group in opt.param_groups:
                    group["lr"] = sae.cfg.lr * lr_f
                opt.step()
                sync = {k: _all_reduce(v.detach().clone().float(), world) / world for k, v in o.sync.items()}
                sae.after_step(sync)
                since_fired[j].add_(cfg.batch_size).masked_fill_(fired[j], 0)
                acc[j] += torch.stack([o.fvu, o.l0, o.aux, o.loss.detach()]).to(acc)
            acc_steps += 1
            step += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == n_steps:
                _all_reduce(acc, world)
                vals = (acc / acc_steps).tolist()
                dead_frac = [float((d >= dead_tokens).float().mean()) for d in since_fired]
                elapsed = time.perf_counter() - t_start
                last = {"step": step, "tokens": step * cfg.batch_size, "seconds": round(elapsed, 2),
                        "tokens_per_s": round((step - start) * cfg.batch_size / max(elapsed, 1e-9), 1),
                        "lr_factor": round(lr_f, 5),
                        "load_frac": round(batches.load_seconds / max(elapsed, 1e-9), 4),
                        "wait_frac": round(batches.wait_seconds / max(elapsed, 1e-9), 4),
                        "saes": {n: {"fvu": round(v[0], 6), "l0": round(v[1], 3), "aux": round(v[2], 6),
                                     "loss": round(v[3], 6), "dead_frac": round(df, 5)}
                                 for n, v, df in zip(names, vals, dead_frac)}}
                if rank == 0:
                    with open(log_path, "a") as f:
                        f.write(dumps(last, indent=None) + "\n")
                    log_lines += 1
                    bar.set_postfix_str(" ".join(
                        f"{n[:14]}:fvu={v[0]:.3f},l0={v[1]:.1f},dead={df:.1%}" for n, v, df in
                        zip(names, vals, dead_frac)) + f" tok/s={last['tokens_per_s']:.0f}")
                acc.zero_()
                acc_steps = 0
            if step % cfg.checkpoint_every == 0 and step < n_steps:
                window = _all_reduce(acc.clone(), world)  # the log window so far, so a resumed log matches
                if rank == 0:
                    _save_checkpoint(ckpt, saes, opts, since_fired,
                                     {"step": step, "input_scale": scale, "streams": [list(p) for p in positions],
                                      "log_lines": log_lines, "window": window.tolist(), "window_steps": acc_steps,
                                      "config": cfg.to_dict()})
                barrier(world)
            if stop_after is not None and step >= stop_after and step < n_steps:
                return None
    finally:
        bar.close()
        it.close()

    elapsed = time.perf_counter() - t_start
    paths = [out / n for n in names]
    summary = {
        "store": str(cfg.store), "site": cfg.site, "modality": cfg.modality, "steps": n_steps,
        "tokens": n_steps * cfg.batch_size, "batch_size": cfg.batch_size, "world_size": world,
        "input_scale": scale, "dead_tokens": dead_tokens,
        "seconds_this_session": round(elapsed, 2),
        "tokens_per_s_this_session": round((n_steps - start) * cfg.batch_size / max(elapsed, 1e-9), 1),
        "load_frac": round(batches.load_seconds / max(elapsed, 1e-9), 4),
        "wait_frac": round(batches.wait_seconds / max(elapsed, 1e-9), 4),
        "paths": [str(p) for p in paths],
        "distinct_tokens": n_avail, "epochs": sched.epochs,
        "min_steps": cfg.min_steps, "min_tokens_per_latent": cfg.min_tokens_per_latent,
        "too_short": sched.too_short,
        "incomplete": notes["store_state"]["incomplete"],
        "store_counts": {k: notes["store_state"][k] for k in ("n_planned", "n_written", "n_skipped", "n_missing")},
        "warnings": list(notes["warnings"]),
        "saes": [{"name": n, "path": str(p), **{k: getattr(s.cfg, k) for k in ("arch", "width", "k", "l1_coeff")},
                  **last.get("saes", {}).get(n, {})} for n, p, s in zip(names, paths, saes)],
    }
    if rank == 0:
        from sightline.report.sae import plot_training_curves

        for sae, n in zip(saes, names):
            sae.save_pretrained(work / n)
        log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        plot_training_curves(log, work / "figures" / "training.png",
                             title=f"SAEs at {cfg.site} ({cfg.modality} tokens)")
        write_json(work / "results.json", {"summary": summary, "last_log": last})
        _write_page(work, cfg, summary)
        if ckpt.exists():
            shutil.rmtree(ckpt)
    return summary


def _write_page(folder: Path, cfg: SAETrainConfig, summary: dict[str, Any]) -> None:
    """index.html of an SAE training run: what was trained and how well it reconstructs, the figures."""
    import html

    from sightline.report.html import Link, Section, figure_images, write_page

    rows = [(Link(f"{s['name']}/cfg.json", s["name"]), s["arch"], s["width"], s.get("k"), s.get("fvu"), s.get("l0"),
             s.get("dead_frac")) for s in summary["saes"]]
    best = min(summary["saes"], key=lambda s: s.get("fvu") if s.get("fvu") is not None else math.inf)
    found = (f"{len(rows)} SAE(s) trained on {summary['tokens']:,} {cfg.modality} tokens of {cfg.site} "
             f"({summary['steps']} steps of {summary['batch_size']}). Over the last log window the best reconstructs "
             f"with FVU {best.get('fvu')} at L0 {best.get('l0')} ({best['name']})."
             + (" The run is too short to mean much (see the warnings)." if summary["too_short"] else ""))
    warn = ([Section("Warnings", html="".join(f"<p><b>Warning:</b> {html.escape(w)}</p>" for w in summary["warnings"]))]
            if summary["warnings"] else [])
    write_page(folder / "index.html", f"SAE training at {cfg.site}", f"store {cfg.store}", warn + [
        Section("What this run found", found,
                tables=[("last log window", ["SAE", "arch", "width", "k", "FVU", "L0", "dead share"], rows)],
                images=[("figures/training.png", "FVU, L0 and dead latents against step")]),
        Section("Figures", images=figure_images(folder)),
        Section("Files", links=[("results.json", "results.json"), ("config.json", "config.json"),
                                (LOG_FILE, LOG_FILE)]),
    ])


def main(argv: list[str] | None = None) -> None:
    """`python -m sightline.sae.train CONFIG.json` (also under torchrun): train from a saved SAETrainConfig."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m sightline.sae.train CONFIG.json")
    cfg = SAETrainConfig.from_dict(read_json(args[0]))
    try:
        train_saes(cfg, progress=os.environ.get("SIGHTLINE_PROGRESS", "1") != "0")
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

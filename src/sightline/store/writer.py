"""StoreWriter: buffer captured examples and commit them to an ActivationStore in atomic shards.

One writer per rank. Several ranks (or a run and its later resume) may write one store: each rank
names its shards after itself, a shard becomes visible only when its commit record is renamed into
place, and the set of committed examples (`done`) is read from every rank's records.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sightline.errors import Interrupted, UserError
from sightline.store import format as fmt

# Keys the reader adds to each example's metadata; a caller's meta may not use them.
RESERVED_META = ("example", "n_tokens", "token_start", "reason")


class StoreWriter:
    """Write examples (per-token index + tensors per site) into an ActivationStore directory.

    Examples are buffered in memory and written as one shard whenever the buffered tensor bytes
    reach `shard_bytes`, the buffer holds `shard_examples` examples, or its first example was added
    `shard_seconds` ago (0 turns a limit off), so that a killed run loses little work. With `background=True` (default) the shard is written by a thread while
    the caller goes on; at most one shard is in flight, so memory holds at most about
    2 x `shard_bytes` plus one example, whatever the dataset size. `done` grows as shards commit.
    Use as a context manager: leaving the block normally, or by an interrupt (KeyboardInterrupt,
    `Interrupted` e.g. raised from a SIGTERM handler), commits the buffered examples (each one is
    complete); leaving it by any other exception drops them (committed shards stay valid; resume
    redoes the rest).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        manifest: dict,
        site_shapes: dict[str, tuple[int, ...]],
        dtype: str | torch.dtype = "float16",
        rank: int = 0,
        world_size: int = 1,
        resume: bool = False,
        shard_bytes: int = 256 << 20,
        background: bool = True,
        shard_examples: int = 0,
        shard_seconds: float = 0.0,
    ):
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if shard_bytes <= 0:
            raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
        if not site_shapes:
            raise ValueError("site_shapes is empty: a store needs at least one site")
        self.path = Path(path)
        self.rank = rank
        self.world_size = world_size
        self.shard_bytes = int(shard_bytes)
        if shard_examples < 0 or shard_seconds < 0:
            raise ValueError("shard_examples and shard_seconds must be >= 0 (0: no limit)")
        self.shard_examples = int(shard_examples)
        self.shard_seconds = float(shard_seconds)
        self._buffer_started: float | None = None  # monotonic time of the buffer's first example
        self.dtype = fmt.torch_dtype(dtype)
        self.site_shapes: dict[str, tuple[int, ...]] = {}
        for site in sorted(site_shapes, key=fmt.natural_key):
            if not isinstance(site, str) or not fmt.SITE_RE.match(site) or site == "index":
                raise ValueError(f"bad site name {site!r}: use letters, digits, '_', '.', '-' (and not 'index')")
            self.site_shapes[site] = tuple(int(d) for d in site_shapes[site])
        self.manifest = self._full_manifest(manifest, fmt.dtype_name(dtype))
        n = self.manifest.get("n_examples")
        self.n_examples: int | None = n if isinstance(n, int) else None
        self._tag = f"r{rank:03d}-{os.getpid()}"  # names this writer's temporary files

        self._buffer: list[dict] = []  # examples and skips in add order
        self._buffered_ids: set[int] = set()
        self.buffered_bytes = 0  # tensor bytes held in the buffer now
        self.closed = False
        self.background = background  # write shards on a thread, overlapping the next batches' compute
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._inflight_ids: set[int] = set()  # ids of the shard being written

        self._open_dir(resume)
        self.done: set[int] = set()
        self._next_shard = 0
        for name, rec in fmt.committed_shards(self.path):
            self.done.update(int(e["example"]) for e in rec["examples"])
            self.done.update(int(e["example"]) for e in rec["skipped"])
            r, number = fmt.parse_shard_name(name)
            if r == rank:
                self._next_shard = max(self._next_shard, number + 1)

    # ------------------------------------------------------------------ creation / resume
    def _full_manifest(self, manifest: dict, dtype: str) -> dict:
        if not isinstance(manifest, dict):
            raise TypeError(f"manifest must be a dict, got {type(manifest).__name__}")
        full = fmt.normalise(manifest)
        sites = {s: list(shape) for s, shape in self.site_shapes.items()}
        for key, value in (("format_version", fmt.FORMAT_VERSION), ("sites", sites), ("dtype", dtype)):
            if key in full and full[key] != value:
                raise ValueError(f"manifest[{key!r}] = {full[key]!r} disagrees with the writer's {value!r}")
            full[key] = value
        n = full.get("n_examples")
        if n is not None and not (isinstance(n, int) and n >= 0):
            raise ValueError(f"manifest['n_examples'] must be a non-negative int, got {n!r}")
        return full

    def _incompatible(self, existing: dict) -> list[str]:
        diffs = []
        for key in fmt.COMPATIBLE_KEYS:
            diffs += fmt.diff_keys(existing.get(key), self.manifest.get(key), key)
        return diffs

    def _own(self, rank: int) -> bool:
        """Whether leftovers of `rank` are this writer's to delete: its own, or those of ranks not running now."""
        return rank == self.rank or (self.rank == 0 and rank >= self.world_size)

    def _read_manifest(self, path: Path) -> dict:
        try:
            m = fmt.read_json(path)
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is not a readable store manifest ({e}); choose another --out") from None
        if not isinstance(m, dict):
            raise UserError(f"{path} is not a store manifest; choose another --out")
        return m

    def _open_dir(self, resume: bool) -> None:
        root = self.path
        if root.exists() and not root.is_dir():
            raise UserError(f"{root} exists and is not a directory; choose another --out")
        manifest_path = root / fmt.MANIFEST
        exists_msg = f"{root} exists; pass --resume to continue it or choose another --out"
        entries = [e for e in root.iterdir() if not e.name.startswith(fmt.MANIFEST + fmt.TMP_MARK)] if root.exists() else []
        if entries and not manifest_path.exists():
            if resume:
                raise UserError(f"{root} is not an activation store (no {fmt.MANIFEST}); choose another --out")
            raise UserError(exists_msg)
        if entries and not resume:
            # The other ranks of this run may already have written the manifest and their own shards
            # (the manifest is written before the shards directory exists); a manifest that
            # disagrees, or a shard of this rank, is earlier data.
            if self._incompatible(self._read_manifest(manifest_path)):
                raise UserError(exists_msg)
            shards = root / fmt.SHARDS
            for shard in shards.iterdir() if shards.is_dir() else ():
                parsed = fmt.parse_shard_name(shard.name)
                if parsed is None or parsed[0] == self.rank:
                    raise UserError(exists_msg)
        root.mkdir(parents=True, exist_ok=True)
        # Every rank offers the manifest; the first one linked into place wins, the others must agree.
        fmt.write_text_atomic(manifest_path, fmt.to_json(self.manifest, indent=2) + "\n", self._tag, exclusive=True)
        existing = self._read_manifest(manifest_path)
        if existing.get("format_version") != fmt.FORMAT_VERSION:
            raise UserError(
                f"{root} has store format_version {existing.get('format_version')!r}, this sightline writes "
                f"{fmt.FORMAT_VERSION}; choose another --out"
            )
        diffs = self._incompatible(existing)
        if diffs:
            if not resume:
                raise UserError(exists_msg)
            shown = ", ".join(diffs[:8]) + (f" and {len(diffs) - 8} more" if len(diffs) > 8 else "")
            raise UserError(
                f"cannot resume {root}: it was written with a different configuration ({shown} differ); "
                "resume with the same settings or choose another --out"
            )
        self._remove_leftovers()
        (root / fmt.SHARDS).mkdir(exist_ok=True)

    def _remove_leftovers(self) -> None:
        """Delete this rank's uncommitted shards and temporary files (and those of ranks no longer running)."""
        shards = self.path / fmt.SHARDS
        for entry in shards.iterdir() if shards.is_dir() else ():
            parsed = fmt.parse_shard_name(entry.name)
            if parsed is not None and self._own(parsed[0]) and not fmt.is_committed(entry):
                fmt.remove_tree(entry)
        for entry in self.path.iterdir():
            if entry.name.startswith(fmt.MANIFEST + fmt.TMP_MARK):
                parsed = fmt.parse_shard_name(entry.name.split(fmt.TMP_MARK, 1)[1])  # tag r{rank}-{pid}
                if parsed is not None and self._own(parsed[0]):
                    fmt.remove_tree(entry)

    # ------------------------------------------------------------------ adding
    def _check_id(self, example_id: Any) -> int:
        if self.closed:
            raise ValueError("this StoreWriter is closed")
        if isinstance(example_id, (bool, np.bool_)) or not isinstance(example_id, (int, np.integer)):
            raise TypeError(f"example_id must be an int, got {type(example_id).__name__}")
        i = int(example_id)
        if i < 0 or (self.n_examples is not None and i >= self.n_examples):
            raise ValueError(f"example id {i} is outside range(n_examples={self.n_examples})")
        if i in self.done or i in self._buffered_ids or i in self._inflight_ids:
            raise ValueError(f"example {i} is already in the store (skip ids in writer.done when resuming)")
        return i

    @staticmethod
    def _check_meta(meta: dict) -> dict:
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        clash = [k for k in RESERVED_META if k in meta]
        if clash:
            raise ValueError(f"meta may not use the reserved keys {clash} (the store fills them in)")
        return fmt.normalise(meta)  # fails here, not at flush time, if meta is not JSON-able

    def add(self, example_id: int, meta: dict, index: np.ndarray, tensors: dict[str, torch.Tensor]) -> None:
        """Buffer one example: index int [n_tok, 7] (INDEX_COLUMNS) and a tensor [n_tok, *shape] per site."""
        i = self._check_id(example_id)
        meta = self._check_meta(meta)
        index = np.asarray(index)
        if index.ndim != 2 or index.shape[1] != len(fmt.INDEX_COLUMNS) or index.dtype.kind not in "iu":
            raise ValueError(f"index must be an int array [n_tok, 7], got {index.dtype} {index.shape}")
        n_tok = index.shape[0]
        if n_tok and (index.min() < np.iinfo(np.int32).min or index.max() > np.iinfo(np.int32).max):
            raise ValueError("index values do not fit in int32")
        if not np.all(index[:, 0] == i):
            raise ValueError(f"index column 'example' must equal the example id {i}")
        if set(tensors) != set(self.site_shapes):
            missing = sorted(set(self.site_shapes) - set(tensors), key=fmt.natural_key)
            extra = sorted(set(tensors) - set(self.site_shapes), key=fmt.natural_key)
            raise ValueError(f"tensors must hold exactly the store's sites: missing {missing}, unexpected {extra}")
        kept: dict[str, torch.Tensor] = {}
        nbytes = 0
        for site, shape in self.site_shapes.items():
            t = tensors[site]
            if tuple(t.shape) != (n_tok, *shape):
                raise ValueError(f"site {site}: expected shape {(n_tok, *shape)}, got {tuple(t.shape)}")
            if not t.is_floating_point():
                raise ValueError(f"site {site}: expected a float tensor, got {t.dtype}")
            c = t.detach().to(device="cpu", dtype=self.dtype).contiguous()
            # Own the bytes: never alias the caller's tensor (it may be reused) nor keep alive a
            # larger tensor that this one is a view of (the byte count would lie).
            if c.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() or (
                c.untyped_storage().nbytes() != c.numel() * c.element_size()
            ):
                c = c.clone()
            kept[site] = c
            nbytes += c.numel() * c.element_size()
        self._buffer.append({"example": i, "meta": meta, "index": index.astype(np.int32), "tensors": kept,
                             "n_tokens": n_tok, "nbytes": nbytes})
        self._buffered_ids.add(i)
        self.buffered_bytes += nbytes
        self._maybe_flush()

    def skip(self, example_id: int, meta: dict, reason: str) -> None:
        """Record an example that could not be captured; it counts as done and holds no tokens."""
        i = self._check_id(example_id)
        meta = self._check_meta(meta)
        self._buffer.append({"example": i, "meta": meta, "reason": str(reason)})
        self._buffered_ids.add(i)
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        """Flush when the buffer reached shard_bytes, shard_examples or shard_seconds."""
        now = time.monotonic()
        if self._buffer_started is None:
            self._buffer_started = now
        if (self.buffered_bytes >= self.shard_bytes
                or (self.shard_examples and len(self._buffer) >= self.shard_examples)
                or (self.shard_seconds and now - self._buffer_started >= self.shard_seconds)):
            self.flush()

    # ------------------------------------------------------------------ committing
    def flush(self) -> None:
        """Write the buffered examples as one committed shard (nothing happens if the buffer is empty)."""
        if not self._buffer:
            return
        name = fmt.shard_name(self.rank, self._next_shard)
        shard_dir = self.path / fmt.SHARDS / name
        written = [e for e in self._buffer if "reason" not in e]
        skipped = [e for e in self._buffer if "reason" in e]
        n_tokens = sum(e["n_tokens"] for e in written)
        examples, start = [], 0
        for e in written:
            examples.append({"example": e["example"], "token_start": start, "n_tokens": e["n_tokens"], "meta": e["meta"]})
            start += e["n_tokens"]
        record = {
            "format_version": fmt.FORMAT_VERSION,
            "shard": name,
            "rank": self.rank,
            "world_size": self.world_size,
            "n_tokens": n_tokens,
            "files": {site: fmt.site_file(site) for site in self.site_shapes} | {"index": fmt.INDEX_FILE},
            "examples": examples,
            "skipped": [{"example": e["example"], "reason": e["reason"], "meta": e["meta"]} for e in skipped],
        }
        job = list(self._buffer)
        self._next_shard += 1
        self._discard()
        self._wait()  # at most one shard in flight: memory stays about 2 x shard_bytes
        self._inflight_ids = {e["example"] for e in job}
        if self.background:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
            self._pending = self._pool.submit(self._write_shard, shard_dir, record, job, written)
        else:
            self._write_shard(shard_dir, record, job, written)

    def _write_shard(self, shard_dir: Path, record: dict, job: list[dict], written: list[dict]) -> None:
        """Write one shard's files and commit it (runs on the writer thread when `background`)."""
        shard_dir.mkdir()  # must not exist: leftovers were removed and numbers only grow
        try:
            for site, shape in self.site_shapes.items():
                parts = [e["tensors"][site] for e in written] or [torch.empty((0, *shape), dtype=self.dtype)]
                fmt.save_tensor_atomic(shard_dir / fmt.site_file(site), fmt.ACTS_KEY, parts, self._tag)
            index = [torch.from_numpy(e["index"]) for e in written] or [
                torch.zeros((0, len(fmt.INDEX_COLUMNS)), dtype=torch.int32)]
            fmt.save_tensor_atomic(shard_dir / fmt.INDEX_FILE, fmt.INDEX_KEY, index, self._tag)
            fmt.fsync_dir(shard_dir)
            # The commit: until this rename the shard does not exist for readers or resumes.
            fmt.write_text_atomic(shard_dir / fmt.RECORD, fmt.to_json(record) + "\n", self._tag)
        except BaseException:
            if not fmt.is_committed(shard_dir):
                fmt.remove_tree(shard_dir)
            raise
        fmt.fsync_dir(shard_dir.parent)
        self.done.update(e["example"] for e in job)

    @property
    def in_flight(self) -> frozenset[int]:
        """Ids of the shard being written in the background (committed once it finishes)."""
        return frozenset(self._inflight_ids)

    def _wait(self) -> None:
        """Wait for the shard in flight, re-raising its error here."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                pending.result()
            finally:
                self._inflight_ids = set()

    def _discard(self) -> None:
        self._buffer.clear()
        self._buffered_ids.clear()
        self.buffered_bytes = 0
        self._buffer_started = None

    def close(self) -> None:
        """Commit the buffered examples as a last shard and wait for it; calling it again does nothing."""
        if not self.closed:
            self._finish(commit_buffer=True)

    def _finish(self, commit_buffer: bool) -> None:
        """Commit (or drop) the buffer, wait for the shard in flight, and release the writer thread."""
        try:
            if commit_buffer:
                self.flush()
            else:
                self._discard()
            self._wait()
        finally:
            self.closed = True
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.closed:
            return
        # An interrupt commits the buffer: it holds only complete examples, and a resume then repeats
        # nothing. Any other exception may come from a bug: nothing more is committed (resume redoes
        # those examples); a shard already in flight holds only complete examples: it commits.
        interrupted = exc_type is not None and issubclass(exc_type, (KeyboardInterrupt, Interrupted))
        self._finish(commit_buffer=exc_type is None or interrupted)

    def __repr__(self) -> str:
        return (f"StoreWriter({str(self.path)!r}, rank={self.rank}/{self.world_size}, done={len(self.done)}, "
                f"buffered={len(self._buffer)} examples / {self.buffered_bytes} bytes)")

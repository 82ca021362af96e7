"""The on-disk layout of an ActivationStore: names, the index dtype, JSON and atomic-write helpers.

A store is a directory (docs/store.md has the full description):

    <store>/manifest.json                       what was captured, how, and the tensor format
    <store>/shards/r{rank:03d}-{n:06d}/         one shard, written by one rank
        acts.{site}.safetensors                 tensor "acts" [n_tokens, *site_shape], store dtype
        index.safetensors                       tensor "index" int32 [n_tokens, 7] (INDEX_COLUMNS)
        shard.json                              the commit record, written last; without it the
                                                shard does not exist (a leftover of a killed run)

Everything is first written under a temporary name (``*.tmp-...``), fsynced and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The index columns and modality codes are the TokenLayout's (models/layout.py, their one definition);
# importing it loads neither transformers nor an adapter.
from sightline.models.layout import INDEX_COLUMNS, MODALITIES  # noqa: F401 (re-exported)

FORMAT_VERSION = 1
INDEX_DTYPE = np.dtype([(c, np.int32) for c in INDEX_COLUMNS])

MANIFEST = "manifest.json"
SHARDS = "shards"
RECORD = "shard.json"
INDEX_FILE = "index.safetensors"
ACTS_KEY = "acts"  # tensor name inside a site file
INDEX_KEY = "index"  # tensor name inside the index file
TMP_MARK = ".tmp-"  # every temporary file carries this in its name

SHARD_RE = re.compile(r"^r(\d+)-(\d+)$")
SITE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")

# Manifest keys that must agree for two writers (ranks, or a run and its resume) to share a store.
COMPATIBLE_KEYS = ("format_version", "config", "sites", "dtype", "n_examples")

DTYPES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical name ('float16', 'bfloat16', 'float32') of a store dtype given by name or torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPE_NAMES:
            return DTYPE_NAMES[dtype]
    elif isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPE_NAMES[DTYPES[dtype.lower()]]
    from sightline.errors import UserError

    raise UserError(f"unsupported store dtype {dtype!r}: use float16 (fp16), bfloat16 (bf16) or float32 (fp32)")


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype for a store dtype given by name or torch dtype."""
    return DTYPES[dtype_name(dtype)]


def shard_name(rank: int, number: int) -> str:
    """Directory name of a rank's n-th shard, e.g. r000-000012."""
    return f"r{rank:03d}-{number:06d}"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    """(rank, number) of a shard directory name, or None if the name is not a shard's."""
    m = SHARD_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def site_file(site: str) -> str:
    """File name of a site's tensor inside a shard."""
    return f"acts.{site}.safetensors"


def natural_key(text: str) -> tuple:
    """Sort key that orders embedded numbers by value: resid.2 before resid.10."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", text) if p != "")


def index_struct(index_n7: np.ndarray) -> np.ndarray:
    """View an int32 [n, 7] index as a structured array with fields INDEX_COLUMNS."""
    a = np.ascontiguousarray(index_n7, dtype=np.int32).reshape(-1, len(INDEX_COLUMNS))
    return a.view(INDEX_DTYPE).reshape(-1)


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays turn up in metadata all the time; store them as plain JSON
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def to_json(obj: Any, indent: int | None = 1) -> str:
    """JSON text of obj (numpy scalars/arrays and paths converted)."""
    return json.dumps(obj, indent=indent, default=_json_default)


def normalise(obj: Any) -> Any:
    """obj as it reads back from JSON (tuples become lists, numpy scalars plain numbers)."""
    return json.loads(to_json(obj, indent=None))


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (renames, creations) durable; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's bytes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path(path: Path, tag: str) -> Path:
    """A temporary sibling of path; tag names the writer (e.g. r001-4242) so leftovers can be told apart."""
    return path.with_name(f"{path.name}{TMP_MARK}{tag}")


def write_text_atomic(path: Path, text: str, tag: str, *, exclusive: bool = False) -> bool:
    """Write text to path through a temporary file, fsync and rename.

    exclusive=True never replaces an existing file (hard link instead of rename) and returns False
    when the file already existed; otherwise returns True.
    """
    tmp = tmp_path(path, tag)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        if exclusive:
            try:
                os.link(tmp, path)  # atomic create-if-absent
            except FileExistsError:
                return False
            except OSError:  # filesystem without hard links: best effort
                if path.exists():
                    return False
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return True


_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int32: "I32",
              torch.int64: "I64"}


def save_tensor_atomic(path: Path, key: str, parts: torch.Tensor | list[torch.Tensor], tag: str) -> None:
    """Save the row-wise concatenation of `parts` as one safetensors tensor, atomically.

    The parts are streamed into the file one after another (the safetensors layout: 8-byte header
    length, JSON header, raw little-endian bytes), so a shard is never concatenated in memory.
    The file is fsynced under a temporary name and then renamed into place.
    """
    parts = [parts] if torch.is_tensor(parts) else list(parts)
    dtype = parts[0].dtype
    tail = tuple(parts[0].shape[1:])
    rows = sum(int(p.shape[0]) for p in parts)
    nbytes = sum(p.numel() * p.element_size() for p in parts)
    header = {key: {"dtype": _ST_DTYPES[dtype], "shape": [rows, *tail], "data_offsets": [0, nbytes]},
              "__metadata__": {"format": "pt"}}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # the data start stays 8-byte aligned, as safetensors writes it
    tmp = tmp_path(path, tag)
    with open(tmp, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for p in parts:
            if p.dtype != dtype or tuple(p.shape[1:]) != tail:
                raise ValueError("all parts need the same dtype and trailing shape")
            # bytes of the CPU tensor; bf16 has no numpy dtype, so view it as int16 (same bytes)
            p = p.detach().to("cpu").contiguous()
            raw = p.view(torch.int16) if p.dtype == torch.bfloat16 else p
            f.write(raw.numpy().reshape(-1).view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_committed(shard_dir: Path) -> bool:
    """Whether a shard directory holds its commit record."""
    return (shard_dir / RECORD).is_file()


def remove_tree(path: Path) -> None:
    """Delete a file or directory tree; missing is fine (another process may have removed it)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def committed_shards(root: Path) -> list[tuple[str, dict]]:
    """(name, record) of every committed shard under a store directory, sorted by (rank, number)."""
    shards = root / SHARDS
    if not shards.is_dir():
        return []
    out = []
    for entry in shards.iterdir():
        parsed = parse_shard_name(entry.name)
        if parsed is None or not entry.is_dir():
            continue
        rec_path = entry / RECORD
        if not rec_path.is_file():
            continue  # uncommitted leftover of an interrupted writer
        out.append((parsed, entry.name, read_json(rec_path)))
    out.sort(key=lambda t: t[0])
    return [(name, rec) for _, name, rec in out]


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths at which two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in a or k not in b:
                out.append(p)
            else:
                out.extend(diff_keys(a[k], b[k], p))
        return out
    return [] if a == b else [prefix or "(value)"]

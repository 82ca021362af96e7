"""Result files written one way: JSON (NaN -> null, numpy -> Python), and run folders that appear whole or not at all.

Every analysis writes its output the same way (docs/outputs.md):

    OUT/config.json     the config it ran with (`sightline <command> --config OUT/config.json` reruns it)
    OUT/results.json    {"summary": {...}, ...}: every number, keys documented per analysis
    OUT/figures/        PNG figures
    OUT/index.html      the page a person opens

    with RunFolder(out, overwrite=cfg.overwrite) as tmp:     # tmp = OUT.partial, a sibling of OUT
        write_json(tmp / "config.json", to_dict(cfg))
        ...                                                  # everything else into tmp
    # here OUT exists, complete; an exception left no OUT (and no OUT.partial unless resumable)
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path, PurePath
from typing import Any

FILE_MODE = 0o644  # what file_mode() gives under the usual umask 022


def file_mode() -> int:
    """The mode a newly created file gets (0o666 less the umask): what every written file is given.

    Files written through a temporary name (mkstemp, safetensors' save_file) start 0600; a chmod to
    this makes them like every other file.
    """
    try:  # reading the umask without changing it (Linux); os.umask is process-wide and not thread-safe
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def set_file_modes(path: str | os.PathLike) -> None:
    """Give a file, or every file under a folder, the normal mode (after writers that create them 0600,
    such as Hugging Face's `save_pretrained`)."""
    path = Path(path)
    mode = file_mode()
    for f in [path] if path.is_file() else (q for q in path.rglob("*") if q.is_file() and not q.is_symlink()):
        os.chmod(f, mode)


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """safetensors' `save_file`, with the file given the normal mode (save_file creates it 0600)."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, file_mode())
    return path


def to_jsonable(v: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy and torch scalars/arrays -> Python, tuples -> lists,
    dataclasses -> dicts, paths -> str."""
    if isinstance(v, dict):
        return {str(k): to_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [to_jsonable(x) for x in v]
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, PurePath):
        return str(v)
    if is_dataclass(v) and not isinstance(v, type):
        return to_jsonable(asdict(v))
    if hasattr(v, "tolist"):  # numpy arrays and scalars, torch tensors
        return to_jsonable(v.tolist())
    if hasattr(v, "item"):
        return to_jsonable(v.item())
    return v


def dumps(data: Any, indent: int | None = 2) -> str:
    """The one JSON text form of `data` (see `to_jsonable`); strict JSON (no NaN)."""
    return json.dumps(to_jsonable(data), indent=indent, allow_nan=False)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write text to `path` through a temporary sibling and a rename; the normal mode (`file_mode`)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    """JSON written atomically, the one way every sightline file is written (see `to_jsonable`)."""
    return write_text_atomic(path, dumps(data, indent) + "\n")


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically (temporary sibling, then rename), normal mode, and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file written by `write_json`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class RunResult:
    """What every analysis returns: its run folder and the summary of its results.json.

    `result["key"]` reads the summary, so a result can be used like the summary dict itself.
    """

    path: Path
    summary: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.summary[key]

    def __contains__(self, key: object) -> bool:
        return key in self.summary

    def get(self, key: str, default: Any = None) -> Any:
        """summary.get(key, default)."""
        return self.summary.get(key, default)

    @property
    def results(self) -> dict[str, Any]:
        """The whole results.json."""
        return read_json(self.path / "results.json")

    @property
    def html(self) -> Path:
        """The run's index.html."""
        return self.path / "index.html"


def check_output(out: str | os.PathLike, overwrite: bool = False, error: type[Exception] = ValueError) -> Path:
    """The output folder `out`, checked before any work: not a file, empty or `overwrite`, writable.

    Raises `error` (callers pass sightline's UserError) with one line naming the folder and the fix.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise error(f"output {out} is a file; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise error(f"output {out} exists and is not empty; pass --overwrite or choose another --out")
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise error(f"cannot write to {parent}; choose another --out")
    return out


class RunFolder:
    """A run folder written under OUT.partial and renamed to OUT when the block ends without error.

    On an error the partial folder is removed, unless `keep_partial` (resumable work: the next run
    with the same OUT finds it and goes on). With `overwrite`, an existing OUT is replaced only once
    the new one is complete.
    """

    def __init__(self, out: str | os.PathLike, overwrite: bool = False, keep_partial: bool = False):
        self.out = Path(out)
        self.tmp = self.out.with_name(self.out.name + ".partial")
        self.overwrite = overwrite
        self.keep_partial = keep_partial

    def __enter__(self) -> Path:
        if self.tmp.exists() and not self.keep_partial:
            shutil.rmtree(self.tmp)
        (self.tmp / "figures").mkdir(parents=True, exist_ok=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            if not self.keep_partial:
                shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        self.commit()
        return False

    def commit(self) -> Path:
        """Move the finished partial folder to OUT (replacing an old OUT only now)."""
        old = None
        if self.out.exists():
            old = self.out.with_name(self.out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

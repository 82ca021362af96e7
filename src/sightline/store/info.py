"""What a store holds, as one JSON-able dict: model, examples, completeness, tokens, sites and config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StoreInfoConfig:
    """What `sightline store info` looks at."""

    path: str
    """an ActivationStore folder"""
    json: bool = False
    """print JSON instead of text"""


def store_info(path: str) -> dict[str, Any]:
    """Sites, shapes, examples, tokens and completeness of the store at `path`."""
    from sightline.store.reader import ActivationStore

    s = ActivationStore.open(path)
    return {
        "path": str(path),
        "model": s.manifest.get("model", {}).get("name"),
        "examples": len(s),
        "skipped": len(s.skipped),
        "skipped_examples": [{"example": e["example"], "path": e.get("path"), "reason": e["reason"]}
                             for e in s.skipped],
        "planned": s.manifest.get("n_examples"),
        "complete": s.complete,
        "tokens": s.n_tokens,
        "dtype": str(s.dtype).replace("torch.", ""),
        "sites": {k: list(v) for k, v in s.manifest["sites"].items()},
        "config": s.manifest.get("config", {}),
    }


def format_store_info(info: dict[str, Any]) -> str:
    """The text `sightline store info` prints for `store_info`'s result."""
    state = "complete" if info["complete"] else "INCOMPLETE: rerun extract with --resume"
    return "\n".join([
        f"store     {info['path']}",
        f"model     {info['model']}",
        f"examples  {info['examples']} written, {info['skipped']} skipped, {info['planned']} planned ({state})",
        f"tokens    {info['tokens']}  dtype {info['dtype']}",
        "sites     " + ", ".join(f"{k} {tuple(v)}" for k, v in info["sites"].items()),
    ] + [f"skipped   {e['path'] or e['example']}: {e['reason']}" for e in info.get("skipped_examples", [])[:20]]
      + ([f"skipped   ... and {info['skipped'] - 20} more (--json lists all)"] if info["skipped"] > 20 else []))


def run_store_info(cfg: StoreInfoConfig) -> dict[str, Any]:
    """`store_info` for a config (what the CLI calls)."""
    return store_info(cfg.path)

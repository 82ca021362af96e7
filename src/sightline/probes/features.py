"""Probe inputs: per-example (or per-token) features pooled from an ActivationStore, and labels
resolved from the store's example metadata (or, per token, from the synthetic world's masks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sightline.errors import UserError

POOLINGS = ("mean", "max", "last", "token")
MASK_PREFIX = "mask."  # token labels drawn from the synthetic world's masks, e.g. mask.shape
MASK_ATTRIBUTES = ("shape", "colour", "size", "object")
BACKGROUND = "background"


# ---------------------------------------------------------------------------------------- labels
def _walk(value: Any, parts: Sequence[str]) -> tuple[bool, Any]:
    """Follow a dotted path into nested dicts/lists; (found, value)."""
    for p in parts:
        if isinstance(value, dict) and p in value:
            value = value[p]
        elif isinstance(value, list) and p.lstrip("-").isdigit() and -len(value) <= int(p) < len(value):
            value = value[int(p)]
        else:
            return False, None
    return True, value


def lookup(example: dict, spec: str) -> tuple[bool, Any]:
    """Find `spec` in a store example: a top-level key, a key of its JSONL `meta`, or a dotted path
    into either (e.g. `meta.facts.objects.0.shape` or `facts.objects.0.shape`); (found, value)."""
    parts = spec.split(".")
    found, value = _walk(example, parts)
    if not found and isinstance(example.get("meta"), dict):
        found, value = _walk(example["meta"], parts)
    return found, value


def available_keys(examples: Sequence[dict], limit: int = 30) -> list[str]:
    """Label keys the first example offers (top level and `meta`), for error messages."""
    if not examples:
        return []
    ex = examples[0]
    skip = {"example", "n_tokens", "token_start", "layout", "text", "seq_len", "image_size_hw", "meta", "path", "id"}
    keys = [k for k in ex if k not in skip and ex[k] is not None]
    meta = ex.get("meta") or {}
    keys += [f"meta.{k}" for k in meta]
    return keys[:limit]


def _label_text(value: Any, spec: str) -> str:
    if isinstance(value, (dict, list)):
        inner = (f"{spec}.{next(iter(value))}" if isinstance(value, dict) and value else f"{spec}.0")
        raise UserError(f"label {spec!r} is a {type(value).__name__}, not a value: "
                        f"name a field inside it, e.g. {inner}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def resolve_labels(examples: Sequence[dict], spec: str) -> list[str | None]:
    """The label `spec` of every example as text (None where an example lacks it).

    UserError (listing the keys there are) if no example has it."""
    if not spec or not spec.strip():
        raise UserError("empty --label: name a label, e.g. --label label or --label meta.facts.objects.0.shape")
    out: list[str | None] = []
    for ex in examples:
        found, value = lookup(ex, spec)
        out.append(_label_text(value, spec) if found and value is not None else None)
    if examples and all(v is None for v in out):
        keys = available_keys(examples)
        raise UserError(f"no example in the store has label {spec!r}; available: {', '.join(keys) or 'none'} "
                        "(or a dotted path into them, e.g. meta.facts.objects.0.shape)")
    return out


def parse_where(where: str | None) -> list[tuple[str, str]]:
    """`key=value[,key=value]` -> [(key, value)]; each key is resolved like a label."""
    if where is None or not where.strip():
        return []
    out = []
    for part in where.split(","):
        if "=" not in part:
            raise UserError(f"bad --where {where!r}: use key=value[,key=value], e.g. qtype=shape")
        k, v = part.split("=", 1)
        out.append((k.strip(), v.strip()))
    return out


def select_examples(examples: Sequence[dict], where: str | None) -> list[int]:
    """Indices (into `examples`) of those whose fields match every key=value of `where`."""
    conds = parse_where(where)
    keep = []
    for j, ex in enumerate(examples):
        ok = True
        for k, v in conds:
            found, value = lookup(ex, k)
            if not found or value is None or isinstance(value, (dict, list)) or _label_text(value, k) != v:
                ok = False
                break
        if ok:
            keep.append(j)
    if examples and conds and not keep:
        raise UserError(f"--where {where!r} matches no example; available keys: {', '.join(available_keys(examples))}")
    return keep


# ---------------------------------------------------------------------------------------- pooling
@dataclass
class Features:
    """Pooled features of several sites for the same rows (examples, or tokens with pooling='token').

    `acts[site]` is float32 [n_rows, d] (multi-dimensional sites such as keys are flattened);
    `rows` is the store's structured index of each row's token for pooling='token', else None;
    `example_ids[i]` is the store example id of row i.
    """

    acts: dict[str, torch.Tensor]
    example_ids: np.ndarray  # int64 [n_rows]
    rows: np.ndarray | None  # store index rows (pooling='token'), else None
    pooling: str


def _modality_codes(modality: str | Sequence[str]) -> list[int]:
    from sightline.models.layout import MODALITIES

    items = [m.strip() for m in modality.split(",")] if isinstance(modality, str) else list(modality)
    bad = [m for m in items if m not in MODALITIES]
    if bad or not items:
        raise UserError(f"unknown token modality {bad[0] if bad else modality!r}: "
                        f"use one or more of {', '.join(MODALITIES)}")
    return [MODALITIES.index(m) for m in items]


def pool_features(store, sites: Sequence[str], example_ids: Sequence[int] | None = None, pooling: str = "mean",
                  modality: str | Sequence[str] = "image", batch_size: int = 65536,
                  progress: bool = False) -> Features:
    """Pool each example's tokens of the given modality at every site, streaming the store once.

    pooling: 'mean' (the paper's choice), 'max' (per dimension), 'last' (the token at the highest
    position), or 'token' (every token is a row). Memory holds the pooled features, not the store.
    NaN tokens (e.g. vision sites with no patch) are left out of the pool.
    """
    from tqdm.auto import tqdm

    if pooling not in POOLINGS:
        raise UserError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
    sites = list(sites)
    for s in sites:
        store.shape(s)  # UserError naming the available sites
    codes = _modality_codes(modality)
    all_ids = np.array([e["example"] for e in store.examples], dtype=np.int64)
    ids = all_ids if example_ids is None else np.asarray(example_ids, dtype=np.int64)
    missing = np.setdiff1d(ids, all_ids)
    if len(missing):
        raise UserError(f"example {int(missing[0])} is not in store {store.path} ({len(missing)} asked for are not)")
    row_of = np.full(int(all_ids.max()) + 1 if len(all_ids) else 1, -1, dtype=np.int64)
    row_of[ids] = np.arange(len(ids))
    dims = {s: int(np.prod(store.shape(s))) for s in sites}
    n = len(ids)

    if pooling == "last":
        idx = store.index
        m = np.isin(idx["modality"], codes) & (row_of[idx["example"]] >= 0)
        last_pos = np.full(n, -1, dtype=np.int64)
        np.maximum.at(last_pos, row_of[idx["example"][m]], idx["position"][m].astype(np.int64))
    if pooling == "token":
        chunks: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
        idx_chunks: list[np.ndarray] = []
    else:
        init = -torch.inf if pooling == "max" else 0.0
        acc = {s: torch.full((n, dims[s]), init, dtype=torch.float32) for s in sites}
        count = {s: torch.zeros(n, dtype=torch.float32) for s in sites}

    total = int(np.isin(store.index["modality"], codes).sum()) if progress else None
    bar = tqdm(total=total, desc="pool", unit="tok", disable=not progress, dynamic_ncols=True)
    for batch in store.iter_batches(sites, batch_size=batch_size, modality=codes):
        bidx = batch["index"]
        rows = row_of[bidx["example"]]
        bar.update(len(bidx))
        keep = rows >= 0
        if pooling == "last":
            keep &= bidx["position"] == last_pos[np.maximum(rows, 0)]
        if not keep.any():
            continue
        sel = torch.from_numpy(np.flatnonzero(keep))
        r = torch.from_numpy(rows[keep])
        if pooling == "token":
            idx_chunks.append(bidx[keep].copy())
        for s in sites:
            x = batch[s].index_select(0, sel).reshape(len(sel), -1)
            if pooling == "token":
                chunks[s].append(x)
                continue
            x = x.float()
            ok = torch.isfinite(x).all(1)
            if not ok.all():
                x, rr = x[ok], r[ok]
            else:
                rr = r
            if pooling == "max":
                acc[s].scatter_reduce_(0, rr[:, None].expand_as(x), x, "amax")
            else:
                acc[s].index_add_(0, rr, x)
            count[s].index_add_(0, rr, torch.ones(len(rr)))
    bar.close()

    if pooling == "token":
        rows_idx = np.concatenate(idx_chunks) if idx_chunks else store.index[:0]
        order = np.lexsort((rows_idx["position"], rows_idx["image"], row_of[rows_idx["example"]]))
        acts = {}
        for s in sites:
            x = torch.cat(chunks[s]) if chunks[s] else torch.empty(0, dims[s])
            acts[s] = x.index_select(0, torch.from_numpy(order)).float()
        rows_idx = rows_idx[order]
        finite = torch.ones(len(rows_idx), dtype=torch.bool)
        for s in sites:  # a token with no value at some site (e.g. vision.i off the patch grid) is left out
            finite &= torch.isfinite(acts[s]).all(1)
        if not finite.all():
            acts = {s: a[finite] for s, a in acts.items()}
            rows_idx = rows_idx[finite.numpy()]
        return Features(acts, rows_idx["example"].astype(np.int64), rows_idx, pooling)

    for s in sites:
        empty = count[s] == 0
        if empty.any():
            bad = int(ids[int(torch.nonzero(empty)[0])])
            what = modality if isinstance(modality, str) else ",".join(modality)
            raise UserError(f"example {bad} has no {what} tokens at {s} in store {store.path}; extract with "
                            "--positions image (or all), or choose another modality")
        if pooling == "mean":
            acc[s] /= count[s][:, None]
    return Features(acc, ids, None, pooling)


# ---------------------------------------------------------------------------------- token labels
def synthetic_token_labels(store, rows: np.ndarray, attribute: str, min_cover: float = 0.5) -> list[str | None]:
    """Per stored token row: the `attribute` (shape, colour, size, or 'object' = instance) of the
    object covering most of its pixel box, 'background' where nothing does, None where the winner
    covers less than `min_cover` of the box (mixed tokens are left out). The scenes are re-drawn
    from the dataset's world.json, so the labels are exact."""
    if attribute not in MASK_ATTRIBUTES:
        raise UserError(f"unknown mask label {MASK_PREFIX}{attribute}: use "
                        f"{', '.join(MASK_PREFIX + a for a in MASK_ATTRIBUTES)}")
    from sightline.data.synthetic import world_facts
    from sightline.models.layout import StoredLayout, mask_to_tokens

    root = (store.manifest.get("dataset") or {}).get("root")
    if not root:
        raise UserError(f"store {store.path} does not record its dataset root; mask.* labels need one")
    facts = world_facts(root)
    if facts is None:
        raise UserError(f"mask.* token labels need a dataset exported by sightline.data.synthetic (no world.json "
                        f"from it beside {root}); use an example-level --label instead")
    world = facts.world
    by_id = {e["example"]: e for e in store.examples}
    out: list[str | None] = [None] * len(rows)
    order = np.argsort(rows["example"], kind="stable")
    ex_sorted = rows["example"][order]
    starts = np.flatnonzero(np.r_[True, ex_sorted[1:] != ex_sorted[:-1]])
    ends = np.r_[starts[1:], len(order)]
    for a, b in zip(starts, ends):
        ex = by_id[int(ex_sorted[a])]
        scene_i = (ex.get("meta") or {}).get("scene")
        if scene_i is None:
            try:
                scene_i = int(Path(ex["path"]).stem)
            except (KeyError, ValueError):
                raise UserError(f"cannot tell which synthetic scene example {ex['example']} is "
                                "(no 'scene' field, and the file name is not a scene number)") from None
        scene = world.scene(int(scene_i))
        per_instance = [BACKGROUND] + [
            (f"object{o.index}" if attribute == "object" else getattr(o, attribute)) for o in scene.objects]
        names = sorted(set(per_instance))  # objects sharing a label pool their cover
        lay = StoredLayout(ex["layout"])
        cover: dict[tuple[int, int], np.ndarray] = {}
        for j in order[a:b]:
            key = (int(rows["image"][j]), int(rows["view"][j]))
            if key[0] < 0 or rows["row"][j] < 0:
                continue
            if key not in cover:
                masks = [np.isin(scene.instance_mask, [k for k, x in enumerate(per_instance) if x == name])
                         for name in names]
                cover[key] = np.stack([mask_to_tokens(lay, m, image=key[0], view=key[1]) for m in masks])
            frac = cover[key][:, rows["row"][j], rows["col"][j]]
            if not np.isfinite(frac).all():
                continue
            k = int(np.argmax(frac))
            if frac[k] >= min_cover:
                out[j] = names[k]
    return out

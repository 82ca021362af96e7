"""ActivationStore: read a store directory (whole sites, single examples, or streamed batches).

Only committed shards are read; uncommitted leftovers of an interrupted writer are invisible.
Tokens are presented in example-id order whatever ranks, shards and resumes wrote them, except by
`iter_batches`, which streams shard by shard (see its docstring).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sightline.errors import UserError
from sightline.store import format as fmt


class ActivationStore:
    """A read-only view of an ActivationStore directory; make one with `ActivationStore.open(path)`."""

    def __init__(self, path: Path, manifest: dict, shards: list[tuple[str, dict]]):
        self.path = path
        self.manifest = manifest
        self.site_shapes: dict[str, tuple[int, ...]] = {
            s: tuple(int(d) for d in shape) for s, shape in manifest["sites"].items()
        }
        self.sites: list[str] = sorted(self.site_shapes, key=fmt.natural_key)
        self.dtype: torch.dtype = fmt.torch_dtype(manifest["dtype"])
        self._shard_names = [name for name, _ in shards]

        seen: dict[int, str] = {}
        rows = []  # (example, shard number, local start, n_tokens, meta)
        skipped = []
        for k, (name, rec) in enumerate(shards):
            for e in rec["examples"]:
                i = int(e["example"])
                if i in seen:
                    raise UserError(f"store {path} is inconsistent: example {i} is in shards {seen[i]} and {name}")
                seen[i] = name
                rows.append((i, k, int(e["token_start"]), int(e["n_tokens"]), e.get("meta", {})))
            for e in rec["skipped"]:
                i = int(e["example"])
                if i in seen:
                    raise UserError(f"store {path} is inconsistent: example {i} is in shards {seen[i]} and {name}")
                seen[i] = name
                skipped.append({**e.get("meta", {}), "example": i, "reason": e["reason"]})
        rows.sort(key=lambda r: r[0])
        self._ex_id = np.array([r[0] for r in rows], dtype=np.int64)
        self._ex_shard = np.array([r[1] for r in rows], dtype=np.int64)
        self._ex_local = np.array([r[2] for r in rows], dtype=np.int64)
        self._ex_n = np.array([r[3] for r in rows], dtype=np.int64)
        self._ex_start = np.concatenate([[0], np.cumsum(self._ex_n)[:-1]]).astype(np.int64) if rows else self._ex_n
        self._row_of = {int(i): j for j, i in enumerate(self._ex_id)}
        self.examples: list[dict] = [
            {**meta, "example": i, "n_tokens": n, "token_start": int(s)}
            for (i, _, _, n, meta), s in zip(rows, self._ex_start)
        ]
        self.skipped: list[dict] = sorted(skipped, key=lambda e: e["example"])
        self.n_tokens: int = int(self._ex_n.sum())
        self._shard_tokens = [int(rec["n_tokens"]) for _, rec in shards]
        self._index: np.ndarray | None = None
        self._runs_cache: list | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike) -> ActivationStore:
        """Open a store directory for reading (committed shards only)."""
        root = Path(path)
        if root.is_file():
            hint = f" (pass its folder {root.parent})" if root.name == fmt.MANIFEST else ""
            raise UserError(f"{root} is a file, not a store folder; pass the folder extract wrote{hint}")
        if not root.is_dir():
            raise UserError(f"no activation store at {root}: the directory does not exist")
        mpath = root / fmt.MANIFEST
        if not mpath.is_file():
            raise UserError(f"{root} is not an activation store (no {fmt.MANIFEST}); pass the directory a capture wrote")
        try:
            manifest = fmt.read_json(mpath)
        except ValueError as e:
            raise UserError(f"{mpath} is not valid JSON ({e}); the store is damaged") from None
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if version != fmt.FORMAT_VERSION:
            raise UserError(
                f"{root} has store format_version {version!r} but this sightline reads {fmt.FORMAT_VERSION}; "
                "use the sightline version that wrote it or capture again"
            )
        if not isinstance(manifest.get("sites"), dict) or "dtype" not in manifest:
            raise UserError(f"{mpath} lacks 'sites' or 'dtype'; the store is damaged")
        return cls(root, manifest, fmt.committed_shards(root))

    # ------------------------------------------------------------------ summary
    def __len__(self) -> int:
        return len(self.examples)

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, examples={len(self)}, skipped={len(self.skipped)}, "
                f"tokens={self.n_tokens}, sites={self.sites}, dtype={fmt.dtype_name(self.dtype)})")

    @property
    def complete(self) -> bool:
        """Whether every id in range(manifest['n_examples']) is written or skipped (False if n_examples is unknown)."""
        n = self.manifest.get("n_examples")
        if not isinstance(n, int):
            return False
        done = set(self._row_of) | {e["example"] for e in self.skipped}
        return all(i in done for i in range(n))

    def shape(self, site: str) -> tuple[int, ...]:
        """Per-token shape of a site."""
        return self.site_shapes[self._check_site(site)]

    def _check_site(self, site: str) -> str:
        if site not in self.site_shapes:
            raise UserError(f"site {site!r} is not in store {self.path}; available: {', '.join(self.sites)}")
        return site

    def _file(self, shard: int, site: str | None) -> str:
        name = fmt.INDEX_FILE if site is None else fmt.site_file(site)
        return str(self.path / fmt.SHARDS / self._shard_names[shard] / name)

    def _load(self, shard: int, site: str | None) -> torch.Tensor:
        """A whole shard's tensor for a site (None: the index as int32 [n, 7])."""
        from safetensors import safe_open

        with safe_open(self._file(shard, site), framework="pt") as f:
            return f.get_tensor(fmt.INDEX_KEY if site is None else fmt.ACTS_KEY)

    def _runs(self) -> list[tuple[int, list[tuple[int, int, int]]]]:
        """Per shard: the (local start, global start, n) runs that copy its rows into example order."""
        if self._runs_cache is None:
            order = np.lexsort((self._ex_local, self._ex_shard))  # by shard, then by place in the shard
            out: list[tuple[int, list[tuple[int, int, int]]]] = []
            for j in order:
                k, lo, go, n = int(self._ex_shard[j]), int(self._ex_local[j]), int(self._ex_start[j]), int(self._ex_n[j])
                if n == 0:
                    continue
                if not out or out[-1][0] != k:
                    out.append((k, []))
                runs = out[-1][1]
                if runs and runs[-1][0] + runs[-1][2] == lo and runs[-1][1] + runs[-1][2] == go:
                    runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + n)  # contiguous in both orders: one copy
                else:
                    runs.append((lo, go, n))
            self._runs_cache = out
        return self._runs_cache

    # ------------------------------------------------------------------ whole-store reads
    @property
    def index(self) -> np.ndarray:
        """Structured array (fields INDEX_COLUMNS, int32), one row per token in example order."""
        if self._index is None:
            out = np.empty((self.n_tokens, len(fmt.INDEX_COLUMNS)), dtype=np.int32)
            for k, runs in self._runs():
                idx = self._load(k, None).numpy()
                for lo, go, n in runs:
                    out[go : go + n] = idx[lo : lo + n]
            self._index = fmt.index_struct(out)
        return self._index

    def tensor(self, site: str, dtype: str | torch.dtype | None = None) -> torch.Tensor:
        """All tokens of a site, [n_tokens, *shape], rows in example order (aligned with `index`)."""
        self._check_site(site)
        out_dtype = self.dtype if dtype is None else (dtype if isinstance(dtype, torch.dtype) else fmt.torch_dtype(dtype))
        out = torch.empty((self.n_tokens, *self.site_shapes[site]), dtype=out_dtype)
        for k, runs in self._runs():
            acts = self._load(k, site)  # one shard's site at a time
            for lo, go, n in runs:
                out[go : go + n] = acts[lo : lo + n]
            del acts
        return out

    # ------------------------------------------------------------------ random access
    def example(self, example_id: int, sites: Iterable[str] | str | None = None) -> dict[str, Any]:
        """One example's tensors {site: [n_tok, *shape]} plus 'index'; reads only its rows."""
        from safetensors import safe_open

        j = self._row_of.get(int(example_id))
        if j is None:
            why = next((f" (skipped: {e['reason']})" for e in self.skipped if e["example"] == int(example_id)), "")
            raise UserError(f"example {example_id} is not in store {self.path}{why}")
        k, lo, n = int(self._ex_shard[j]), int(self._ex_local[j]), int(self._ex_n[j])
        wanted = self.sites if sites is None else ([sites] if isinstance(sites, str) else list(sites))
        out: dict[str, Any] = {}
        for site in wanted:
            self._check_site(site)
            with safe_open(self._file(k, site), framework="pt") as f:
                out[site] = f.get_slice(fmt.ACTS_KEY)[lo : lo + n]
        with safe_open(self._file(k, None), framework="pt") as f:
            out["index"] = fmt.index_struct(f.get_slice(fmt.INDEX_KEY)[lo : lo + n].numpy())
        return out

    # ------------------------------------------------------------------ streaming
    def _shard_order(self) -> list[int]:
        """Shards ordered by their first example id (an uninterrupted one-rank store reads in example order)."""
        shard_ids, first_row = np.unique(self._ex_shard, return_index=True)  # rows are sorted by example id
        first = dict(zip(shard_ids.tolist(), self._ex_id[first_row].tolist()))
        return sorted((k for k in first if self._shard_tokens[k] > 0), key=lambda k: (first[k], k))

    def _read_shard(self, k: int, sites: list[str], modality: Any) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        idx = self._load(k, None).numpy()
        acts = {site: self._load(k, site) for site in sites}
        if modality is not None:
            keep = np.isin(idx[:, fmt.INDEX_COLUMNS.index("modality")], modality)
            if not keep.all():
                rows = torch.from_numpy(np.flatnonzero(keep))
                idx = idx[keep]
                acts = {s: a.index_select(0, rows) for s, a in acts.items()}
        return acts, idx

    def iter_batches(
        self,
        sites: Iterable[str] | str,
        batch_size: int = 4096,
        shuffle: bool = False,
        seed: int = 0,
        modality: int | str | Iterable[int | str] | None = None,
        shuffle_shards: int = 4,
    ) -> Iterator[dict[str, Any]]:
        """Stream tokens as {site: [<=batch_size, *shape], 'index': structured rows}, each token once.

        Reads shard by shard, so memory holds about one shard of the chosen sites (shuffle_shards
        shards when shuffling). shuffle=False: shards in order of their first example id, tokens in
        written order (example order for a store written by one uninterrupted rank). shuffle=True:
        a LOCAL shuffle: shard order is permuted with `seed`, then shards are taken shuffle_shards
        at a time and their tokens (with the few left over from the previous group) permuted
        together. Use a different seed per epoch. modality keeps only tokens of the given
        modality code(s) or name(s) (0 text, 1 image, 2 image_newline, 3 special).
        Only the last batch may be smaller than batch_size.
        """
        wanted = [sites] if isinstance(sites, str) else list(sites)
        for s in wanted:
            self._check_site(s)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        codes = None if modality is None else self._modality_codes(modality)
        order = self._shard_order()
        if not shuffle:
            yield from self._batched(((self._read_shard(k, wanted, codes)) for k in order), wanted, batch_size)
            return
        if shuffle_shards < 1:
            raise ValueError(f"shuffle_shards must be >= 1, got {shuffle_shards}")
        rng = np.random.default_rng(seed)
        order = [order[i] for i in rng.permutation(len(order))]
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))

        def groups() -> Iterator[tuple[dict[str, torch.Tensor], np.ndarray]]:
            for g in range(0, len(order), shuffle_shards):
                parts = [self._read_shard(k, wanted, codes) for k in order[g : g + shuffle_shards]]
                yield {s: torch.cat([p[0][s] for p in parts]) for s in wanted}, np.concatenate([p[1] for p in parts])

        yield from self._batched(groups(), wanted, batch_size, gen)

    @staticmethod
    def _modality_codes(modality: Any) -> list[int]:
        items = [modality] if isinstance(modality, (int, str, np.integer)) else list(modality)
        codes = []
        for m in items:
            if isinstance(m, str):
                if m not in fmt.MODALITIES:
                    raise UserError(f"unknown modality {m!r}: use one of {', '.join(fmt.MODALITIES)}")
                codes.append(fmt.MODALITIES.index(m))
            elif 0 <= int(m) < len(fmt.MODALITIES):
                codes.append(int(m))
            else:
                raise UserError(f"unknown modality code {m}: use 0..{len(fmt.MODALITIES) - 1} ({', '.join(fmt.MODALITIES)})")
        return codes

    @staticmethod
    def _batched(
        chunks: Iterator[tuple[dict[str, torch.Tensor], np.ndarray]],
        sites: list[str],
        batch_size: int,
        gen: torch.Generator | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Cut a stream of (tensors, index) chunks into batches; with gen, permute each chunk with the carry-over."""
        carry: tuple[dict[str, torch.Tensor], np.ndarray] | None = None
        for acts, idx in chunks:
            if gen is not None:
                if carry is not None:  # the carry-over joins the shuffle of the next group
                    acts = {s: torch.cat([carry[0][s], acts[s]]) for s in sites}
                    idx = np.concatenate([carry[1], idx])
                    carry = None
                if len(idx) > 1:
                    perm = torch.randperm(len(idx), generator=gen)
                    acts = {s: a.index_select(0, perm) for s, a in acts.items()}
                    idx = idx[perm.numpy()]
            elif carry is not None:  # top the carry-over up to one batch; the rest of the chunk stays a view
                take = min(batch_size - len(carry[1]), len(idx))
                carry = ({s: torch.cat([carry[0][s], acts[s][:take]]) for s in sites},
                         np.concatenate([carry[1], idx[:take]]))
                acts, idx = {s: a[take:] for s, a in acts.items()}, idx[take:]
                if len(carry[1]) < batch_size:
                    continue
                yield {**carry[0], "index": fmt.index_struct(carry[1])}
                carry = None
            n = len(idx)
            full = n - n % batch_size
            for b in range(0, full, batch_size):
                yield {**{s: acts[s][b : b + batch_size] for s in sites}, "index": fmt.index_struct(idx[b : b + batch_size])}
            if full < n:
                carry = ({s: acts[s][full:].clone() for s in sites}, idx[full:].copy())
        if carry is not None and len(carry[1]):
            yield {**carry[0], "index": fmt.index_struct(carry[1])}

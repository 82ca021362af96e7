"""Edits during the native forward: change an activation at chosen positions, or block attention, then let the model run on.

Two kinds, as DESIGN.md states, both applied by one `apply_edits`:
- `Edit(site, positions, fn)` replaces a site's activation at chosen positions by fn(activation).
  Its hook sits exactly where `Capture` reads the same site (one site table, `sites.resolve_site`)
  and is registered before any capture hook inside the `with` block, so a capture of an edited
  site sees the edited value.
- `BlockAttention(layers, keys, queries, heads)` removes chosen (query, key) pairs from the
  attention of chosen decoder layers (and query heads): a pre-hook on each layer's attention module
  replaces its `attention_mask` by the same mask with those pairs masked out.

Positions are columns of the (padded) input tensor; the hooks count the tokens each forward call
covers, so the same edit works for one forward pass and for `generate` (prefill, then one token
per step from the KV cache).

    with apply_edits(adapter, [Edit("resid.3", [img_pos], add_vector(v, 8.0))]):
        out = adapter.model.generate(**inputs, max_new_tokens=5)   # steered prefill, clean decoding
    with apply_edits(adapter, [BlockAttention(range(adapter.n_layers), keys=[img_pos], queries=[txt_pos])]):
        out = adapter.model(**inputs)                              # text cannot see the image

`generate` appends columns on the right, so a batch that generates is left-padded (`left_pad`): an
example's sequence position p then sits in column p + pad, and its edits address those columns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from sightline.capture.sites import EDITABLE, Site, resolve_site
from sightline.errors import UserError

MASKABLE_ATTENTION = ("sdpa", "eager")  # implementations whose 4-D mask a hook can rewrite

# fn(acts [n, d], rows [n] = example index of each row in the batch) -> edited acts [n, d]
EditFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Edit:
    """Apply `fn` to `site` at `positions` of each example (None: every position of every call).

    positions: one array of sequence positions per example of the batch (a single array applies to
    every example). prefill_only: touch only the first forward call (the prompt); False also edits the
    tokens generated afterwards, at the positions they occupy (with positions=None: every new token).
    """

    site: str
    positions: Sequence[np.ndarray] | np.ndarray | None
    fn: EditFn
    prefill_only: bool = True


def add_vector(vector_d: torch.Tensor, scale: float = 1.0) -> EditFn:
    """Edit function adding scale * vector to every edited row (steering)."""

    def fn(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return x + scale * vector_d.to(device=x.device, dtype=x.dtype)

    return fn


def replace_with(map_fn: Callable[[torch.Tensor], torch.Tensor]) -> EditFn:
    """Edit function replacing rows by map_fn(rows) (e.g. an SAE reconstruction, or zeros)."""

    def fn(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return map_fn(x)

    return fn


class _Span:
    """Which columns of the padded sequence the current forward call covers (counts across calls)."""

    def __init__(self):
        self.offset = 0  # first column of the current call
        self.calls = -1  # index of the current call (0 = the prefill)
        self.seq = 0  # columns the current call covers


def _per_example(pos, batch_size: int, what: str) -> list[np.ndarray]:
    """Positions as one int array per example (a single array applies to every example)."""
    if isinstance(pos, np.ndarray) or (len(pos) and np.isscalar(pos[0])):
        pos = [np.asarray(pos)] * batch_size
    if len(pos) != batch_size:
        raise ValueError(f"{what}: {len(pos)} position arrays for a batch of {batch_size}")
    return [np.asarray(p, dtype=np.int64).reshape(-1) for p in pos]


def _targets(edit: Edit, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    if edit.positions is None:
        return None
    pos = _per_example(edit.positions, batch_size, f"edit at {edit.site}")
    counts = [len(p) for p in pos]
    b = torch.as_tensor(np.repeat(np.arange(batch_size), counts), dtype=torch.long, device=device)
    s = torch.as_tensor(np.concatenate(pos) if pos else np.zeros(0), dtype=torch.long, device=device)
    return b, s


def _apply(edit: Edit, h: torch.Tensor, span: _Span, cache: dict) -> torch.Tensor:
    """h [B, S, d] of the current call -> edited copy (h itself when nothing falls in this call)."""
    if edit.prefill_only and span.calls > 0:
        return h
    B, S = h.shape[:2]
    if edit.positions is None:
        rows = torch.arange(B, device=h.device).repeat_interleave(S)
        flat = h.reshape(B * S, *h.shape[2:])
        return edit.fn(flat, rows).to(h.dtype).reshape(h.shape)
    key = (B, str(h.device))
    if key not in cache:
        cache[key] = _targets(edit, B, h.device)
    b, s = cache[key]
    inside = (s >= span.offset) & (s < span.offset + S)
    if not bool(inside.any()):
        return h
    b, s = b[inside], s[inside] - span.offset
    out = h.clone()
    out[b, s] = edit.fn(h[b, s], b).to(h.dtype)
    return out


@dataclass(frozen=True)
class BlockAttention:
    """Block `keys` from `queries` at decoder `layers` (and query `heads`): those pairs get no attention.

    keys, queries: sequence positions per example, as `Edit.positions` (one array per example, or one
    array for every example); queries None: every query of each call. heads: query-head indices
    0..n_heads-1 (with grouped-query attention a KV head serves several query heads; only the chosen
    ones lose the keys); None: every head. prefill_only: block only in the first forward call (the
    prompt); False also blocks the keys from the queries of later calls (under `generate`, every
    generated token when queries is None). Needs attn_implementation "sdpa" or "eager". A query whose
    every visible key is blocked has no attention distribution left (sdpa outputs zeros, eager an
    average over the masked keys): never block all of them.
    """

    layers: Sequence[int] | int
    keys: Sequence[np.ndarray] | np.ndarray
    queries: Sequence[np.ndarray] | np.ndarray | None = None
    heads: Sequence[int] | None = None
    prefill_only: bool = True

    @property
    def layer_list(self) -> list[int]:
        """The chosen decoder layers as a list."""
        return [int(self.layers)] if np.isscalar(self.layers) else [int(x) for x in self.layers]


_PAD = np.iinfo(np.int64).max


def _padded(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Each example's unique positions as one row of an int64 matrix, padded with a value beyond any position."""
    rows = [np.unique(np.asarray(r, dtype=np.int64).reshape(-1)) for r in rows]
    out = np.full((len(rows), max((len(r) for r in rows), default=0)), _PAD, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


class _Blocker:
    """One BlockAttention's (query, key) pairs per batch shape; `_LayerBlocks` writes them into the masks."""

    def __init__(self, block: BlockAttention):
        self.block = block
        self.positions: dict[int, tuple[list[np.ndarray], list[np.ndarray] | None]] = {}

    def _pairs(self, B: int, S: int, K: int, offset: int, device) -> tuple[torch.Tensor, ...] | None:
        """(example, query row of this call, key column) of every blocked pair in this call, as three flat
        long tensors; None when nothing is blocked here. Vectorised over the batch: per batch size, the
        examples' key columns (>= 0) and query positions are kept as rows of padded matrices."""
        if B not in self.positions:
            b = self.block
            keys = _padded([k[k >= 0] for k in _per_example(b.keys, B, "attention edit keys")])
            queries = None if b.queries is None else _padded(list(_per_example(b.queries, B, "attention edit queries")))
            self.positions[B] = (keys, queries)
        keys, queries = self.positions[B]
        col_ok = keys < K  # [B, n_keys] (padding is never < K)
        if queries is None:
            rows = np.broadcast_to(np.arange(S) + offset, (B, S))
            row_ok = np.ones((B, S), dtype=bool)
        else:
            rows = queries
            row_ok = (queries >= offset) & (queries < offset + S)
        ex, qi, ki = np.nonzero(row_ok[:, :, None] & col_ok[:, None, :])
        if not len(ex):
            return None
        out = (ex, rows[ex, qi] - offset, keys[ex, ki])
        return tuple(torch.as_tensor(v, dtype=torch.long, device=device) for v in out)

    def active(self, span: _Span) -> bool:
        """Whether this block applies to the current call (prefill_only blocks only the first)."""
        return not (self.block.prefill_only and span.calls > 0)


class _LayerBlocks:
    """The BlockAttention edits of one attention layer, applied together: one edited mask per call (a single
    expand and clone, whatever the number of edits or head sets), shared by every layer with the same edits."""

    def __init__(self, blockers: Sequence[_Blocker], n_heads: int, implementation: str):
        self.blockers = list(blockers)
        self.n_heads = n_heads
        self.implementation = implementation
        self.memo: tuple = (None, None)  # ((call, id(mask in)), mask out)

    def edit(self, mask: torch.Tensor | None, h: torch.Tensor, span: _Span) -> torch.Tensor | None:
        """The attention mask with every blocked pair removed (`mask` itself when nothing is blocked in this call)."""
        active = [b for b in self.blockers if b.active(span)]
        if not active:
            return mask
        key = (span.calls, id(mask))
        if self.memo[0] == key:
            return self.memo[1]
        B, S = h.shape[:2]
        K = mask.shape[-1] if mask is not None else span.offset + S  # no mask: DynamicCache, keys = columns so far
        work = [(b, p) for b in active if (p := b._pairs(B, S, K, span.offset, h.device)) is not None]
        out = mask
        if work:
            if mask is None:  # sdpa without padding relies on is_causal: write the causal mask out
                q = torch.arange(S, device=h.device)[:, None] + span.offset
                allowed = (torch.arange(K, device=h.device)[None, :] <= q)[None, None]
                mask = allowed if self.implementation == "sdpa" else torch.zeros(
                    allowed.shape, dtype=h.dtype, device=h.device).masked_fill(~allowed, torch.finfo(h.dtype).min)
            per_head = any(b.block.heads is not None for b, _ in work)
            n_h = self.n_heads if per_head else mask.shape[1]
            out = mask.expand(B, n_h, S, K).clone()
            fill = False if out.dtype == torch.bool else torch.finfo(out.dtype).min  # bool: True = attend; float: additive
            for b, pairs in work:
                heads = torch.as_tensor(list(b.block.heads) if b.block.heads is not None else range(n_h),
                                        dtype=torch.long, device=h.device)
                ex, rows, cols = pairs  # one scatter per edit: every (example, row, col) pair, every head
                out[ex[:, None], heads[None, :], rows[:, None], cols[:, None]] = fill
        self.memo = (key, out)
        return out

    def hook(self, span: _Span):
        """Forward pre-hook (with kwargs) for an attention module: swap in the edited `attention_mask`."""

        def pre(m, a, kw):
            h = kw["hidden_states"] if "hidden_states" in kw else a[0]
            positional = "attention_mask" not in kw and len(a) > 1
            mask = a[1] if positional else kw.get("attention_mask")
            new = self.edit(mask, h, span)
            if new is mask:
                return None
            if positional:
                return (a[0], new, *a[2:]), kw
            return a, {**kw, "attention_mask": new}

        return pre


def left_pad(adapter, images, texts: Sequence[str]):
    """(inputs, pads, batch): the adapter's batch with every per-token tensor moved to left padding.

    `pads[i]` columns of padding precede example i; `batch.layouts[i]` still counts positions from
    the example's first real token (so column = position + pads[i])."""
    batch = adapter.prepare(list(images), list(texts))
    ids = batch.inputs["input_ids"]
    B, S = ids.shape
    pads = [S - n for n in batch.lengths]
    inputs = {}
    for k, v in batch.inputs.items():
        if torch.is_tensor(v) and v.dim() == 2 and tuple(v.shape) == (B, S) and not k.startswith(("pixel", "image")):
            # right padding holds the pad values at the end: rolling each row right by its padding
            # puts them in front, exactly what the processor's left padding would produce
            v = torch.stack([torch.roll(v[i], pads[i]) if pads[i] else v[i] for i in range(B)])
        inputs[k] = v
    return inputs, pads, batch


def stop_ids(adapter) -> set[int]:
    """Token ids that end a generated answer: the generation config's eos ids and the padding ids."""
    gc = adapter.model.generation_config
    eos = gc.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
    if gc.pad_token_id is not None:
        ids.add(int(gc.pad_token_id))
    if adapter.tokenizer.pad_token_id is not None:
        ids.add(int(adapter.tokenizer.pad_token_id))
    return ids


def _check(adapter, edit: Edit) -> Site:
    site = Site.parse(edit.site)
    if site.kind not in EDITABLE:
        raise UserError(f"site {edit.site} cannot be edited; editable sites are {', '.join(k + '.L' for k in EDITABLE)}")
    top = adapter.n_layers + (1 if site.kind == "resid" else 0)
    if not 0 <= site.layer < top:
        raise UserError(f"site {edit.site} out of range: valid {site.kind} layers are 0..{top - 1}")
    return site


def _check_block(adapter, block: BlockAttention) -> str:
    """Validate an attention edit against the model; returns its attention implementation."""
    n, n_heads = adapter.n_layers, adapter.n_heads
    layers = block.layer_list
    if not layers:
        raise UserError("attention edit with no layers; pass layers=range(adapter.n_layers) for all")
    for L in layers:
        if not 0 <= L < n:
            raise UserError(f"attention edit layer {L} out of range: this model has {n} decoder layers (0..{n - 1})")
    for hd in block.heads or ():
        if not 0 <= int(hd) < n_heads:
            raise UserError(f"attention edit head {hd} out of range: each layer has {n_heads} query heads (0..{n_heads - 1})")
    impls = {str(adapter.attention(L).config._attn_implementation) for L in layers}
    bad = sorted(impls - set(MASKABLE_ATTENTION))
    if bad:
        raise UserError(f"attention edits need attn_implementation 'sdpa' or 'eager', not {bad[0]!r}; "
                        "call adapter.model.set_attn_implementation('sdpa') first")
    return impls.pop()


@contextmanager
def apply_edits(adapter, edits: Sequence[Edit | BlockAttention]) -> Iterator[None]:
    """Within the block, every forward pass of `adapter.model` applies `edits` (in order, per site or layer)."""
    span = _Span()
    hooks = []

    def count(m, a, kw):  # the decoder's pre-hook: where this call sits in the sequence
        x = kw.get("inputs_embeds")
        if x is None:
            x = kw.get("input_ids")
        if x is None and a:
            x = a[0]
        span.offset += span.seq  # (a call cut short by Capture's early stop still counts whole)
        span.calls += 1
        span.seq = int(x.shape[1]) if x is not None else 0

    try:
        hooks.append(adapter.decoder.register_forward_pre_hook(count, with_kwargs=True))
        by_layer: dict[int, list[_Blocker]] = {}
        implementation = {}
        for edit in edits:
            if isinstance(edit, BlockAttention):
                blocker = _Blocker(edit)
                impl = _check_block(adapter, edit)
                for L in dict.fromkeys(edit.layer_list):
                    by_layer.setdefault(L, []).append(blocker)
                    implementation[L] = impl
                continue
            site = _check(adapter, edit)
            cache: dict = {}
            hooks.append(resolve_site(adapter, site).write(lambda h, e=edit, c=cache: _apply(e, h, span, c)))
        groups: dict[tuple, _LayerBlocks] = {}  # layers with the same edits share one edited mask per call
        for L, blockers in by_layer.items():
            key = (tuple(id(b) for b in blockers), implementation[L])
            if key not in groups:
                groups[key] = _LayerBlocks(blockers, adapter.n_heads, implementation[L])
            hooks.append(adapter.attention(L).register_forward_pre_hook(groups[key].hook(span), with_kwargs=True))
        yield
    finally:
        for h in hooks:
            h.remove()

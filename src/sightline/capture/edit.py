"""Edits at sites during the native forward: change an activation at chosen positions, then let the model run on.

An edit is (site, positions, function), as DESIGN.md states. Hooks sit exactly where `Capture`
reads the same site, and are registered before any capture hook inside the `with` block, so a
capture of an edited site sees the edited value. Positions are columns of the (padded) input
tensor; the hooks count the tokens each forward call covers, so the same edit works for one
forward pass and for `generate` (prefill, then one token per step from the KV cache).

    with apply_edits(adapter, [Edit("resid.3", [img_pos], add_vector(v, 8.0))]):
        out = adapter.model.generate(**inputs, max_new_tokens=5)   # steered prefill, clean decoding
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from sightline.capture.sites import Site
from sightline.errors import UserError

EDITABLE = ("resid", "attn_out", "mlp_out")

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


def _targets(edit: Edit, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    if edit.positions is None:
        return None
    pos = edit.positions
    if isinstance(pos, np.ndarray) or (len(pos) and np.isscalar(pos[0])):
        pos = [np.asarray(pos)] * batch_size
    if len(pos) != batch_size:
        raise ValueError(f"edit at {edit.site}: {len(pos)} position arrays for a batch of {batch_size}")
    counts = [len(p) for p in pos]
    b = torch.as_tensor(np.repeat(np.arange(batch_size), counts), dtype=torch.long, device=device)
    s = torch.as_tensor(np.concatenate([np.asarray(p, dtype=np.int64) for p in pos]) if pos else np.zeros(0),
                        dtype=torch.long, device=device)
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


def _check(adapter, edit: Edit) -> Site:
    site = Site.parse(edit.site)
    if site.kind not in EDITABLE:
        raise UserError(f"site {edit.site} cannot be edited; editable sites are {', '.join(k + '.L' for k in EDITABLE)}")
    top = adapter.n_layers + (1 if site.kind == "resid" else 0)
    if not 0 <= site.layer < top:
        raise UserError(f"site {edit.site} out of range: valid {site.kind} layers are 0..{top - 1}")
    return site


@contextmanager
def apply_edits(adapter, edits: Sequence[Edit]) -> Iterator[None]:
    """Within the block, every forward pass of `adapter.model` applies `edits` (in order, per site)."""
    layers = adapter.decoder_layers
    span = _Span()
    hooks = []

    def layer_output(m, a, o, edit, cache):  # resid.{L>0} = output of block L-1
        if isinstance(o, (tuple, list)):
            return (_apply(edit, o[0], span, cache), *o[1:])
        return _apply(edit, o, span, cache)

    def layer_input(m, a, kw, edit, cache):  # resid.0 = input of block 0
        if a:
            return (_apply(edit, a[0], span, cache), *a[1:]), kw
        return a, {**kw, "hidden_states": _apply(edit, kw["hidden_states"], span, cache)}

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
        for edit in edits:
            site = _check(adapter, edit)
            cache: dict = {}
            L = site.layer
            if site.kind == "resid" and L == 0:
                hooks.append(layers[0].register_forward_pre_hook(
                    lambda m, a, kw, e=edit, c=cache: layer_input(m, a, kw, e, c), with_kwargs=True))
            elif site.kind == "resid":
                hooks.append(layers[L - 1].register_forward_hook(
                    lambda m, a, o, e=edit, c=cache: layer_output(m, a, o, e, c)))
            else:
                mod = layers[L].self_attn if site.kind == "attn_out" else layers[L].mlp
                hooks.append(mod.register_forward_hook(lambda m, a, o, e=edit, c=cache: layer_output(m, a, o, e, c)))
        yield
    finally:
        for h in hooks:
            h.remove()

"""Read named sites at chosen positions during one forward pass of the native HF model.

Hooks sit on the model's own modules (decoder layers, attention, MLP, vision blocks), where the
site table (`sites.resolve_site`) puts them; keys and values are read from the KV cache the
forward fills, so they are exactly what later tokens attend to. Each hook gathers only the chosen
positions, so memory is proportional to what is kept.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from sightline.capture.sites import KV_KINDS, Site, resolve_site, site_shape


class _StopForward(Exception):
    """Raised by a hook once every requested site is captured, to skip the rest of the model."""


@dataclass
class _Plan:
    sites: list[Site]
    last_layer: int  # last decoder layer whose forward must run (-1: none needed)
    first_unneeded: int  # decoder layer whose INPUT is the last thing needed (-1: none)
    needs_cache: bool
    needs_lm: bool


def _plan(sites: list[str], n_layers: int, resid_at_block_input: bool = False) -> _Plan:
    parsed = [Site.parse(s) for s in sites]
    last = -1
    before = -1
    for s in parsed:
        if s.kind == "resid" and resid_at_block_input and 0 < s.layer < n_layers:
            before = max(before, s.layer)  # read at block L's input: L-1 must run, and what follows it
        elif s.kind == "resid":
            last = max(last, s.layer - 1)
        elif s.kind in ("keys", "values", "keys_prerope", "attn_out", "mlp_out"):
            last = max(last, s.layer)
    needs_lm = any(s.kind != "vision" for s in parsed)
    if before <= last:
        before = -1
    return _Plan(parsed, last, before, any(s.kind in KV_KINDS for s in parsed), needs_lm)


def cache_kwarg(model) -> str:
    """The keyword under which `model.forward` takes a KV cache: `cache` (transformers >= 5.24) or `past_key_values`.

    transformers 5.24 deprecates `past_key_values` (removal announced for 5.40); passing the name the
    installed version expects keeps our calls free of its deprecation warning on both sides.
    """
    key = type(model)
    if key not in _CACHE_KWARG:
        params = inspect.signature(model.forward).parameters
        _CACHE_KWARG[key] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[key]


_CACHE_KWARG: dict[type, str] = {}


class Capture:
    """Capture sites at chosen positions of a batch: `Capture(adapter, sites).run(batch, positions)`.

    `positions[i]` are sequence positions of example i (e.g. `layout.positions("image")`). The
    result is one dict per example, site -> tensor [n_positions_i, *site_shape] on the CPU in
    `dtype` (default: the model's). `vision.{i}` rows are NaN at positions that have no vision
    patch (text, newline tokens).
    """

    def __init__(self, adapter, sites: list[str], dtype: torch.dtype | None = None, stop_early: bool = True):
        self.adapter = adapter
        self.sites = list(sites)
        self.plan = _plan(self.sites, adapter.n_layers, getattr(adapter, "resid_at_block_input", False))
        self.dtype = dtype
        self.stop_early = stop_early
        self.shapes = {s: site_shape(s, adapter) for s in self.sites}

    @torch.no_grad()
    def run(self, batch, positions: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        """One forward pass of `batch`; returns the captured sites per example."""
        ad = self.adapter
        dev = ad.device
        counts = [len(p) for p in positions]
        b_idx = torch.as_tensor(np.repeat(np.arange(len(positions)), counts), dtype=torch.long, device=dev)
        s_idx = torch.as_tensor(np.concatenate(positions) if positions else np.zeros(0), dtype=torch.long, device=dev)
        got: dict[str, torch.Tensor] = {}
        vision_idx = None
        if any(s.kind == "vision" for s in self.plan.sites):
            vi = ad.vision_gather_index(batch, positions)
            vision_idx = torch.as_tensor(vi, dtype=torch.long, device=dev)

        def keep(name, t):
            got[name] = t.to(self.dtype) if self.dtype is not None else t

        def gather_seq(t):  # [B, S, ...] -> [N, ...]
            return t[b_idx, s_idx]

        def gather_vision(t):  # any [..., d] -> [N, (k,) d], NaN where index is -1
            flat = t.reshape(-1, t.shape[-1])
            idx = vision_idx.clamp(min=0)
            out = flat[idx]
            miss = vision_idx < 0
            if miss.any():
                out = out.clone()
                out[miss] = float("nan")
            return out

        hooks = []
        cache = None
        try:
            for s in self.plan.sites:
                where = resolve_site(ad, s)
                if where.when == "cache":
                    continue
                gather = gather_vision if s.kind == "vision" else gather_seq
                hooks.append(where.read(lambda t, name=s.name, gather=gather: keep(name, gather(t))))
            if self.stop_early:
                hooks.append(self._stop_hook())
            kwargs = dict(batch.inputs)
            kwargs = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
            if self.plan.needs_cache:
                from transformers import DynamicCache

                cache = DynamicCache(config=ad.model.config)
                for layer in cache.layers:  # sliding-window layers (Gemma 3) would drop early keys: keep all
                    if getattr(layer, "is_sliding", False):
                        layer.activate_past_recording()
                kwargs[cache_kwarg(ad.model)] = cache
            try:
                ad.model(**kwargs, use_cache=self.plan.needs_cache, logits_to_keep=1, return_dict=True)
            except _StopForward:
                pass
        finally:
            for h in hooks:
                h.remove()
        if cache is not None:
            for s in self.plan.sites:
                if s.kind in KV_KINDS:
                    keep(s.name, gather_seq(resolve_site(ad, s).read_cache(cache)))
        missing = [s for s in self.sites if s not in got]
        if missing:
            raise RuntimeError(f"sites not captured (hook never fired): {missing}")
        out: list[dict[str, torch.Tensor]] = [{} for _ in positions]
        for name, t in got.items():
            t = t.detach().to("cpu")
            for i, part in enumerate(torch.split(t, counts)):
                out[i][name] = part
        return out

    def _stop_hook(self):
        """After the last layer anything needs, stop the forward (skips later layers, norm, lm_head)."""
        ad = self.adapter
        if not self.plan.needs_lm:  # vision sites only: stop before the language model runs
            def pre(m, a, kw):
                raise _StopForward

            return ad.decoder.register_forward_pre_hook(pre, with_kwargs=True)
        last = self.plan.last_layer
        if self.plan.first_unneeded >= 0:  # stop as that block starts, once its input is read
            def pre_block(m, a, kw):
                raise _StopForward

            return ad.decoder_layers[self.plan.first_unneeded].register_forward_pre_hook(pre_block, with_kwargs=True)
        if last < 0:  # only projector / resid.0: stop as the first layer starts
            def pre0(m, a, kw):
                raise _StopForward

            return ad.decoder_layers[0].register_forward_pre_hook(pre0, with_kwargs=True)

        def post(m, a, o):
            raise _StopForward

        return ad.decoder_layers[last].register_forward_hook(post)

"""Sites: parse names (`--sites` / `--layers`), validate them, give their shapes, and the one site table.

A site names one activation with its layer: `resid.{L}`, `keys.{L}`, `keys_prerope.{L}`,
`values.{L}`, `attn_out.{L}`, `mlp_out.{L}`, `vision.{i}`, and `projector` (no layer). See
DESIGN.md for what each one is.

`resolve_site(adapter, site)` is the site table: it says where a site lives in the native model
(which module, read at its input or output, or the KV cache), using only the facts of the
adapter's `modules`. Capture reads and edits write through it, so both always touch the same
tensor.

    site            hook                                   tensor
    resid.0         pre  decoder block 0                   hidden_states input
    resid.L (L>0)   post decoder block L-1                 output (pre block L where the decoder adds
                                                           between blocks: `resid_at_block_input`)
    attn_out.L      post block L's attention               output[0] (its post-norm where the block has one)
    mlp_out.L       post block L's MLP                     output (its post-norm where the block has one)
    keys_prerope.L  post block L's k-norm, else k_proj     output, as [B, S, n_kv, head_dim]
    keys.L/values.L cache (layer L of the KV cache the forward fills)
    projector       pre  decoder                           inputs_embeds
    vision.i        pre  vision block i (i = n: post the last block)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sightline.errors import UserError

LM_KINDS = ("resid", "keys", "keys_prerope", "values", "attn_out", "mlp_out")
KINDS = ("vision", "projector", *LM_KINDS)
KV_KINDS = ("keys", "values")
EDITABLE = ("resid", "attn_out", "mlp_out")
_SITE = re.compile(r"^([a-z_]+)(?:\.(\d+))?$")


@dataclass(frozen=True)
class Site:
    """A parsed site name."""

    kind: str
    layer: int | None

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}.{self.layer}"

    @classmethod
    def parse(cls, name: str) -> Site:
        m = _SITE.match(name.strip())
        if not m or m.group(1) not in KINDS:
            raise UserError(f"unknown site {name!r}; sites are {', '.join(k + '.L' for k in KINDS if k != 'projector')}"
                            " and projector")
        kind, layer = m.group(1), m.group(2)
        if kind == "projector" and layer is not None:
            raise UserError("site 'projector' takes no layer")
        if kind != "projector" and layer is None:
            raise UserError(f"site {name!r} needs a layer, e.g. {kind}.0")
        return cls(kind, None if layer is None else int(layer))


def parse_layers(spec: str | None, n: int, what: str = "layer") -> list[int]:
    """`all`, `0,4,8`, `4-12` (inclusive) or a mix `0,4-6` -> sorted unique layers in [0, n)."""
    if spec is None or str(spec).strip() in ("", "all"):
        return list(range(n))
    out: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise UserError(f"bad --layers {spec!r}; use all, 0,4,8 or 4-12") from None
    bad = [x for x in sorted(out) if not 0 <= x < n]
    if bad:
        raise UserError(f"{what} {bad[0]} out of range: valid {what}s are 0..{n - 1}")
    return sorted(out)


def resolve_sites(sites: str | list[str], layers: str | None, n_layers: int, n_vision_layers: int,
                  kv_layers: list[int] | None = None) -> list[str]:
    """Expand `--sites resid,keys,projector` with `--layers` into exact, validated site names.

    A bare kind takes every layer of `layers`; an exact name (`resid.3`) is kept as is. Layer
    ranges: resid 0..n_layers (n_layers = output of the last block), vision 0..n_vision_layers,
    the other LM sites 0..n_layers-1. `kv_layers`: the layers that have keys and values (all when None;
    Qwen3.5's linear-attention layers have none): a bare `keys` / `values` / `keys_prerope` takes the chosen
    layers among them, an exact name elsewhere is a UserError.
    """
    items = [s.strip() for s in (sites.split(",") if isinstance(sites, str) else sites) if s.strip()]
    if not items:
        raise UserError("no sites given; e.g. --sites resid,keys,values")
    out: list[str] = []
    for item in items:
        if item in KINDS and item != "projector":
            # resid.{n_layers} is the last block's output; the message names the kind and its range
            limit = {"resid": n_layers + 1, "vision": n_vision_layers + 1}.get(item, n_layers)
            chosen = parse_layers(layers, limit, f"{item} layer")
            if item in KEY_KINDS and kv_layers is not None:
                chosen = [L for L in chosen if L in kv_layers]
                if not chosen:
                    raise UserError(f"no {item} in the chosen layers: only layers {_listing(kv_layers)} have "
                                    "attention keys and values (the others are linear attention)")
            out.extend(f"{item}.{L}" for L in chosen)
            continue
        site = Site.parse(item)
        if site.layer is not None:
            limit = {"resid": n_layers + 1, "vision": n_vision_layers + 1}.get(site.kind, n_layers)
            if not 0 <= site.layer < limit:
                raise UserError(f"site {site.name} out of range: valid {site.kind} layers are 0..{limit - 1}")
            if site.kind in KEY_KINDS and kv_layers is not None and site.layer not in kv_layers:
                raise UserError(f"site {site.name} does not exist: layer {site.layer} is linear attention (no keys "
                                f"or values); layers with them are {_listing(kv_layers)}")
        out.append(site.name)
    return sorted(dict.fromkeys(out), key=site_sort_key)


KEY_KINDS = ("keys", "keys_prerope", "values")  # sites of attention layers only


def _listing(layers: list[int]) -> str:
    return ", ".join(map(str, layers))


def site_sort_key(name: str) -> tuple:
    """Natural order: kinds in KINDS order, then layer number (resid.2 before resid.10)."""
    s = Site.parse(name)
    return (KINDS.index(s.kind), -1 if s.layer is None else s.layer)


def site_shape(name: str, adapter) -> tuple[int, ...]:
    """Per-token shape of a site for a loaded adapter."""
    s = Site.parse(name)
    if s.kind in ("resid", "attn_out", "mlp_out", "projector"):
        return (adapter.hidden_size,)
    if s.kind in ("keys", "keys_prerope", "values"):
        return (adapter.n_kv_heads, adapter.head_dim)
    return tuple(adapter.vision_site_shape())


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@dataclass(frozen=True)
class SiteHook:
    """Where one site lives: `module` and `when` ("pre": its input, "post": its output) or the KV cache.

    `arg` names the input (keyword, else the first positional argument) a "pre" site reads;
    `shape` is the per-token shape a "post" output is viewed as ([B, S, *shape]).
    """

    site: Site
    when: str  # "pre" | "post" | "cache"
    module: Any = None  # torch.nn.Module; None for "cache"
    arg: str = "hidden_states"
    shape: tuple[int, ...] | None = None
    heads_first: bool = False  # the output is [B, heads, S, hd]: moved to [B, S, heads, hd] before use

    @property
    def writable(self) -> bool:
        """Whether an activation edit may replace this site."""
        return self.site.kind in EDITABLE

    def _view(self, t):
        if self.heads_first:
            t = t.transpose(1, 2)
        return t if self.shape is None else t.reshape(t.shape[0], t.shape[1], *self.shape)

    def read(self, fn: Callable[[Any], None]):
        """Hook calling fn(tensor) with the site's value at every forward; returns the removable handle."""
        if self.when == "pre":
            def pre(m, a, kw):
                fn(kw[self.arg] if self.arg in kw else a[0])

            return self.module.register_forward_pre_hook(pre, with_kwargs=True)
        if self.when == "post":
            return self.module.register_forward_hook(lambda m, a, o: fn(self._view(_first(o))))
        raise ValueError(f"{self.site.name} is read from the KV cache (read_cache), not by a hook")

    def write(self, fn: Callable[[Any], Any]):
        """Hook replacing the site's value by fn(value) at every forward; returns the removable handle."""
        if not self.writable:
            raise ValueError(f"site {self.site.name} is not editable")
        if self.when == "pre":
            def pre(m, a, kw):
                if self.arg in kw:
                    return a, {**kw, self.arg: fn(kw[self.arg])}
                return (fn(a[0]), *a[1:]), kw

            return self.module.register_forward_pre_hook(pre, with_kwargs=True)

        def post(m, a, o):
            if isinstance(o, (tuple, list)):
                return (fn(o[0]), *o[1:])
            return fn(o)

        return self.module.register_forward_hook(post)

    def read_cache(self, cache):
        """keys.L / values.L from a filled KV cache, [B, S, n_kv_heads, head_dim]."""
        layer = cache.layers[self.site.layer]
        t = layer.keys if self.site.kind == "keys" else layer.values  # [B, n_kv, S, hd]
        return t.transpose(1, 2)


def resolve_site(adapter, site: str | Site) -> SiteHook:
    """The site table: where `site` lives in `adapter`'s model (module and hook kind, or the cache)."""
    s = site if isinstance(site, Site) else Site.parse(site)
    L = s.layer
    if s.kind == "resid":
        if L == 0 or (getattr(adapter, "resid_at_block_input", False) and L < adapter.n_layers):
            return SiteHook(s, "pre", adapter.decoder_layers[L])
        return SiteHook(s, "post", adapter.decoder_layers[L - 1])  # the stream entering L is what L-1 returned
    if s.kind == "attn_out":
        return SiteHook(s, "post", adapter.attn_write(L))
    if s.kind == "mlp_out":
        return SiteHook(s, "post", adapter.mlp_write(L))
    if s.kind == "keys_prerope":
        return SiteHook(s, "post", adapter.prerope_keys_module(L), shape=(adapter.n_kv_heads, adapter.head_dim),
                        heads_first=adapter.prerope_keys_heads_first(L))
    if s.kind in KV_KINDS:
        if L not in getattr(adapter, "kv_layers", range(L + 1)):
            adapter.attention(L)  # the UserError naming the layers that have keys and values
        return SiteHook(s, "cache")
    if s.kind == "projector":  # what the decoder receives: image features already scattered in
        return SiteHook(s, "pre", adapter.decoder, arg="inputs_embeds")
    blocks = adapter.vision_layers
    if L < len(blocks):
        return SiteHook(s, "pre", blocks[L])
    return SiteHook(s, "post", blocks[-1])

"""Site names: parse `--sites` / `--layers`, validate them against a model, and give their shapes.

A site names one activation with its layer: `resid.{L}`, `keys.{L}`, `keys_prerope.{L}`,
`values.{L}`, `attn_out.{L}`, `mlp_out.{L}`, `vision.{i}`, and `projector` (no layer). See
DESIGN.md for what each one is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sightline.errors import UserError

LM_KINDS = ("resid", "keys", "keys_prerope", "values", "attn_out", "mlp_out")
KINDS = ("vision", "projector", *LM_KINDS)
KV_KINDS = ("keys", "values")
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
        raise UserError(f"{what} {bad[0]} out of range: this model has {n} ({what}s 0..{n - 1})")
    return sorted(out)


def resolve_sites(sites: str | list[str], layers: str | None, n_layers: int, n_vision_layers: int) -> list[str]:
    """Expand `--sites resid,keys,projector` with `--layers` into exact, validated site names.

    A bare kind takes every layer of `layers`; an exact name (`resid.3`) is kept as is. Layer
    ranges: resid 0..n_layers (n_layers = output of the last block), vision 0..n_vision_layers,
    the other LM sites 0..n_layers-1.
    """
    items = [s.strip() for s in (sites.split(",") if isinstance(sites, str) else sites) if s.strip()]
    if not items:
        raise UserError("no sites given; e.g. --sites resid,keys,values")
    out: list[str] = []
    for item in items:
        if item in KINDS and item != "projector":
            if item == "vision":
                chosen = parse_layers(layers, n_vision_layers + 1, "vision layer")
            elif item == "resid":  # resid.{n_layers} is the last block's output
                chosen = parse_layers(layers, n_layers + 1, "layer")
            else:
                chosen = parse_layers(layers, n_layers, "layer")
            out.extend(f"{item}.{L}" for L in chosen)
            continue
        site = Site.parse(item)
        if site.layer is not None:
            limit = {"resid": n_layers + 1, "vision": n_vision_layers + 1}.get(site.kind, n_layers)
            if not 0 <= site.layer < limit:
                raise UserError(f"site {site.name} out of range: valid {site.kind} layers are 0..{limit - 1}")
        out.append(site.name)
    return sorted(dict.fromkeys(out), key=site_sort_key)


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

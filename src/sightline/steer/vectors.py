"""Steering vectors: read class directions, build v = dir[tgt] - dir[src] at a site, and normalise it.

Directions format (what `sightline probe` writes as `directions.safetensors`, and what this module
reads): a safetensors file of 1-D float tensors [d], one per key:

    "{site}/{class}"       a class direction at a site, e.g. "resid.3/circle" (a class mean of the
                           mean-pooled image tokens, possibly centred: only differences are used)
    "{site}/{src}:{tgt}"   an explicit steering vector from src to tgt, used as given (then normalised)

An explicit vector wins over a difference of class directions. A `directions` argument is such a
file, a folder holding `directions.safetensors` (or exactly one `*.safetensors`), or an
ActivationStore folder: class means of the mean-pooled image tokens (modality `image`, the image
newline tokens left out) are then computed from the store, classes taken from each example's
`label` or another field named by a dotted path such as `facts.objects.0.shape` (the paper's
"difference of class means of pooled activations").

Normalisation (`normalize`), v_raw -> v; the edit adds k * v:
    "unit"   the paper's: v = v_raw / |v_raw|, so k is in the residual stream's own units (the paper
             sweeps k in 0..30 on LLaVA-NeXT-Mistral-7B, whose residual norms are far larger than 1)
    "resid"  v = v_raw / |v_raw| * r_L, r_L = mean norm of resid.L over the image tokens of the
             steered images' clean prefill: k = 1 adds a vector as long as a typical image token's
             residual, which makes k comparable across layers and models
    "none"   v = v_raw
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sightline.errors import UserError

DIRECTIONS_FILE = "directions.safetensors"
NORMALIZATIONS = ("unit", "resid", "none")


def load_directions(path: str | os.PathLike, sites: Sequence[str] | None = None, label: str = "label",
                    progress: bool = False) -> dict[str, torch.Tensor]:
    """Directions as {"{site}/{class}" or "{site}/{src}:{tgt}": float32 [d]} from a file, folder or store.

    `sites` limits what is computed from a store (a file is read whole)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"directions {p} do not exist: pass a directions .safetensors file, a folder holding "
                        f"{DIRECTIONS_FILE}, or an activation store folder")
    if p.is_dir():
        from sightline.store import format as fmt

        if (p / fmt.MANIFEST).is_file():
            from sightline.store import ActivationStore

            store = ActivationStore.open(p)
            return class_means(store, sites if sites is not None else
                               [s for s in store.sites if s.startswith("resid.")], label, progress)
        if (p / DIRECTIONS_FILE).is_file():
            p = p / DIRECTIONS_FILE
        else:
            found = sorted(p.glob("*.safetensors"))
            if len(found) != 1:
                raise UserError(f"{p} holds {len(found)} .safetensors files and no {DIRECTIONS_FILE}: "
                                "pass the directions file itself")
            p = found[0]
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read directions {p}: {e} (it must be a safetensors file)") from None
    out = {}
    for key, t in raw.items():
        if "/" not in key or t.ndim != 1:
            raise UserError(f"directions {p}: key {key!r} {tuple(t.shape)} is not a '{{site}}/{{class}}' vector; "
                            "each tensor must be 1-D and named like 'resid.3/circle'")
        out[key] = t.float()
    return out


def class_means(store, sites: Sequence[str], label: str = "label", progress: bool = False) -> dict[str, torch.Tensor]:
    """{"{site}/{class}": mean over a class's examples of each example's mean image-token activation};
    `label` is an example field or a dotted path into it (see `lookup`)."""
    from tqdm.auto import tqdm

    ex_ids = np.array([e["example"] for e in store.examples], dtype=np.int64)
    labels = [lookup(e, label) for e in store.examples]
    if not len(ex_ids) or all(v is None for v in labels):
        raise UserError(f"store {store.path} has no example with a label {label!r}; steering directions need class "
                        "labels (extract from an image folder with class subfolders, or name a field such as "
                        "facts.objects.0.shape)")
    classes = sorted({str(v) for v in labels if v is not None})
    row_of = np.full(int(ex_ids.max()) + 1, -1, dtype=np.int64)
    row_of[ex_ids] = np.arange(len(ex_ids))
    sites = list(sites)
    for s in sites:
        store.shape(s)  # UserError naming the store's sites
    sums = {s: torch.zeros(len(ex_ids), int(np.prod(store.shape(s))), dtype=torch.float64) for s in sites}
    count = torch.zeros(len(ex_ids), dtype=torch.float64)
    for b in tqdm(store.iter_batches(sites, batch_size=65536, modality="image"), desc="class means",
                  disable=not progress, dynamic_ncols=True):
        rows = torch.from_numpy(row_of[b["index"]["example"]])
        count.index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))
        for s in sites:
            sums[s].index_add_(0, rows, b[s].reshape(len(rows), -1).double())
    has = count > 0
    if not bool(has.any()):
        raise UserError(f"store {store.path} holds no image tokens; extract with --positions image")
    code = {c: i for i, c in enumerate(classes)}
    lab = torch.tensor([code[str(v)] if v is not None else -1 for v in labels])
    lab = torch.where(has, lab, torch.full_like(lab, -1))  # examples with no image token count nowhere
    keep = lab >= 0
    n_per = torch.bincount(lab[keep], minlength=len(classes)).double()
    out = {}
    for s in sites:
        per_ex = sums[s] / count.clamp(min=1)[:, None]
        acc = torch.zeros(len(classes), per_ex.shape[1], dtype=torch.float64).index_add_(0, lab[keep], per_ex[keep])
        for c, i in code.items():
            if n_per[i] > 0:
                out[f"{s}/{c}"] = (acc[i] / n_per[i]).float()
    return out


def lookup(record: dict, spec: str):
    """The value at dotted path `spec` (e.g. "label", "facts.objects.0.shape") of a record, looked up at its
    top level and then in its "meta" dict; None when absent."""

    def walk(value, parts):
        for p in parts:
            if isinstance(value, dict) and p in value:
                value = value[p]
            elif isinstance(value, list) and p.isdigit() and int(p) < len(value):
                value = value[int(p)]
            else:
                return None
        return value

    parts = spec.split(".")
    value = walk(record, parts)
    if value is None and isinstance(record.get("meta"), dict):
        value = walk(record["meta"], parts)
    return None if value is None or isinstance(value, (dict, list)) else value


def steering_vector(directions: dict[str, torch.Tensor], site: str, src: str, tgt: str) -> torch.Tensor:
    """The raw vector from class src to class tgt at a site: the explicit one, else dir[tgt] - dir[src]."""
    explicit = directions.get(f"{site}/{src}:{tgt}")
    if explicit is not None:
        return explicit.float()
    have = sorted({k.split("/", 1)[1] for k in directions if k.startswith(site + "/") and ":" not in k})
    missing = [c for c in (src, tgt) if f"{site}/{c}" not in directions]
    if missing:
        where = f"classes there: {', '.join(have)}" if have else (
            "sites there: " + ", ".join(sorted({k.split("/", 1)[0] for k in directions})))
        raise UserError(f"no direction for class {missing[0]!r} at {site} in the directions ({where}); "
                        "check --pairs and --layers")
    v = directions[f"{site}/{tgt}"].float() - directions[f"{site}/{src}"].float()
    if not bool(torch.isfinite(v).all()) or float(v.norm()) == 0.0:
        raise UserError(f"the direction from {src!r} to {tgt!r} at {site} is zero or not finite; "
                        "the two classes have the same (or broken) directions")
    return v


def direction_layers(directions: dict[str, torch.Tensor], kind: str = "resid") -> list[int]:
    """Layers L for which the directions hold some `{kind}.L/...` key, sorted."""
    out = set()
    for key in directions:
        site = key.split("/", 1)[0]
        k, _, layer = site.partition(".")
        if k == kind and layer.isdigit():
            out.add(int(layer))
    return sorted(out)


def normalize(v: torch.Tensor, how: str = "unit", ref_norm: float | None = None) -> torch.Tensor:
    """Normalise a raw steering vector (see the module docstring); `ref_norm` is r_L for 'resid'."""
    if how not in NORMALIZATIONS:
        raise UserError(f"unknown normalisation {how!r}: use one of {', '.join(NORMALIZATIONS)}")
    v = v.float()
    if how == "none":
        return v
    unit = v / v.norm().clamp_min(1e-12)
    if how == "unit":
        return unit
    if ref_norm is None:
        raise ValueError("normalize(how='resid') needs ref_norm, the mean residual norm at the layer")
    return unit * float(ref_norm)


@torch.no_grad()
def mean_image_norms(adapter, images, prompts: Sequence[str], sites: Sequence[str],
                     batch_size: int = 16) -> dict[str, float]:
    """Mean L2 norm of each site over the image tokens (placeholder positions) of the clean prefill."""
    from sightline.capture import Capture

    texts = [adapter.render_prompt(p) for p in prompts]
    cap = Capture(adapter, list(sites), dtype=torch.float32)
    total = {s: 0.0 for s in sites}
    n = 0
    for k in range(0, len(images), batch_size):
        batch = adapter.prepare(list(images[k:k + batch_size]), texts[k:k + batch_size])
        got = cap.run(batch, [lay.image_positions for lay in batch.layouts])
        for g in got:
            for s in sites:
                total[s] += float(g[s].norm(dim=-1).sum())
            n += len(next(iter(g.values())))
    return {s: total[s] / max(n, 1) for s in sites}

"""Class directions for steering: differences of class means (the paper's choice), probe weights,
or any vector file; saved as safetensors keyed "{site}/{class}" with a JSON card.

Convention (shared with `sightline.steer.vectors`): a direction file holds 1-D float32 tensors
[d], key "{site}/{class}". Only differences between classes are meant to be used: the vector from
class s to class t is dir[t] - dir[s], normalised by the user of it.

- class_mean: dir[c] = mu_c - mean over classes of mu_c', in the site's raw units, mu_c being the
  mean over class c's examples of each example's pooled (mean over image tokens) activation. So
  dir[t] - dir[s] = mu_t - mu_s exactly, the paper's steering vector before normalisation, and
  dir[c] alone is class c against the class-balanced average.
- probe: dir[c] = (w_c - mean over classes of w_c') / std, the probe's weights mapped to raw
  activation units (the gradient of the centred logit of c). dir[t] - dir[s] is the direction
  that raises logit t against logit s fastest per unit of standardised input.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sightline.errors import UserError
from sightline.report.files import write_json

NORM_CONVENTION = ("raw: vectors are in the site's own activation units, centred across classes; "
                   "use dir[target] - dir[source] and normalise it (the paper: to unit length)")


def class_means(acts_nd: torch.Tensor, labels_n: Sequence[int] | np.ndarray, n_classes: int) -> torch.Tensor:
    """Mean activation of each class [K, d] (float64 accumulation; NaN rows for empty classes)."""
    x = torch.as_tensor(acts_nd).reshape(len(acts_nd), -1).double()
    y = torch.as_tensor(np.asarray(labels_n), dtype=torch.long)
    sums = torch.zeros(n_classes, x.shape[1], dtype=torch.float64).index_add_(0, y, x)
    counts = torch.bincount(y, minlength=n_classes).double()
    return (sums / counts[:, None]).where(counts[:, None] > 0, torch.tensor(float("nan"), dtype=torch.float64))


def class_mean_directions(acts_nd: torch.Tensor, labels_n, classes: Sequence[str]) -> dict[str, torch.Tensor]:
    """{class: mu_c - mean_c' mu_c'} (float32 [d]); classes without examples are left out."""
    mu = class_means(acts_nd, labels_n, len(classes))
    present = torch.isfinite(mu).all(1)
    if not bool(present.any()):
        raise UserError("no class has any example: cannot make class-mean directions")
    centre = mu[present].mean(0)
    return {c: (mu[i] - centre).float() for i, c in enumerate(classes) if bool(present[i])}


def _pair(dirs: dict[str, torch.Tensor], target: str, source: str | None, normalise: bool) -> torch.Tensor:
    for c in (target, source):
        if c is not None and c not in dirs:
            raise UserError(f"no direction for class {c!r}; classes: {', '.join(sorted(dirs))}")
    v = dirs[target] - dirs[source] if source is not None else dirs[target]
    if normalise:
        norm = float(v.norm())
        if norm == 0.0 or not np.isfinite(norm):
            raise UserError(f"the direction {source!r} -> {target!r} is zero or not finite")
        v = v / norm
    return v


def class_mean_direction(acts_nd: torch.Tensor, labels_n, classes: Sequence[str], target: str,
                         source: str | None = None, normalise: bool = True) -> torch.Tensor:
    """The paper's steering vector: mu_target - mu_source (unit length by default); without a
    source, mu_target against the class-balanced mean of all classes."""
    return _pair(class_mean_directions(acts_nd, labels_n, classes), target, source, normalise)


def probe_directions(probe) -> dict[str, torch.Tensor]:
    """{class: (w_c - mean_c' w_c') / std} of a fitted LinearProbe, in raw activation units."""
    w = probe.weight.double()
    w = (w - w.mean(0, keepdim=True)) / probe.std.double()
    return {c: w[i].float() for i, c in enumerate(probe.classes)}


def probe_direction(probe, target: str, source: str | None = None, normalise: bool = True) -> torch.Tensor:
    """The direction that raises the probe's logit of `target` (against `source`, if given)."""
    return _pair(probe_directions(probe), target, source, normalise)


def load_vector(path: str | os.PathLike, key: str | None = None) -> torch.Tensor:
    """A 1-D float32 vector from a .safetensors (the only tensor, or `key`), .npy or .json/.txt list of numbers."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"vector file {p} does not exist")
    suffix = p.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(p))
            if key is None:
                if len(tensors) != 1:
                    raise UserError(f"{p} holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:8])}...); "
                                    "name one with key=")
                key = next(iter(tensors))
            if key not in tensors:
                raise UserError(f"{p} has no tensor {key!r}; it holds {', '.join(sorted(tensors)[:20])}")
            v = tensors[key]
        elif suffix == ".npy":
            v = torch.from_numpy(np.load(p, allow_pickle=False))
        elif suffix in (".json", ".txt"):
            text = p.read_text()
            v = torch.tensor(json.loads(text) if suffix == ".json" else [float(x) for x in text.split()])
        else:
            raise UserError(f"unsupported vector file {p}: use .safetensors, .npy, .json or .txt")
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read vector {p}: {e}") from None
    v = v.squeeze().float()
    if v.dim() != 1:
        raise UserError(f"vector {p}{'[' + key + ']' if key else ''} has shape {tuple(v.shape)}; a direction is 1-D")
    return v


def save_directions(path: str | os.PathLike, directions: dict[str, dict[str, torch.Tensor]], card: dict) -> Path:
    """Write {site: {class: [d]}} as "{site}/{class}" tensors (atomically) plus `<name>.json`, the card."""
    from sightline.report.files import save_safetensors as save_file  # mode like every other file

    path = Path(path)
    tensors = {f"{site}/{c}": v.detach().float().cpu().contiguous()
               for site, per in directions.items() for c, v in per.items()}
    card = {**card, "norm": NORM_CONVENTION,
            "norms": {k: round(float(v.norm()), 6) for k, v in tensors.items()}}
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"card": json.dumps(card)})
    os.replace(tmp, path)
    write_json(path.with_suffix(".json"), card, indent=1)
    return path


def load_directions(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Read a directions file (or a probe run folder holding directions.safetensors): ({site: {class: [d]}}, card)."""
    from safetensors import safe_open

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "directions.safetensors"
    if not p.is_file():
        raise UserError(f"no directions at {p}: pass a directions .safetensors file or a probe run folder")
    out: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(p), framework="pt") as f:
        card = json.loads((f.metadata() or {}).get("card", "{}"))
        for key in f.keys():
            site, _, cls = key.partition("/")
            out.setdefault(site, {})[cls] = f.get_tensor(key)
    return out, card

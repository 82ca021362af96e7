"""Steering directions in the SAE basis: a class direction's sparse approximation by an SAE's decoder directions.

For a direction v [d] at the SAE's site and the SAE's decoder directions (rows of W_dec, each scaled to
unit norm: the dictionary D [w, d]), orthogonal matching pursuit (OMP; Pati et al. 1993) picks latents one
at a time:

    r_0 = v;  step t: j_t = argmax_j |<D_j, r_{t-1}>|,  c = argmin ||v - sum_{s<=t} c_s D_{j_s}||  (least squares
    over the t latents chosen so far),  r_t = v - sum c_s D_{j_s}

and the cosine reached with t latents is cos(v, v - r_t) = sqrt(1 - ||r_t||^2 / ||v||^2). Coefficients are
signed (a negative one means "less of that latent") and in v's own units per unit decoder direction. This is
scikit-learn's `OrthogonalMatchingPursuit(fit_intercept=False)` on X = D^T (tests/test_sae_directions.py
checks that it agrees to 1e-5); here it runs in float64 torch, one least-squares solve per step.

The same curve for random directions of the same norm (isotropic Gaussian, several seeds: mean, std, min,
max per number of latents) is the baseline: Line of Sight (Rajaram et al. 2025, arXiv 2506.04706, the
"steering vectors in the SAE basis" figure) finds ImageNet class directions reach cosine ~0.8 with ~20
latents where random directions reach ~0.3 with ~80.

Directions come from an ActivationStore (the difference of class means of the mean-pooled image tokens,
as `sightline steer` builds its vectors: a CLASS is mu_CLASS minus the mean over classes, a pair SRC:TGT is
mu_TGT - mu_SRC), or from a directions file or a `sightline probe` run folder (its class-mean
directions.safetensors, or with --probe-weights its probe's weight directions).

The job (`sightline sae explain-direction`) writes (docs/outputs.md; under OUT.partial, renamed into place):

    OUT/config.json           the ExplainDirectionConfig it ran with
    OUT/results.json          summary; per direction: the cosine curve, the random curve (mean, std, min, max),
                              the latents chosen in order with their coefficients and feature-page links
    OUT/figures/<name>.png    cosine against the number of latents, the direction beside random directions
    OUT/index.html            the table of directions and latents, the figures

This module reads the store's pooled features and probe files through `sightline.probes` (its public
functions); `sightline.probes` knows nothing of SAEs.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sightline.config import ConfigIO, to_dict
from sightline.errors import UserError
from sightline.report.files import (
    RunFolder,
    RunResult,
    check_output,
    to_jsonable,
    write_json,
)

COSINE_LEVELS = (0.5, 0.7, 0.8, 0.9)  # the latents needed to reach each are reported


@dataclass(frozen=True)
class ExplainDirectionConfig(ConfigIO):
    """Everything `sightline sae explain-direction` depends on (saved as OUT/config.json)."""

    sae: str
    """An SAE folder (cfg.json + sae_weights.safetensors), e.g. a `sae train` run's topk-w1024-k32/."""
    store: str | None = None
    """ActivationStore at the SAE's site: class means of the mean-pooled image tokens give the directions."""
    label: str = "label"
    """Class of each store example: a field, a key of its JSONL meta or a dotted path (facts.objects.0.shape)."""
    classes: tuple[str, ...] = ()
    """Directions to explain: CLASS (its class mean minus the mean over classes) or SRC:TGT (the steering
    vector mu_TGT - mu_SRC); empty: every class."""
    directions: str | None = None
    """Instead of --store: a directions .safetensors ('{site}/{class}' vectors) or a `sightline probe` run folder."""
    probe_weights: bool = False
    """With --directions a probe run folder: its probe's weight directions instead of its class means."""
    max_latents: int = 100
    """Latents chosen at most (the curve runs to min(this, the SAE's latents, d))."""
    n_random: int = 8
    """Random directions (seeds seed..seed+n_random-1) for the baseline curve."""
    seed: int = 0
    """First seed of the random directions."""
    features: str | None = None
    """A `sightline sae analyze` run folder: latents shown on its feature page are linked there."""
    out: str = "sae-directions"
    """Output folder (config.json, results.json, figures/, index.html)."""
    overwrite: bool = False
    """Replace an existing output folder."""
    progress: bool = True
    """Show progress bars."""



# ----------------------------------------------------------------------------------------------- OMP
@dataclass
class OMPPath:
    """What orthogonal matching pursuit found for one target: latents in the order chosen, and per step t
    (1..len(latents)) the cosine reached and the coefficients of the t-term fit."""

    latents: list[int]
    cosine: list[float]  # [t]: cosine of the target with its t-term approximation
    coefs: list[list[float]]  # [t]: the t coefficients (in the order of `latents`) of the t-term fit

    def coef_at(self, n: int) -> list[float]:
        """Coefficients of the n-term fit (n clipped to the steps taken)."""
        return self.coefs[min(n, len(self.coefs)) - 1] if self.coefs else []


def unit_dictionary(w_dec_wd: torch.Tensor) -> torch.Tensor:
    """Decoder directions scaled to unit norm, float64 [w, d] (dead all-zero rows stay zero)."""
    d = w_dec_wd.detach().double().cpu()
    return d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)


def omp(dictionary_wd: torch.Tensor, target_d: torch.Tensor, n_nonzero: int) -> OMPPath:
    """Orthogonal matching pursuit of `target_d` over the rows of `dictionary_wd` (unit norm assumed), up to
    `n_nonzero` latents (see the module docstring). Stops early, as scikit-learn does, when the residual is
    (numerically) zero or the best latent is already chosen (linear dependence)."""
    D = torch.as_tensor(dictionary_wd).double()
    y = torch.as_tensor(target_d).double().reshape(-1)
    if D.dim() != 2 or D.shape[1] != y.numel():
        raise ValueError(f"dictionary {tuple(D.shape)} and target {tuple(y.shape)} do not match")
    y_sq = float(y @ y)
    if not y_sq > 0:
        raise UserError("the direction to explain is zero; choose two classes whose means differ")
    n_max = min(int(n_nonzero), D.shape[0], D.shape[1])
    chosen: list[int] = []
    cos, coefs = [], []
    r = y.clone()
    eps = float(torch.finfo(torch.float64).eps)
    for _ in range(n_max):
        corr = D @ r
        j = int(corr.abs().argmax())
        if j in chosen or float(corr[j]) ** 2 < eps * y_sq:
            break
        chosen.append(j)
        A = D[chosen].T  # [d, t]
        c = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
        r = y - A @ c
        cos.append(float(np.sqrt(max(0.0, 1.0 - float(r @ r) / y_sq))))
        coefs.append(c.tolist())
    return OMPPath(chosen, cos, coefs)


def latents_needed(cosine: list[float], level: float) -> int | None:
    """The fewest latents whose approximation reaches cosine >= level (None: not within the curve)."""
    for t, c in enumerate(cosine, 1):
        if c >= level:
            return t
    return None


def random_curves(dictionary_wd: torch.Tensor, norm: float, n_nonzero: int, seeds) -> np.ndarray:
    """Cosine curves [len(seeds), n] of isotropic Gaussian directions of the given norm (one per seed),
    padded with each curve's last value where OMP stopped early."""
    d = dictionary_wd.shape[1]
    n = min(int(n_nonzero), dictionary_wd.shape[0], d)
    out = np.zeros((len(seeds), n))
    for i, s in enumerate(seeds):
        v = torch.randn(d, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
        c = omp(dictionary_wd, v / v.norm() * norm, n).cosine
        out[i, : len(c)] = c
        out[i, len(c):] = c[-1] if c else 0.0
    return out


def explain_direction(sae, v_d: torch.Tensor, max_latents: int = 100, n_random: int = 8,
                      seed: int = 0, random: np.ndarray | None = None) -> dict[str, Any]:
    """One direction in an SAE's basis: its OMP curve beside random directions of the same norm.

    Returns {norm, n_max, cosine [t], latents [{rank, latent, coef, cosine}] (coefficients of the full
    fit), random {mean, std, min, max, seeds}, needed {level: latents}, random_needed {level: mean over
    seeds}, cosine_at {n: cosine}, random_cosine_at {n: mean}}. `random`: the random curves
    (`random_curves` with seeds seed..seed+n_random-1) when already computed: a cosine does not depend on
    the norm, so one set serves every direction of an SAE."""
    D = unit_dictionary(sae.W_dec)
    v = torch.as_tensor(v_d).double().reshape(-1)
    if v.numel() != D.shape[1]:
        raise UserError(f"direction of size {v.numel()} does not match the SAE's d_in {D.shape[1]}; "
                        "give directions from the SAE's own site")
    path = omp(D, v, max_latents)
    n_max = min(int(max_latents), D.shape[0], D.shape[1])
    seeds = list(range(seed, seed + n_random))
    if random is None:
        random = random_curves(D, float(v.norm()), n_max, seeds) if n_random else np.zeros((0, n_max))
    rand = random
    full = path.coef_at(len(path.latents))
    cosine = path.cosine + [path.cosine[-1]] * (n_max - len(path.cosine)) if path.cosine else [0.0] * n_max
    marks = sorted({n for n in (1, 2, 5, 10, 20, 50, 80, 100) if n <= n_max} | {n_max})
    rnd = {"mean": rand.mean(0).tolist(), "std": rand.std(0).tolist(), "min": rand.min(0).tolist(),
           "max": rand.max(0).tolist(), "seeds": seeds} if len(rand) else None
    return {
        "norm": float(v.norm()), "n_max": n_max, "cosine": cosine,
        "latents": [{"rank": i + 1, "latent": j, "coef": full[i], "cosine": path.cosine[i]}
                    for i, j in enumerate(path.latents)],
        "random": rnd,
        "needed": {str(c): latents_needed(cosine, c) for c in COSINE_LEVELS},
        "random_needed": ({str(c): _mean_needed(rand, c) for c in COSINE_LEVELS} if len(rand) else None),
        "cosine_at": {str(n): cosine[n - 1] for n in marks},
        "random_cosine_at": ({str(n): float(rand[:, n - 1].mean()) for n in marks} if len(rand) else None),
    }


def _mean_needed(rand: np.ndarray, level: float) -> float | None:
    """Mean over random directions of the latents needed to reach `level` (None if some never do)."""
    got = [latents_needed(list(r), level) for r in rand]
    return None if any(g is None for g in got) else float(np.mean(got))


# ---------------------------------------------------------------------------------------- directions
def _parse_wanted(classes: tuple[str, ...]) -> list[tuple[str | None, str]]:
    out = []
    for c in classes:
        c = c.strip()
        if not c:
            continue
        if ":" in c:
            src, tgt = (p.strip() for p in c.split(":", 1))
            if not src or not tgt:
                raise UserError(f"bad direction {c!r}: use CLASS or SRC:TGT, e.g. circle or circle:star")
            out.append((src, tgt))
        else:
            out.append((None, c))
    return out


def class_directions_from_store(store, site: str, label: str) -> dict[str, torch.Tensor]:
    """{class: mu_class - mean over classes} of the mean-pooled image tokens at `site` (as `sightline steer` and
    `sightline probe` make them), every labelled example of the store."""
    from sightline.probes.directions import class_mean_directions
    from sightline.probes.features import pool_features, resolve_labels

    labels = resolve_labels(store.examples, label)
    ids = [e["example"] for e, v in zip(store.examples, labels) if v is not None]
    feats = pool_features(store, [site], ids, "mean", "image")
    by_id = {e["example"]: v for e, v in zip(store.examples, labels)}
    row_labels = [by_id[int(i)] for i in feats.example_ids]
    classes = sorted(set(row_labels))
    if len(classes) < 2:
        raise UserError(f"label {label!r} takes {len(classes)} value(s) in store {store.path}; class directions "
                        "need at least two classes")
    code = {c: i for i, c in enumerate(classes)}
    return class_mean_directions(feats.acts[site], [code[v] for v in row_labels], classes)


def class_directions_from_file(path: str, site: str, probe_weights: bool = False) -> dict[str, torch.Tensor]:
    """{class: direction} at `site` from a directions file or a probe run folder (its probe's weight
    directions with `probe_weights`)."""
    if probe_weights:
        from sightline.probes.directions import probe_directions
        from sightline.probes.linear import load_probes

        probes = load_probes(path)
        if site not in probes:
            raise UserError(f"the probes in {path} have no probe at {site} (they have {', '.join(probes)}); "
                            "probe the SAE's site")
        return probe_directions(probes[site])
    from sightline.probes.directions import load_directions

    by_site, _ = load_directions(path)
    if site not in by_site:
        raise UserError(f"directions {path} hold nothing at {site} (sites: {', '.join(by_site)}); give directions "
                        "from the SAE's site")
    return {c: v.float() for c, v in by_site[site].items()}


def select_directions(dirs: dict[str, torch.Tensor], classes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """{name: vector} of the directions asked for: CLASS -> dirs[CLASS], SRC:TGT -> dirs[TGT] - dirs[SRC];
    every class when none is asked for."""
    wanted = _parse_wanted(classes) or [(None, c) for c in sorted(dirs)]
    out = {}
    for src, tgt in wanted:
        for c in (src, tgt):
            if c is not None and c not in dirs:
                raise UserError(f"no direction for class {c!r}; classes: {', '.join(sorted(dirs))}")
        name = tgt if src is None else f"{src}:{tgt}"
        out[name] = dirs[tgt].double() - (dirs[src].double() if src is not None else 0.0)
    return out


# ---------------------------------------------------------------------------------------- feature pages
def feature_page(analysis: str | Path | None, sae_path: str | Path, site: str) -> tuple[Path, set[int]] | None:
    """The `sae analyze` feature page of this SAE (matched by its folder name, else by its site) and the
    latents shown on it; None when there is none."""
    if analysis is None:
        return None
    root = Path(analysis).expanduser()
    if not (root / "results.json").is_file():
        raise UserError(f"{root} is not a `sightline sae analyze` run folder (no results.json); pass one to --features")
    from sightline.report.files import read_json

    saes = (read_json(root / "results.json").get("metrics") or {}).get("saes") or {}
    name = Path(sae_path).name
    match = [n for n, r in saes.items() if (r.get("sae") or {}).get("name") == name and r.get("site") == site]
    match = match or [n for n, r in saes.items() if r.get("site") == site]
    if not match:
        return None
    page = root / match[0] / "features.html"
    if not page.is_file():
        return None
    shown = {int(j) for j in re.findall(r"id='latent(\d+)'", page.read_text(encoding="utf-8"))}
    return page, shown


# ---------------------------------------------------------------------------------------------- job
def explain_directions(config: ExplainDirectionConfig) -> RunResult:
    """Explain class directions in an SAE's basis (see the module docstring); writes the run folder config.out."""
    from sightline.report.sae import plot_direction_omp
    from sightline.sae.models import SAE

    if config.max_latents < 1 or config.n_random < 0:
        raise UserError("--max-latents must be at least 1 and --n-random at least 0")
    if config.store is None and config.directions is None:
        raise UserError("give --store (class means of its image tokens) or --directions (a directions file or "
                        "probe run folder)")
    t0 = time.time()
    sae = SAE.from_pretrained(config.sae).eval()
    site = sae.cfg.site
    if config.directions is not None:
        if not site:
            raise UserError(f"the SAE at {config.sae} names no site; directions are looked up by site")
        dirs = class_directions_from_file(config.directions, site, config.probe_weights)
        source = f"{'probe weights' if config.probe_weights else 'directions'} from {config.directions}"
    else:
        from sightline.sae.features import check_sae_store
        from sightline.store import ActivationStore

        store = ActivationStore.open(config.store)
        site = check_sae_store(sae, store)
        dirs = class_directions_from_store(store, site, config.label)
        source = (f"class means of the mean-pooled image tokens of store {config.store}, label {config.label}")
    chosen = select_directions(dirs, config.classes)
    out = check_output(Path(config.out).expanduser(), config.overwrite, UserError)
    page = feature_page(config.features, config.sae, site)
    seeds = list(range(config.seed, config.seed + config.n_random))
    n_max = min(config.max_latents, *sae.W_dec.shape)
    rand = random_curves(unit_dictionary(sae.W_dec), 1.0, n_max, seeds)
    results: dict[str, dict] = {}
    with RunFolder(out, overwrite=config.overwrite) as tmp:
        write_json(tmp / "config.json", to_dict(config))
        for name, v in chosen.items():
            r = explain_direction(sae, v, config.max_latents, config.n_random, config.seed, rand)
            for e in r["latents"]:  # relative to OUT, as the page links it
                e["page"] = (f"{os.path.relpath(page[0].resolve(), out.resolve())}#latent{e['latent']}"
                             if page is not None and e["latent"] in page[1] else None)
            fig = f"figures/{_file_name(name)}.png"
            plot_direction_omp(r, tmp / fig,
                               title=f"{name} at {site}: OMP over {sae.W_dec.shape[0]} decoder directions")
            r["figure"] = fig
            results[name] = r
        summary = to_jsonable({
            "out": str(out), "html": str(out / "index.html"), "sae": str(config.sae), "site": site,
            "n_latents": int(sae.W_dec.shape[0]), "d": int(sae.W_dec.shape[1]), "source": source,
            "seconds": round(time.time() - t0, 2),
            "directions": {n: {"cosine_at": r["cosine_at"], "random_cosine_at": r["random_cosine_at"],
                               "needed": r["needed"], "random_needed": r["random_needed"],
                               "top_latents": [e["latent"] for e in r["latents"][:10]], "figure": r["figure"]}
                           for n, r in results.items()},
            "warnings": [],
        })
        write_json(tmp / "results.json", {
            "summary": summary,
            "method": "orthogonal matching pursuit over the SAE's decoder directions scaled to unit norm; cosine "
                      "of the direction with its t-term least-squares approximation; coefficients in the "
                      "direction's units per unit decoder direction (see sightline.sae.directions)",
            "directions": to_jsonable(results)})
        _write_index(tmp, summary, results, config)
    return RunResult(out, summary)


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name.replace(":", "-to-")) or "direction"


def _write_index(tmp: Path, summary: dict, results: dict[str, dict], cfg: ExplainDirectionConfig) -> None:
    from sightline.report.html import Link, Section, write_page

    rows = []
    for name, r in results.items():
        ca, rca = r["cosine_at"], r["random_cosine_at"] or {}
        n20 = "20" if "20" in ca else str(r["n_max"])
        rows.append([name, r["needed"].get("0.7"), (r["random_needed"] or {}).get("0.7"), ca[n20], rca.get(n20),
                     ca[str(r["n_max"])], rca.get(str(r["n_max"]))])
    found = (f"{len(results)} direction(s) at {summary['site']} ({summary['source']}) approximated by the decoder "
             f"directions of {summary['n_latents']} latents (d = {summary['d']}), beside {cfg.n_random} random "
             "directions of the same norm.")
    sections = [Section("What this run found", found, tables=[(
        "latents needed and cosine reached (random: mean over seeds)",
        ["direction", "latents for cos 0.7", "random: latents for 0.7", "cos at 20 latents", "random at 20",
         "cos at the cap", "random at the cap"], rows)])]
    for name, r in results.items():
        lrows = [[e["rank"], Link(e["page"], str(e["latent"])) if e.get("page") else e["latent"], e["coef"],
                  e["cosine"]] for e in r["latents"][:30]]
        sections.append(Section(
            f"Direction {name}", images=[(r["figure"], f"{name}: cosine against latents used")],
            tables=[(("latents in the order chosen (linked to their feature page where it shows them); coefficients "
                      "of the full fit"), ["rank", "latent", "coefficient", "cosine after it"], lrows)]))
    sections.append(Section("Files", links=[("results.json", "results.json"), ("config.json", "config.json")]))
    write_page(tmp / "index.html", "Directions in the SAE basis", f"SAE {cfg.sae}", sections)


"""Sparse probes over SAE latents: per class, a logistic probe that may read only k latents (an L0 constraint),
against k, beside the dense probe on the raw residual of the same layer.

Features: per example, the SAE's latents averaged over the example's image tokens (the latents of each token,
then the mean, as the dense probe averages the residual over the same tokens). Labels and the split are those
of `sightline probe`: rows of one image share a split, stratified by class, seeded.

The k-sparse probe of class c (one against the rest), for each k of --k:
  1. selection (training split only): every latent j is scored by its class separation
     |mean_c(f_j) - mean_rest(f_j)| / sqrt((var_c(f_j) + var_rest(f_j)) / 2) (Cohen's d; 0 for a latent
     constant on both), and the k latents with the largest score are kept (ties: lower index first);
  2. a binary logistic probe (sightline.probes.LogisticProbe: standardised features, L2 chosen on the
     validation split) on those k latents alone.
The class read for an image is the argmax over classes of the binary probes' logit margins, so the multiclass
top-1 uses at most k latents per class (k * n_classes in all). This is k-sparse selection by a univariate
rule (Gurnee et al. 2023's "mean difference" family) rather than Line of Sight's Hard-Concrete L0 gates:
deterministic, no annealing schedule, and the same latents at every seed. Beside it: the dense multinomial
probe on the pooled residual of the SAE's site (what `sightline probe` fits) and a dense probe on every
latent.

The job (`sightline sae sparse-probe`) writes (docs/outputs.md; under OUT.partial, renamed into place):

    OUT/config.json                the SparseProbeConfig it ran with
    OUT/results.json               summary; per k: top-1, balanced accuracy, per class its latents (in order),
                                   their scores and coefficients, its binary balanced accuracy; the dense probes
    OUT/figures/accuracy_vs_k.png  held-out top-1 against k, the dense probes and chance beside it
    OUT/index.html                 the curve, and which latents carry each class

This module reads labels, pooled features and the estimator through `sightline.probes` (its public
functions); `sightline.probes` knows nothing of SAEs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sightline.config import ConfigIO, to_dict
from sightline.errors import UserError
from sightline.probes.linear import DEFAULT_L2_GRID
from sightline.report.files import (
    RunFolder,
    RunResult,
    check_output,
    to_jsonable,
    write_json,
)


@dataclass(frozen=True)
class SparseProbeConfig(ConfigIO):
    """Everything `sightline sae sparse-probe` depends on (saved as OUT/config.json)."""

    sae: str
    """An SAE folder (cfg.json + sae_weights.safetensors), e.g. a `sae train` run's topk-w1024-k32/."""
    store: str
    """ActivationStore holding the SAE's site over image tokens."""
    label: str = "label"
    """What to decode: an example field, a key of its JSONL meta, or a dotted path (facts.objects.0.shape)."""
    ks: tuple[int, ...] = field(default=(1, 2, 4, 8, 16, 32), metadata={"flags": ("--k", "--ks")})
    """Latents per class the sparse probes may read (each capped at the SAE's width)."""
    where: str | None = None
    """Keep only examples whose fields match, e.g. qtype=shape."""
    val_frac: float = 0.2
    """Share of images held out to choose L2."""
    test_frac: float = 0.2
    """Share of images held out to score the probes."""
    seed: int = 0
    """Seed of the split."""
    l2_grid: tuple[float, ...] = field(default=DEFAULT_L2_GRID, metadata={"flags": ("--l2", "--l2-grid")})
    """Mean-loss L2 strengths tried on the validation split (as `sightline probe`)."""
    max_iter: int = 500
    """Optimiser iterations per probe at most."""
    batch_size: int = 4096
    """Stored tokens encoded per SAE batch."""
    out: str = "sae-sparse-probe"
    """Output folder (config.json, results.json, figures/, index.html)."""
    overwrite: bool = False
    """Replace an existing output folder."""
    progress: bool = True
    """Show progress bars."""



# ------------------------------------------------------------------------------------------ features
@torch.no_grad()
def pooled_latents(sae, store, site: str, example_ids, batch_size: int = 4096) -> torch.Tensor:
    """[n, width] float32: per example (in the order of `example_ids`), the SAE's latents averaged over its
    image tokens, streaming the store once."""
    from sightline.sae.features import sae_device

    ids = np.asarray(example_ids, dtype=np.int64)
    row_of = np.full(int(max(ids.max(), store.index["example"].max())) + 1, -1, dtype=np.int64)
    row_of[ids] = np.arange(len(ids))
    dev = sae_device(sae)
    acc = torch.zeros(len(ids), sae.W_dec.shape[0], dtype=torch.float64)
    count = torch.zeros(len(ids), dtype=torch.float64)
    for b in store.iter_batches([site], batch_size=batch_size, modality="image"):
        rows = row_of[b["index"]["example"]]
        keep = rows >= 0
        if not keep.any():
            continue
        x = b[site][torch.from_numpy(np.flatnonzero(keep))].to(device=dev, dtype=torch.float32)
        r = torch.from_numpy(rows[keep])
        acc.index_add_(0, r, sae.encode(x).double().cpu())
        count.index_add_(0, r, torch.ones(len(r), dtype=torch.float64))
    if bool((count == 0).any()):
        bad = int(ids[int(torch.nonzero(count == 0)[0])])
        raise UserError(f"example {bad} has no image tokens at {site} in store {store.path}; extract with "
                        "--positions image (or all)")
    return (acc / count[:, None]).float()


def separation_scores(f_nw: torch.Tensor, y: np.ndarray, n_classes: int) -> torch.Tensor:
    """[n_classes, width] |mean_c - mean_rest| / sqrt((var_c + var_rest) / 2) per class and latent (population
    variances; 0 where both are constant)."""
    f = torch.as_tensor(f_nw).double()
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.long)
    out = torch.zeros(n_classes, f.shape[1], dtype=torch.float64)
    for c in range(n_classes):
        pos, neg = f[y_t == c], f[y_t != c]
        if not len(pos) or not len(neg):
            continue
        diff = (pos.mean(0) - neg.mean(0)).abs()
        sd = ((pos.var(0, unbiased=False) + neg.var(0, unbiased=False)) / 2).sqrt()
        score = torch.where(sd > 0, diff / sd.clamp_min(1e-300), torch.zeros_like(diff))
        out[c] = torch.where((sd == 0) & (diff > 0), torch.full_like(diff, float("inf")), score)
    return out


def top_latents(scores_cw: torch.Tensor, k: int) -> torch.Tensor:
    """[n_classes, k] latents with the largest scores per class, best first (ties: lower index first)."""
    order = torch.sort(-scores_cw, dim=1, stable=True).indices
    return order[:, :k]


def fit_sparse(f_nw: torch.Tensor, y: np.ndarray, n_classes: int, train: np.ndarray, val: np.ndarray,
               test: np.ndarray, k: int, scores_cw: torch.Tensor, l2_grid=DEFAULT_L2_GRID, seed: int = 0,
               max_iter: int = 500) -> dict[str, Any]:
    """The k-sparse one-against-the-rest probes of every class (see the module docstring) and their test scores:
    {k, top1, balanced, latents [C][k], scores [C][k], coef [C][k] (standardised units), l2 [C],
    binary_balanced [C], margins_test [n_test, C]}."""
    from sightline.probes.linear import LogisticProbe
    from sightline.probes.metrics import per_class_accuracy

    sel = top_latents(scores_cw, k)  # [C, k]
    x = torch.stack([f_nw[:, sel[c]] for c in range(n_classes)])  # [C, n, k]
    y_bin = np.stack([(np.asarray(y) == c).astype(np.int64) for c in range(n_classes)])  # [C, n]
    tr, va, te = (torch.from_numpy(i) for i in (train, val, test))
    est = LogisticProbe(l2_grid=l2_grid, seed=seed, max_iter=max_iter, device="cpu")
    est.fit(x[:, tr], y_bin[:, train], x[:, va] if len(val) else None, y_bin[:, val] if len(val) else None,
            n_classes=2)
    logits = est.decision_function(x[:, te])  # [T = C label sets, B = C feature sets, n, 2]
    diag = torch.arange(n_classes)
    margins = (logits[diag, diag, :, 1] - logits[diag, diag, :, 0]).T.cpu()  # [n_test, C]
    pred = margins.argmax(1).numpy()
    y_te = np.asarray(y)[test]
    binary = []
    for c in range(n_classes):
        yb = (y_te == c).astype(np.int64)
        pb = (margins[:, c] > 0).numpy().astype(np.int64)
        binary.append(float(np.nanmean(per_class_accuracy(pb, yb, 2))))
    probes = [est.probe(c, c) for c in range(n_classes)]
    coef = [(p.weight[1] - p.weight[0]).tolist() for p in probes]  # the margin's weights, standardised units
    pc = per_class_accuracy(pred, y_te, n_classes)
    return {"k": int(k), "top1": float((pred == y_te).mean()) if len(y_te) else float("nan"),
            "balanced": float(np.nanmean(pc)), "latents": sel.tolist(),
            "scores": [[float(scores_cw[c, j]) for j in sel[c]] for c in range(n_classes)],
            "coef": coef, "l2": [p.l2 for p in probes],
            "binary_balanced": binary, "margins_test": margins}


def fit_dense(x_nd: torch.Tensor, y: np.ndarray, n_classes: int, train: np.ndarray, val: np.ndarray,
              test: np.ndarray, l2_grid=DEFAULT_L2_GRID, seed: int = 0, max_iter: int = 500) -> dict[str, float]:
    """The dense multinomial probe (as `sightline probe` fits it) on features x: {top1, balanced, l2} on test."""
    from sightline.probes.linear import LogisticProbe
    from sightline.probes.metrics import per_class_accuracy

    tr, va, te = (torch.from_numpy(i) for i in (train, val, test))
    est = LogisticProbe(l2_grid=l2_grid, seed=seed, max_iter=max_iter, device="cpu")
    est.fit(x_nd[tr], y[train], x_nd[va] if len(val) else None, y[val] if len(val) else None, n_classes=n_classes)
    pred = est.predict(x_nd[te]).cpu().numpy()
    y_te = y[test]
    balanced = float(np.nanmean(per_class_accuracy(pred, y_te, n_classes)))
    return {"top1": float((pred == y_te).mean()), "balanced": balanced, "l2": float(est.l2_)}


# ----------------------------------------------------------------------------------------------- job
def run_sparse_probes(config: SparseProbeConfig) -> RunResult:
    """Fit k-sparse probes over an SAE's latents and the dense probes beside them (see the module docstring);
    writes the run folder config.out."""
    from sightline.probes.features import pool_features, resolve_labels, select_examples
    from sightline.probes.linear import stratified_split
    from sightline.probes.metrics import chance_levels
    from sightline.report.sae import plot_sparse_probe
    from sightline.sae.features import check_sae_store
    from sightline.sae.models import SAE
    from sightline.store import ActivationStore

    if not config.ks or any(k < 1 for k in config.ks):
        raise UserError(f"--k must list whole numbers >= 1, got {list(config.ks)}")
    if not (0 < config.test_frac < 1 and 0 <= config.val_frac < 1 and config.val_frac + config.test_frac < 1):
        raise UserError("--test-frac must be in (0, 1), --val-frac in [0, 1), and their sum below 1")
    t0 = time.time()
    sae = SAE.from_pretrained(config.sae).eval()
    store = ActivationStore.open(config.store)
    site = check_sae_store(sae, store)
    out = check_output(Path(config.out).expanduser(), config.overwrite, UserError)
    examples = store.examples
    keep = select_examples(examples, config.where)
    labels = resolve_labels([examples[j] for j in keep], config.label)
    keep, labels = zip(*[(j, v) for j, v in zip(keep, labels) if v is not None]) if any(
        v is not None for v in labels) else ((), ())
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise UserError(f"label {config.label!r} takes {len(classes)} value(s) over the chosen examples of "
                        f"{store.path}; a probe needs at least two classes")
    ids = np.array([examples[j]["example"] for j in keep], dtype=np.int64)
    code = {c: i for i, c in enumerate(classes)}
    y = np.array([code[v] for v in labels], dtype=np.int64)
    paths = [examples[j].get("path", str(examples[j]["example"])) for j in keep]
    group_code = {p: i for i, p in enumerate(sorted(set(paths)))}
    groups = np.array([group_code[p] for p in paths], dtype=np.int64)
    val, test, train = stratified_split(y, [config.val_frac, config.test_frac], config.seed, groups)
    if not len(train) or not len(test):
        raise UserError(f"too few examples ({len(group_code)} images) to split into train/val/test; add examples "
                        "or lower --val-frac/--test-frac")

    feats = pool_features(store, [site], ids, "mean", "image", progress=config.progress)
    x_res = feats.acts[site]
    f = pooled_latents(sae, store, site, ids, config.batch_size)
    n_classes, width = len(classes), f.shape[1]
    scores = separation_scores(f[torch.from_numpy(train)], y[train], n_classes)
    ks = sorted({min(int(k), width) for k in config.ks})
    fit_kw = {"l2_grid": config.l2_grid, "seed": config.seed, "max_iter": config.max_iter}
    curve = []
    for k in ks:
        r = fit_sparse(f, y, n_classes, train, val, test, k, scores, **fit_kw)
        r.pop("margins_test")
        curve.append(r)
    dense = fit_dense(x_res, y, n_classes, train, val, test, **fit_kw)
    every = fit_dense(f, y, n_classes, train, val, test, **fit_kw)
    chance = chance_levels(y[train], y[test], n_classes)
    within = [c["k"] for c in curve if c["top1"] >= dense["top1"] - 0.05]
    per_class = {cls: [{"k": c["k"], "latents": c["latents"][i], "scores": c["scores"][i], "coef": c["coef"][i],
                        "binary_balanced": c["binary_balanced"][i]} for c in curve] for i, cls in enumerate(classes)}
    carriers = {cls: scores[i].argsort(descending=True)[:5].tolist() for i, cls in enumerate(classes)}
    summary = to_jsonable({
        "out": str(out), "html": str(out / "index.html"), "sae": str(config.sae), "site": site,
        "label": config.label, "classes": classes, "n_latents": width,
        "split_sizes": {"train": len(train), "val": len(val), "test": len(test)},
        "ks": ks, "top1": [c["top1"] for c in curve], "balanced": [c["balanced"] for c in curve],
        "dense_top1": dense["top1"], "all_latents_top1": every["top1"], "chance": chance,
        "smallest_k_within_5_points": within[0] if within else None,
        "top_latent_per_class": {cls: carriers[cls][0] for cls in classes},
        "seconds": round(time.time() - t0, 2), "warnings": [],
    })
    with RunFolder(out, overwrite=config.overwrite) as tmp:
        write_json(tmp / "config.json", to_dict(config))
        plot_sparse_probe(ks, summary["top1"], dense["top1"], tmp / "figures" / "accuracy_vs_k.png",
                          all_latents=every["top1"], chance=chance["uniform"],
                          title=f"{config.label} at {site}: k-sparse probes over {width} SAE latents")
        write_json(tmp / "results.json", {
            "summary": summary,
            "method": "per class, the k latents with the largest |mean_c - mean_rest| / pooled sd on the training "
                      "split, then a binary logistic probe on them (L2 chosen on validation); the class read is the "
                      "argmax of the binary margins (see sightline.sae.sparse_probe)",
            "curve": to_jsonable(curve), "dense": {"residual": dense, "all_latents": every},
            "per_class": to_jsonable(per_class), "top_latents_by_score": carriers,
            "splits": {name: sorted(int(i) for i in ids[idx]) for name, idx in
                       (("train", train), ("val", val), ("test", test))}})
        _write_index(tmp, summary, per_class, config)
    return RunResult(out, summary)


def _write_index(tmp: Path, summary: dict, per_class: dict, cfg: SparseProbeConfig) -> None:
    from sightline.report.html import Section, write_page

    ks = summary["ks"]
    within = summary["smallest_k_within_5_points"]
    found = (f"Reading {cfg.label} at {summary['site']} from the mean of the image tokens' SAE latents "
             f"({summary['n_latents']} latents): with k latents per class, held-out top-1 goes from "
             f"{summary['top1'][0]:.3f} (k = {ks[0]}) to {summary['top1'][-1]:.3f} (k = {ks[-1]}); the dense probe "
             f"on the residual reads {summary['dense_top1']:.3f}, one on every latent {summary['all_latents_top1']:.3f}"
             f", chance {summary['chance']['uniform']:.3f}. "
             + (f"k = {within} latents per class come within 5 points of the dense probe." if within is not None
                else "No k tried comes within 5 points of the dense probe."))
    rows = [[k, a, b] for k, a, b in zip(ks, summary["top1"], summary["balanced"])]
    k_show = within if within is not None else ks[-1]
    crow = []
    for cls, entries in per_class.items():
        e = next(x for x in entries if x["k"] == k_show)
        crow.append([cls, ", ".join(f"{j} ({s:.2f})" for j, s in zip(e["latents"], e["scores"])),
                     e["binary_balanced"]])
    write_page(tmp / "index.html", f"Sparse probes over SAE latents: {cfg.label}",
               f"SAE {cfg.sae}, store {cfg.store}", [
        Section("What this run found", found, images=[("figures/accuracy_vs_k.png", "held-out top-1 against k")],
                tables=[("held-out accuracy against latents per class", ["k", "top-1", "balanced"], rows)]),
        Section("Latents that carry each class",
                f"At k = {k_show}: each class's latents, best first, with their separation score (Cohen's d on the "
                "training split), and the binary probe's held-out balanced accuracy.",
                tables=[("", ["class", "latents (score)", "binary balanced accuracy"], crow)]),
        Section("Files", links=[("results.json", "results.json"), ("config.json", "config.json")]),
    ])

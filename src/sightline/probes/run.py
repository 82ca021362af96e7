"""A probe run: a label decoded from every chosen site of an ActivationStore, with metrics, a
control task, class-mean directions and a figure, written to one output folder."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sightline.config import from_dict, to_dict
from sightline.errors import UserError
from sightline.probes.linear import DEFAULT_L2_GRID
from sightline.report.files import RunFolder, RunResult, check_output, write_json

FILES = ("config.json", "results.json", "index.html", "figures/accuracy_vs_layer.png", "probes.safetensors",
         "directions.safetensors", "directions.json")


@dataclass(frozen=True)
class ProbeConfig:
    """Everything a probe run depends on; saved as OUT/config.json."""

    store: str = field(metadata={"positional": True})
    """ActivationStore folder to read the features from."""
    label: str = "label"
    """What to decode: an example field, a key of its JSONL meta, a dotted path (facts.objects.0.shape), or
    mask.<attr> (per token, from the synthetic world's masks)."""
    out: str = "probes"
    """Output folder (config.json, results.json, figures/, index.html, probes.safetensors, directions.*)."""
    sites: str = "all"
    """'all', site kinds (resid,keys,...) and/or exact sites (resid.3)."""
    layers: str = "all"
    """Layers of the kinds named in --sites: all, 0,4,8 or 4-12."""
    pooling: str = "mean"
    """How an example's tokens become one feature vector: mean, max, last, or token (one row per token)."""
    modality: str = "image"
    """Tokens pooled: image, or several, e.g. image,image_newline."""
    where: str | None = None
    """Keep only examples whose fields match, e.g. qtype=shape."""
    drop_classes: tuple[str, ...] = ()
    """Label values left out, e.g. background for mask.* token labels."""
    val_frac: float = 0.2
    """Share of images held out to choose L2."""
    test_frac: float = 0.2
    """Share of images held out to score the probes."""
    seed: int = 0
    """Seed of the split, the control labels and --max-per-class."""
    l2_grid: tuple[float, ...] = field(default=DEFAULT_L2_GRID, metadata={"flags": ("--l2", "--l2-grid")})
    """Mean-loss L2 strengths tried on the validation split; sklearn C = 1 / (l2 * n_train)."""
    control: bool = True
    """Fit the Hewitt & Liang control task too (--no-control skips it)."""
    max_iter: int = 500
    """Optimiser iterations per probe at most."""
    tol: float = 1e-4
    """Stop when the estimated objective gap <= tol * objective."""
    max_per_class: int | None = None
    """Keep at most this many examples per class (seeded); None: all."""
    min_cover: float = 0.5
    """mask.* labels: a token's label must cover this share of its pixel box."""
    allow_incomplete: bool = False
    """Probe an incomplete store (an interrupted extraction) instead of refusing; the run warns and records
    `incomplete` and the store's counts in results.json."""
    device: str = "auto"
    """Where the probes are fitted: auto (CUDA if available), cpu, cuda:0."""
    overwrite: bool = False
    """Replace an existing output folder."""
    progress: bool = True
    """Show progress bars."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field (sightline.config.to_dict)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeConfig:
        """The inverse of `to_dict` (a dict holding it under `config` works too)."""
        return from_dict(cls, data.get("config", data) if isinstance(data.get("config"), dict) else data)


def select_sites(store, sites: str | None = "all", layers: str | None = "all") -> list[str]:
    """The store's sites named by kinds (with `layers`) and/or exact names, in the store's order."""
    from sightline.capture.sites import KINDS, Site, parse_layers

    spec = "all" if sites is None else sites
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise UserError("no sites given; e.g. --sites resid or --sites resid.2,values.3")
    parsed = {}
    for s in store.sites:
        try:
            parsed[s] = Site.parse(s)
        except UserError:
            parsed[s] = None
    layer_ids = [p.layer for p in parsed.values() if p is not None and p.layer is not None]
    wanted_layers = None
    if layers not in (None, "", "all"):
        wanted_layers = set(parse_layers(layers, max(layer_ids, default=-1) + 1))
    chosen: set[str] = set()
    for item in items:
        if item == "all":
            chosen.update(s for s, p in parsed.items()
                          if wanted_layers is None or p is None or p.layer is None or p.layer in wanted_layers)
        elif item in KINDS:
            found = [s for s, p in parsed.items() if p is not None and p.kind == item
                     and (wanted_layers is None or p.layer is None or p.layer in wanted_layers)]
            if not found:
                at = f" at layers {layers}" if wanted_layers else ""
                raise UserError(f"store {store.path} has no {item} sites{at}; available: {', '.join(store.sites)}")
            chosen.update(found)
        elif item in store.site_shapes:
            chosen.add(item)
        else:
            raise UserError(f"site {item!r} is not in store {store.path}; available: {', '.join(store.sites)}")
    if not chosen:
        raise UserError(f"no site of store {store.path} matches --sites {spec} --layers {layers}")
    return [s for s in store.sites if s in chosen]


def _check(config: ProbeConfig) -> None:
    from sightline.probes.features import MASK_PREFIX, POOLINGS

    if config.pooling not in POOLINGS:
        raise UserError(f"unknown --pooling {config.pooling!r}: use one of {', '.join(POOLINGS)}")
    if config.label.startswith(MASK_PREFIX) and config.pooling != "token":
        raise UserError(f"label {config.label} is per token: use --pooling token")
    for name in ("val_frac", "test_frac"):
        v = getattr(config, name)
        if not 0 <= v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1), got {v}")
    if config.val_frac + config.test_frac >= 1:
        raise UserError("--val-frac + --test-frac must leave something to train on (sum < 1)")
    if not config.l2_grid or any((not np.isfinite(x)) or x < 0 for x in config.l2_grid):
        raise UserError(f"--l2 values must be non-negative numbers, got {list(config.l2_grid)}")
    if len(config.l2_grid) > 1 and config.val_frac == 0:
        raise UserError("choosing L2 from several values needs --val-frac > 0 (or give one --l2 value)")
    if config.max_per_class is not None and config.max_per_class < 1:
        raise UserError(f"--max-per-class must be at least 1, got {config.max_per_class}")
    if config.max_iter < 1:
        raise UserError(f"--max-iter must be at least 1, got {config.max_iter}")


def run_probes(config: ProbeConfig) -> RunResult:
    """Fit probes for `config.label` at every chosen site, write the run folder (docs/outputs.md), return
    its path and summary."""
    from sightline import __version__
    from sightline.probes.control import control_labels
    from sightline.probes.directions import save_directions
    from sightline.probes.features import (
        MASK_PREFIX,
        pool_features,
        resolve_labels,
        select_examples,
        synthetic_token_labels,
    )
    from sightline.probes.linear import one_thread_if_small, resolve_device, save_probes, stratified_split
    from sightline.probes.metrics import chance_levels
    from sightline.store import ActivationStore
    from sightline.store.completeness import require_complete

    t_start = time.perf_counter()
    _check(config)
    store = ActivationStore.open(config.store)
    store_state, warnings = require_complete(store, config.allow_incomplete)
    sites = select_sites(store, config.sites, config.layers)
    out = check_output(Path(config.out).expanduser(), config.overwrite, UserError)  # written only at the end

    # ---------------------------------------------------------------- examples and labels
    examples = store.examples
    keep = select_examples(examples, config.where)
    token_level = config.label.startswith(MASK_PREFIX)
    if token_level:
        ex_labels: list[str | None] = ["" for _ in examples]
    else:
        ex_labels = resolve_labels([examples[j] for j in keep], config.label)
        full = [None] * len(examples)
        for j, v in zip(keep, ex_labels):
            full[j] = v
        ex_labels = full
    keep = [j for j in keep if ex_labels[j] is not None]
    n_dropped = len(examples) - len(keep)
    if config.max_per_class is not None and not token_level:  # (mask.* labels: every image is kept)
        rng = np.random.default_rng(config.seed)
        by_class: dict[str, list[int]] = {}
        for j in keep:
            by_class.setdefault(ex_labels[j], []).append(j)
        keep = sorted(j for js in by_class.values()
                      for j in (js if len(js) <= config.max_per_class
                                else list(rng.choice(js, config.max_per_class, replace=False))))
    if not keep:
        raise UserError(f"no example of store {store.path} has label {config.label!r}"
                        + (f" among those matching --where {config.where}" if config.where else ""))
    ex_ids = np.array([examples[j]["example"] for j in keep], dtype=np.int64)

    feats = pool_features(store, sites, ex_ids, config.pooling, config.modality, progress=config.progress)
    path_of = {e["example"]: e.get("path", str(e["example"])) for e in examples}
    label_of = {examples[j]["example"]: ex_labels[j] for j in keep}
    if token_level:
        row_labels = synthetic_token_labels(store, feats.rows, config.label[len(MASK_PREFIX):], config.min_cover)
    else:
        row_labels = [label_of[int(i)] for i in feats.example_ids]
    dropped = set(config.drop_classes)
    ok = np.array([v is not None and v not in dropped for v in row_labels], dtype=bool)
    if not ok.all():
        feats.acts = {s: a[torch.from_numpy(ok)] for s, a in feats.acts.items()}
        feats.example_ids = feats.example_ids[ok]
        feats.rows = None if feats.rows is None else feats.rows[ok]
        row_labels = [v for v, k in zip(row_labels, ok) if k]
    classes = sorted(set(row_labels))
    if len(classes) < 2:
        raise UserError(f"label {config.label!r} takes {len(classes)} value(s) ({', '.join(classes)}) over the "
                        "chosen examples; a probe needs at least two classes")
    code = {c: i for i, c in enumerate(classes)}
    y = np.array([code[v] for v in row_labels], dtype=np.int64)
    # rows of one image (its tokens, or several questions about it) always share a split
    paths = sorted({path_of[int(i)] for i in feats.example_ids})
    group_code = {p: i for i, p in enumerate(paths)}
    groups = np.array([group_code[path_of[int(i)]] for i in feats.example_ids], dtype=np.int64)
    val, test, train = stratified_split(y, [config.val_frac, config.test_frac], config.seed, groups)
    if len(train) == 0 or (len(config.l2_grid) > 1 and len(val) == 0):
        raise UserError(f"too few examples ({len(np.unique(groups))} images) to split into train/val/test; "
                        "add examples or lower --val-frac/--test-frac")
    y_ctrl = control_labels(y, config.seed, None if token_level else groups)
    y_tasks = np.stack([y, y_ctrl]) if config.control else y[None]

    # ---------------------------------------------------------------- fit, per width
    by_dim: dict[int, list[str]] = {}
    for s in sites:
        by_dim.setdefault(int(feats.acts[s].shape[1]), []).append(s)
    work = sum(len(g) * len(train) * min(len(train), d) * len(y_tasks) * len(classes) for d, g in by_dim.items())
    with one_thread_if_small(resolve_device(config.device), work):
        probes, site_out, directions = _fit_groups(config, store, by_dim, feats, y, y_ctrl, y_tasks, classes,
                                                   train, val, test)

    # ---------------------------------------------------------------- write
    chance = chance_levels(y[train], y[test], len(classes))
    counts = {c: int(n) for c, n in zip(classes, np.bincount(y, minlength=len(classes)))}
    split_sizes = {"train": int(len(train)), "val": int(len(val)), "test": int(len(test))}
    best = max(sites, key=lambda s: (site_out[s]["test"]["top1"], site_out[s]["val_top1"] or 0))
    card = {
        "kind": "sightline linear probes",
        "sightline_version": __version__,
        "store": {"path": str(store.path), "model": store.manifest.get("model"),
                  "n_examples": len(store.examples)},
        "objective": "multinomial logistic regression on standardised features: mean cross-entropy + "
                     "l2/2 ||W||^2 (intercept unpenalised); sklearn C = 1/(l2 * n_train)",
        "features": f"{config.pooling} over {config.modality} tokens" if config.pooling != "token"
        else f"every {config.modality} token",
        "label": config.label,
        "classes": classes,
        "class_counts": counts,
        "n_rows": int(len(y)),
        "n_examples": int(len(np.unique(feats.example_ids))),
        "n_dropped_examples": int(n_dropped),
        "split_sizes": split_sizes,
        "split_by": "image (rows of one image share a split), stratified by class, seeded",
        "control_task": ("Hewitt & Liang: each " + ("token" if token_level else "image")
                         + " gets a random label with the task's class frequencies") if config.control else None,
        "chance": chance,
        "best_site": best,
        "sites": {s: {k: site_out[s][k] for k in ("dim", "shape", "l2", "sklearn_C")}
                  | {"test_top1": site_out[s]["test"]["top1"], "test_top5": site_out[s]["test"]["top5"],
                     "test_balanced": site_out[s]["test"]["balanced"], "train_top1": site_out[s]["train_top1"],
                     "control_test_top1": site_out[s].get("control", {}).get("test_top1"),
                     "selectivity": site_out[s].get("selectivity")}
                  for s in sites},
        "tensors": "probes.safetensors: '{site}.weight' [K, d] and '{site}.bias' [K] act on (x - '{site}.mean') / "
                   "'{site}.std'; classes in the order of 'classes'",
    }
    metrics = {"label": config.label, "classes": classes, "chance": chance, "split_sizes": split_sizes,
               "sites": site_out}
    split_ids = {name: sorted({int(i) for i in feats.example_ids[idx]}) for name, idx in
                 (("train", train), ("val", val), ("test", test))}

    best_m = site_out[best]
    seconds = time.perf_counter() - t_start
    card["seconds"] = round(seconds, 3)
    summary = {
        "out": str(out),
        "label": config.label,
        "pooling": config.pooling,
        "classes": classes,
        "n_rows": int(len(y)),
        "split_sizes": split_sizes,
        "chance": chance,
        "best_site": best,
        "best_top1": best_m["test"]["top1"],
        "best_top1_chance": max((v for v in chance.values() if v == v), default=None),
        "best_top5": best_m["test"]["top5"],
        "best_control_top1": best_m.get("control", {}).get("test_top1"),
        "best_selectivity": best_m.get("selectivity"),
        "sites": card["sites"],
        "files": [str(out / f) for f in FILES],
        "seconds": round(seconds, 3),
        "incomplete": store_state["incomplete"],
        "store_counts": {k: store_state[k] for k in ("n_planned", "n_written", "n_skipped", "n_missing")},
        "warnings": warnings,
    }
    from sightline.report.probes import plot_accuracy_vs_layer

    with RunFolder(out, overwrite=config.overwrite) as tmp:
        write_json(tmp / "config.json", to_dict(config))
        save_probes(tmp / "probes.safetensors", probes, {"label": config.label, "classes": classes})
        save_directions(tmp / "directions.safetensors", directions, {
            "method": "class_mean", "label": config.label, "classes": classes, "sites": sites,
            "made_from": f"training split ({len(train)} rows), {card['features']}",
            "definition": "dir[site/c] = mu_c - mean over classes of mu_c'; dir[t] - dir[s] = mu_t - mu_s"})
        plot_accuracy_vs_layer(metrics, tmp / "figures" / "accuracy_vs_layer.png",
                               title=f"{config.label} probes ({config.pooling} pooling)")
        write_json(tmp / "results.json", {"summary": summary, **card, "metrics": metrics,
                                          "splits": {"seed": config.seed, "examples": split_ids}})
        _write_page(tmp, config, summary, card)
    return RunResult(out, summary)


def _write_page(folder: Path, config: ProbeConfig, summary: dict, card: dict) -> None:
    """index.html of a probe run: what it found, accuracy per site, the figures."""
    import html

    from sightline.report.html import Section, figure_images, write_page

    sel = summary["best_selectivity"]
    found = (f"{config.label} ({len(summary['classes'])} classes, chance {summary['chance'].get('uniform', 0):.3g}) is "
             f"decoded best at {summary['best_site']}: held-out top-1 {summary['best_top1']:.3f}"
             + (f", control task {summary['best_control_top1']:.3f} (selectivity {sel:.3f})" if sel is not None else "")
             + f". Features: {card['features']}; {summary['n_rows']} rows split by image "
               f"({summary['split_sizes']['train']} train, {summary['split_sizes']['test']} test).")
    top5 = summary["best_top5"] is not None  # only with more than 5 classes
    rows = [(s, m["test_top1"], *([m["test_top5"]] if top5 else []), m["control_test_top1"], m["selectivity"],
             m["l2"]) for s, m in summary["sites"].items()]
    header = ["site", "top-1", *(["top-5"] if top5 else []), "control top-1", "selectivity", "L2"]
    keys = ("best_site", "best_top1", "best_top1_chance", *(("best_top5",) if top5 else ()), "best_control_top1",
            "best_selectivity")
    warn = ([Section("Warnings", html="".join(f"<p><b>Warning:</b> {html.escape(w)}</p>" for w in summary["warnings"]))]
            if summary["warnings"] else [])
    write_page(folder / "index.html", f"Linear probes: {config.label}", f"store {config.store}", warn + [
        Section("What this run found", found, figures={k: summary[k] for k in keys},
                images=[("figures/accuracy_vs_layer.png", "held-out accuracy against layer")]),
        Section("Accuracy per site", tables=[("held-out split", header, rows)]),
        Section("Figures", images=figure_images(folder)),
        Section("Files", links=[("results.json", "results.json"), ("config.json", "config.json"),
                                ("probes.safetensors", "probes.safetensors"),
                                ("directions.safetensors", "directions.safetensors")]),
    ])


def _fit_groups(config: ProbeConfig, store, by_dim: dict[int, list[str]], feats, y: np.ndarray, y_ctrl: np.ndarray,
                y_tasks: np.ndarray, classes: list[str], train: np.ndarray, val: np.ndarray, test: np.ndarray):
    """Fit the sites of each width together; per site the probe, its metrics and its class-mean directions."""
    from sightline.probes.directions import class_mean_directions
    from sightline.probes.linear import LogisticProbe
    from sightline.probes.metrics import selectivity, site_metrics, topk_accuracy

    probes, site_out = {}, {}
    directions: dict[str, dict[str, torch.Tensor]] = {}
    tr_t, va_t, te_t = (torch.from_numpy(i) for i in (train, val, test))
    for dim, group_sites in by_dim.items():
        x = torch.stack([feats.acts[s] for s in group_sites])  # [B, n, d]
        est = LogisticProbe(l2_grid=config.l2_grid, seed=config.seed, max_iter=config.max_iter, tol=config.tol,
                            device=config.device, progress=config.progress)
        est.fit(x[:, tr_t], y_tasks[:, train], x[:, va_t] if len(val) else None,
                y_tasks[:, val] if len(val) else None, n_classes=len(classes))
        for b, s in enumerate(group_sites):
            probe = est.probe(b, 0, classes)
            probes[s] = probe
            with torch.no_grad():
                logit = {name: probe.decision_function(x[b, idx]) for name, idx in
                         (("train", tr_t), ("val", va_t), ("test", te_t))}
            m = {"site": s, "dim": dim, "shape": list(store.shape(s)), "l2": probe.l2,
                 "sklearn_C": probe.meta["sklearn_C"],
                 "test": site_metrics(logit["test"], y[test], classes),
                 "train_top1": float(topk_accuracy(logit["train"], torch.from_numpy(y[train]))),
                 "val_top1": float(topk_accuracy(logit["val"], torch.from_numpy(y[val]))) if len(val) else None,
                 "l2_path": est.path(b, 0)}
            if config.control:
                cprobe = est.probe(b, 1, classes)
                with torch.no_grad():
                    c_test = cprobe.decision_function(x[b, te_t])
                    c_train = cprobe.decision_function(x[b, tr_t])
                m["control"] = {
                    "test_top1": float(topk_accuracy(c_test, torch.from_numpy(y_ctrl[test]))),
                    "train_top1": float(topk_accuracy(c_train, torch.from_numpy(y_ctrl[train]))),
                    "l2": cprobe.l2,
                }
                m["selectivity"] = selectivity(m["test"]["top1"], m["control"]["test_top1"])
            site_out[s] = m
            directions[s] = class_mean_directions(x[b, tr_t], y[train], classes)
        del x

    return probes, site_out, directions

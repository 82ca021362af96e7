"""A probe run: a label decoded from every chosen site of an ActivationStore, with metrics, a
control task, class-mean directions and a figure, written to one output folder."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sightline.errors import UserError
from sightline.probes.linear import DEFAULT_L2_GRID

FILES = ("probes.safetensors", "probes.json", "metrics.json", "splits.json", "accuracy_vs_layer.png",
         "directions.safetensors", "directions.json")


@dataclass(frozen=True)
class ProbeConfig:
    """Everything a probe run depends on; saved in probes.json."""

    store: str
    label: str = "label"  # an example field, a key of its JSONL meta, a dotted path, or mask.<attr> (per token)
    out: str = "probes"
    sites: str = "all"  # 'all', kinds (resid,keys,...) and/or exact sites (resid.3)
    layers: str = "all"  # layers of the kinds named in `sites`: all, 0,4,8 or 4-12
    pooling: str = "mean"  # mean | max | last | token
    modality: str = "image"  # tokens pooled: image, or e.g. image,image_newline
    where: str | None = None  # keep only examples with these fields, e.g. qtype=shape
    drop_classes: tuple[str, ...] = ()  # label values left out, e.g. ("background",) for mask.* token labels
    val_frac: float = 0.2
    test_frac: float = 0.2
    seed: int = 0
    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID  # mean-loss L2 strengths; sklearn C = 1 / (l2 * n_train)
    control: bool = True  # fit the Hewitt & Liang control task too
    max_iter: int = 500
    tol: float = 1e-4  # stop when the estimated objective gap <= tol * objective
    max_per_class: int | None = None  # keep at most this many examples per class (seeded)
    min_cover: float = 0.5  # mask.* labels: a token's label must cover this much of it
    device: str = "auto"
    overwrite: bool = False
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        d = dataclasses.asdict(self)
        d["l2_grid"] = list(self.l2_grid)
        d["drop_classes"] = list(self.drop_classes)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeConfig:
        """The inverse of `to_dict` (a probes.json card's `config` works too)."""
        data = data.get("config", data)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"unknown probe config field(s) {unknown}: use {sorted(names)}")
        values = dict(data)
        if "l2_grid" in values:
            values["l2_grid"] = tuple(float(x) for x in values["l2_grid"])
        if "drop_classes" in values:
            values["drop_classes"] = tuple(str(x) for x in values["drop_classes"])
        return cls(**values)


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


def _prepare_out(config: ProbeConfig) -> Path:
    out = Path(config.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a folder")
    if out.is_dir() and any((out / f).exists() for f in FILES) and not config.overwrite:
        raise UserError(f"{out} already holds a probe run; pass --overwrite or choose another --out")
    return out  # created only when the results are written


def _write_json(path: Path, data: Any) -> Path:
    """Write JSON to a temporary name next to `path`; returns that name (the caller renames it)."""
    from sightline.store.format import to_json

    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(to_json(data, indent=1) + "\n")
    return tmp


def run_probes(config: ProbeConfig) -> dict[str, Any]:
    """Fit probes for `config.label` at every chosen site, write the run folder, return a summary."""
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

    t_start = time.perf_counter()
    _check(config)
    store = ActivationStore.open(config.store)
    sites = select_sites(store, config.sites, config.layers)
    out = _prepare_out(config)

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
        "config": config.to_dict(),
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

    out.mkdir(parents=True, exist_ok=True)
    tmps: list[tuple[Path, Path]] = []
    pid = os.getpid()
    try:
        pt = out / f"probes.safetensors.tmp-{pid}"
        save_probes(pt, probes, {"label": config.label, "classes": classes})
        tmps.append((pt, out / "probes.safetensors"))
        tmps.append((_write_json(out / "metrics.json", metrics), out / "metrics.json"))
        tmps.append((_write_json(out / "splits.json", {"seed": config.seed, "examples": split_ids}),
                     out / "splits.json"))
        from sightline.report.probes import plot_accuracy_vs_layer

        fig_tmp = out / f"accuracy_vs_layer.tmp-{pid}.png"
        plot_accuracy_vs_layer(metrics, fig_tmp, title=f"{config.label} probes ({config.pooling} pooling)")
        tmps.append((fig_tmp, out / "accuracy_vs_layer.png"))
        d_tmp = out / f"directions.tmp-{pid}.safetensors"
        save_directions(d_tmp, directions, {
            "method": "class_mean", "label": config.label, "classes": classes, "sites": sites,
            "made_from": f"training split ({len(train)} rows), {card['features']}",
            "definition": "dir[site/c] = mu_c - mean over classes of mu_c'; dir[t] - dir[s] = mu_t - mu_s"})
        tmps.append((d_tmp, out / "directions.safetensors"))
        tmps.append((d_tmp.with_suffix(".json"), out / "directions.json"))
        seconds = time.perf_counter() - t_start
        card["seconds"] = round(seconds, 3)
        tmps.append((_write_json(out / "probes.json", card), out / "probes.json"))  # last: the run's commit
    except BaseException:  # nothing half-written: drop every temporary file
        for leftover in out.glob(f"*tmp-{pid}*"):
            leftover.unlink(missing_ok=True)
        raise
    for tmp, final in tmps:
        os.replace(tmp, final)

    best_m = site_out[best]
    return {
        "out": str(out),
        "label": config.label,
        "pooling": config.pooling,
        "classes": classes,
        "n_rows": int(len(y)),
        "split_sizes": split_sizes,
        "chance": chance,
        "best_site": best,
        "best_top1": best_m["test"]["top1"],
        "best_top5": best_m["test"]["top5"],
        "best_control_top1": best_m.get("control", {}).get("test_top1"),
        "best_selectivity": best_m.get("selectivity"),
        "sites": card["sites"],
        "files": [str(out / f) for f in FILES],
        "seconds": round(seconds, 3),
    }


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

"""The text-prefix study: how text placed before the image changes every perception readout, per layer.

Liu et al. (COLM 2025; PAPERS.md) find that a text prefix before the image changes the image VALUES and improves the
perception readouts read from them. `run_prefix(PrefixConfig(...))` scores the perception tasks
(`sightline.perception.run`, the same readouts and protocols) once per prefix kind, each unit with its own prefix:

    none        no prefix (the reference every other kind is compared with)
    neutral     one fixed sentence that says nothing about the image (`neutral`)
    task        what the task asks, one sentence per task (TASK_PREFIX)
    class       the unit's class name (fgseg / textseg / refseg / semcorr category, coseg set's category)
    expression  the unit's referring expression (refseg only)

`class` and `expression` are written through `template` ({text} is the name or the expression). A kind a task's
units cannot give (tempcorr has no class, only refseg has expressions) is skipped for that task, with a note. Every
kind reads the SAME units (one load per task) through the same readouts, so the change of a readout's statistic,
kind minus none, is paired per unit (an image for textseg / refseg, an episode, set, pair or clip otherwise); its 95%
interval is the percentile interval over `bootstrap` resamples of the units, each resample read by both kinds
(`paired_difference`). An empty prefix is no prefix: the features are the no-prefix ones bit for bit. Writes
OUT/{config.json, results.json, figures/, index.html} (docs/kv.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sightline.config import ConfigIO, to_dict
from sightline.errors import UserError
from sightline.report.files import RunFolder, RunResult, check_output, write_json

PREFIX_KINDS = ("none", "neutral", "task", "class", "expression")
TASK_PREFIX = {  # what each task asks, as a sentence placed before the image
    "fgseg": "Find the pixels of the object this image shares with the example images.",
    "coseg": "Find the object that all these images have in common.",
    "textseg": "Find the pixels that belong to the named class in this image.",
    "refseg": "Find the object that the description refers to in this image.",
    "semcorr": "Match the parts of this object to the same parts in another image.",
    "tempcorr": "Follow the objects of this video frame from one frame to the next.",
}


@dataclass(frozen=True)
class PrefixConfig(ConfigIO):
    """Everything a prefix study depends on (saved as OUT/config.json). The readouts' settings are the perception
    run's (`sightline perceive --help`), at their defaults unless given here."""

    model: str | None = None
    """Model folder or Hugging Face id; default: the shipped model organism."""
    task: str = "textseg,refseg"
    """Perception tasks: fgseg, coseg, textseg, refseg, semcorr, tempcorr, a comma list, or all."""
    data: str | None = None
    """Dataset root (the format's own layout); default: none (synthetic scenes made on the fly)."""
    format: str | None = None
    """Dataset format (see `sightline perceive --help`); default: synthetic without --data."""
    out: str = "prefix"
    """Output folder (config.json, results.json, figures/, index.html)."""
    kinds: tuple[str, ...] = PREFIX_KINDS
    """Prefix kinds: none (always read: the reference), neutral, task, class, expression."""
    neutral: str = "Here is a picture."
    """The neutral sentence."""
    template: str = "{text}"
    """How the class name and the referring expression are written as a prefix ({text} is replaced by them)."""
    reps: tuple[str, ...] = ("values",)
    """Representations (kinds values, keys, resid, projector or exact names like values.2.h1)."""
    layers: str = "all"
    """Language-model layers of values, keys, resid: all, 0,4,8 or 4-12."""
    heads: str = "concat"
    """KV heads of values and keys: concat (all heads together), all (that and every head), each, or a list 0,1."""
    query_prompt: str = "{text}"
    """Text after the image for textseg/refseg; {text} is the class name or referring expression."""
    prompt: str = ""
    """Text after the image for tasks without a text query."""
    synthetic_units: int = 20
    """Synthetic data: units made per task."""
    limit: int | None = None
    """Score at most this many units per task (after the calibration units)."""
    bootstrap: int = 1000
    """Paired bootstrap resamples of the units for the 95% intervals of the changes."""
    seed: int = 0
    """Seeds the data, the readouts and the bootstrap (the same for every kind: the comparison is paired)."""
    batch_size: int = 8
    """Images per forward."""
    model_dtype: str = "auto"
    """auto (bfloat16 on GPU, float32 on CPU), float32, float16 or bfloat16."""
    device: str = "auto"
    """auto (CUDA if available), cpu, cuda:0."""
    overwrite: bool = False
    """Replace an existing output folder."""
    progress: bool = True
    """Show progress bars."""


    def perceive_config(self):
        """The perception settings the readouts run with (no control, no example figures, no run-wide prefix)."""
        from sightline.perception.run import PerceiveConfig

        return PerceiveConfig(model=self.model, task=self.task, data=self.data, format=self.format, out=self.out,
                              reps=tuple(self.reps), layers=self.layers, heads=self.heads, query_prompt=self.query_prompt,
                              prompt=self.prompt, synthetic_units=self.synthetic_units, limit=self.limit,
                              bootstrap=self.bootstrap, seed=self.seed, batch_size=self.batch_size,
                              model_dtype=self.model_dtype, device=self.device, overwrite=self.overwrite,
                              progress=self.progress, control=False, n_examples=0, prefix=None)


def parse_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """`--kinds`: prefix kinds in PREFIX_KINDS order, none always first; UserError naming the kinds otherwise."""
    items = [k.strip() for x in kinds for k in str(x).split(",") if k.strip()]
    bad = [k for k in items if k not in PREFIX_KINDS]
    if bad:
        raise UserError(f"unknown prefix kind {bad[0]!r}; kinds are {', '.join(PREFIX_KINDS)}")
    if not [k for k in items if k != "none"]:
        raise UserError(f"--kinds needs a kind beside none to compare with it: {', '.join(PREFIX_KINDS[1:])}")
    return tuple(k for k in PREFIX_KINDS if k == "none" or k in items)


def unit_text(task: str, kind: str, unit: Any) -> str | None:
    """The class name or referring expression a unit gives for a prefix kind ("class", "expression"); None when it
    has none."""
    if kind == "expression":
        return (getattr(unit, "text", "") or None) if task == "refseg" else None
    if kind != "class":
        raise ValueError(f"kind {kind!r} takes no text from the unit")
    if task == "coseg":
        samples = getattr(unit, "samples", ())
        return (samples[0].category or None) if samples else None
    if task == "textseg":
        return getattr(unit, "category", "") or getattr(unit, "text", "") or None
    return getattr(unit, "category", "") or None


def prefix_text(task: str, kind: str, unit: Any, cfg: PrefixConfig) -> str | None:
    """A unit's prefix for `kind` ("" for none; None: the unit cannot give this kind)."""
    if kind == "none":
        return ""
    if kind == "neutral":
        return cfg.neutral
    if kind == "task":
        return TASK_PREFIX[task]
    text = unit_text(task, kind, unit)
    return None if text is None else cfg.template.replace("{text}", text)


def paired_difference(records_a, records_b, n_units: int, n_boot: int, seed: int
                      ) -> tuple[float, float | None, float | None]:
    """(statistic of a - statistic of b, 95% interval low, high) of a recorded statistic (`grouped_stat` records) read
    on the same units under two conditions: every bootstrap resample of the units is read by both (paired)."""
    from sightline.perception.run import bootstrap_weights, grouped_stat

    diff = float(grouped_stat(records_a, None)[0] - grouped_stat(records_b, None)[0])
    if n_boot <= 0 or n_units < 2:
        return diff, None, None
    width = max(n_units, 1 + max(r[0] for r in [*records_a, *records_b]))
    d = np.concatenate([grouped_stat(records_a, w) - grouped_stat(records_b, w)
                        for w in bootstrap_weights(n_units, n_boot, seed, width)])
    d = d[np.isfinite(d)]
    if not len(d):
        return diff, None, None
    lo, hi = np.percentile(d, [2.5, 97.5])
    return diff, float(lo), float(hi)


def _check(cfg: PrefixConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    from sightline.perception.run import check_config

    kinds = parse_kinds(cfg.kinds)
    if "{text}" not in cfg.template:
        raise UserError(f"--template {cfg.template!r} must contain {{text}} (where the class name or expression goes)")
    if cfg.bootstrap < 0:
        raise UserError(f"--bootstrap must be 0 or more, not {cfg.bootstrap}")
    return check_config(cfg.perceive_config()), kinds


def _load(pcfg, task: str):
    """The task's units, loaded once for every kind (all folds of pascal5i fgseg, as a perception run reads)."""
    from sightline.data.tasks import TaskData
    from sightline.perception.run import format_of, load_task_data

    folds = [pcfg.fold] if pcfg.fold is not None else (
        [0, 1, 2, 3] if format_of(pcfg, task) == "pascal5i" and task == "fgseg" else [0])
    datas = [load_task_data(pcfg, task, f) for f in folds]
    if len(datas) == 1:
        return datas[0]
    d = datas[0]
    return TaskData(task=d.task, format=d.format, source="; ".join(str(x.source) for x in datas),
                    units=[u for x in datas for u in x.units], calibration=[u for x in datas for u in x.calibration],
                    categories=d.categories, meta=d.meta)


def run_prefix(cfg: PrefixConfig, task_data: dict | None = None, adapter=None) -> RunResult:
    """Score the perception readouts once per prefix kind and write the paired changes (module docstring).

    `task_data`: task -> TaskData to score instead of loading (Python use, tests); `adapter`: the model already loaded."""
    import torch

    from sightline.models import load_model
    from sightline.perception.represent import Featurizer, parse_reps
    from sightline.perception.run import (
        METRICS,
        grouped_stat,
        primary_metric,
        resolve_model,
        score_task,
    )
    from sightline.runtime import resolve_placement

    tasks, kinds = _check(cfg)
    if task_data is not None:
        tasks = tuple(task_data)
    pcfg = cfg.perceive_config()
    out = check_output(cfg.out, cfg.overwrite, UserError)
    t0 = time.perf_counter()
    model_path, organism = resolve_model(pcfg)
    if adapter is None:
        device, dtype = resolve_placement(cfg.device, cfg.model_dtype, None)
        adapter = load_model(model_path, dtype=dtype, device=device, progress=cfg.progress)
    reps = parse_reps(list(cfg.reps), cfg.layers, cfg.heads, n_layers=adapter.n_layers, n_kv_heads=adapter.n_kv_heads,
                      n_vision_layers=adapter.n_vision_layers, kv_layers=getattr(adapter, "kv_layers", None))
    if any(r.kind in ("vision", "encoder") for r in reps):
        raise UserError("--reps: vision and encoder features come before the language model and no prefix can change "
                        "them; use values, keys, resid or projector")
    featurizer = Featurizer(adapter, reps, prompt=cfg.prompt, query_prompt=cfg.query_prompt,
                            batch_size=cfg.batch_size)
    rows: list[dict] = []
    summaries: dict[str, dict] = {}
    warnings: list[str] = []
    with RunFolder(out, overwrite=cfg.overwrite) as tmp:
        write_json(tmp / "config.json", to_dict(cfg))
        with torch.no_grad():
            for task in tasks:
                data = task_data[task] if task_data is not None else _load(pcfg, task)
                units = list(data.units) + list(getattr(data, "calibration", []) or [])
                scored: dict[str, tuple[dict, dict]] = {}
                skipped: dict[str, str] = {}
                examples: dict[str, str] = {}
                for kind in kinds:
                    texts = [prefix_text(task, kind, u, cfg) for u in units]
                    if any(t is None for t in texts):
                        skipped[kind] = ("only refseg units carry a referring expression" if kind == "expression"
                                         else f"{task} units carry no class name")
                        continue
                    examples[kind] = texts[0]
                    _, summ, recs = score_task(task, pcfg, featurizer, reps, data,
                                               prefix_of=lambda u, kind=kind, task=task: prefix_text(task, kind, u, cfg))
                    scored[kind] = (summ, recs)
                base_summary, base = scored["none"]
                n_units = base_summary["n_units"]
                primary = primary_metric(task, data.format)
                for kind, (summ, recs) in scored.items():
                    if kind == "none":
                        continue
                    for r in reps:
                        for metric in METRICS[task]:
                            a = recs.get(("model", r.name), {}).get(metric)
                            b = base.get(("model", r.name), {}).get(metric)
                            if not a or not b:
                                continue
                            change, lo, hi = paired_difference(a, b, n_units, cfg.bootstrap, cfg.seed)
                            rows.append({"task": task, "kind": kind, "rep": r.name, "rep_kind": r.kind,
                                         "layer": r.layer, "head": r.head, "metric": metric,
                                         "primary": metric == primary,
                                         "value": float(grouped_stat(a, None)[0]),
                                         "none_value": float(grouped_stat(b, None)[0]),
                                         "change": change, "ci_low": lo, "ci_high": hi,
                                         "excludes_zero": None if lo is None else bool(lo > 0 or hi < 0)})
                summaries[task] = _task_summary(task, primary, n_units, rows, scored, skipped, examples, data)
                warnings += [f"{task}: prefix kind {k} skipped: {why}" for k, why in skipped.items()]
                if n_units < 20:
                    warnings.append(f"{task}: only {n_units} units: the intervals are wide and mean little")
        summary = {"out": str(out), "model": adapter.describe(), "organism": organism, "kinds": list(kinds),
                   "reps": [r.name for r in reps], "bootstrap": cfg.bootstrap, "tasks": summaries,
                   "warnings": warnings, "seconds": round(time.perf_counter() - t0, 2)}
        write_json(tmp / "results.json", {"summary": summary, "rows": rows})
        from sightline.report.prefix import write_prefix_page

        write_prefix_page(tmp, summary, rows)
    return RunResult(out, summary)


def _task_summary(task: str, primary: str, n_units: int, rows: list[dict], scored: dict, skipped: dict,
                  examples: dict, data) -> dict:
    """One task's summary: per kind the primary metric's largest change, how many reps' intervals lie above / below 0."""
    per_kind = {}
    for kind in scored:
        if kind == "none":
            continue
        mine = [r for r in rows if r["task"] == task and r["kind"] == kind and r["primary"]]
        best = max(mine, key=lambda r: abs(r["change"]), default=None)
        per_kind[kind] = {
            "prefix_example": examples.get(kind),
            "n_reps": len(mine),
            "n_above_zero": sum(1 for r in mine if r["ci_low"] is not None and r["ci_low"] > 0),
            "n_below_zero": sum(1 for r in mine if r["ci_high"] is not None and r["ci_high"] < 0),
            "mean_change": float(np.mean([r["change"] for r in mine])) if mine else None,
            "largest_change": None if best is None else {k: best[k] for k in ("rep", "change", "ci_low", "ci_high")},
        }
    return {"primary_metric": primary, "n_units": n_units, "source": str(data.source), "format": data.format,
            "none": {r: v for r, v in scored["none"][0]["per_rep"].get("model", {}).items()},
            "kinds": per_kind, "skipped_kinds": skipped}

"""Several models side by side (the paper's Figure 3): how much each model's language model adds to its input
on each perception task, against a perception score of the model the user gives (e.g. a benchmark average).

`compare_perception(PerceiveCompareConfig(runs=(...), scores=(...)))` reads each run's results.json (written
by `sightline perceive`), takes per model and task the language-model gain (the best values layer's primary
score minus the projector's: `summary.tasks[task].lm_gain`) and correlates it across models with the scores:
Pearson r and Spearman rho, with a two-sided permutation p-value (every ordering of the scores up to 8 models,
exact; `permutations` random orderings above). With few models a correlation means little: n is given
beside every r, and a warning says so. Writes OUT/{config.json, results.json, figures/, index.html} whole or
not at all.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sightline.config import ConfigIO, to_dict
from sightline.errors import UserError
from sightline.report.files import RunFolder, RunResult, check_output, read_json, write_json

EXACT_MAX_MODELS = 8  # up to 8! = 40320 orderings: the permutation p-value is exact
FEW_MODELS = 10  # fewer models than this: the page and the warnings say the correlation means little
MEASURES = ("lm_gain", "best_values", "projector")  # what is correlated with the scores (the gain is the headline)


@dataclass(frozen=True)
class PerceiveCompareConfig(ConfigIO):
    """Compare perception runs of several models (saved as OUT/config.json)."""

    runs: tuple[str, ...]
    """Run folders written by `sightline perceive`, one per model (a comma list)."""
    scores: tuple[float, ...]
    """Each model's perception score (e.g. a benchmark average), in the order of --runs."""
    names: tuple[str, ...] = ()
    """Model labels in the order of --runs; default: the last part of each run's model name (else its folder name)."""
    score_name: str = "perception score"
    """What the scores are, for axes and the page (e.g. 'CV-Bench average')."""
    task: str = "all"
    """Tasks compared: all (those every run scored) or a comma list."""
    permutations: int = 10000
    """Random orderings for the permutation p-value above 8 models (up to 8: every ordering, exact)."""
    seed: int = 0
    """Seeds the random orderings."""
    out: str = "perceive-compare"
    """Output folder (config.json, results.json, figures/, index.html)."""
    overwrite: bool = False
    """Replace an existing output folder."""



# ============================================================================= statistics
def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of x, ties given their average rank (scipy.stats.rankdata's default)."""
    x = np.asarray(x, np.float64)
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="mergesort")] = np.arange(1, len(x) + 1)
    _, inv = np.unique(x, return_inverse=True)
    return (np.bincount(inv, ranks) / np.bincount(inv))[inv]


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r of two equal-length vectors; None when either is constant or there are fewer than 2."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2:
        return None
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float((xc * xc).sum() * (yc * yc).sum()))
    return None if den == 0 else float(np.clip((xc * yc).sum() / den, -1.0, 1.0))


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho: Pearson's r of the ranks (ties averaged)."""
    return pearson(rankdata(x), rankdata(y))


def permutation_p(x: np.ndarray, y: np.ndarray, rank: bool = False, n_perm: int = 10000, seed: int = 0
                  ) -> tuple[float | None, str]:
    """Two-sided permutation p-value of the correlation of x and y (Spearman with `rank`): the share of orderings
    of y whose |r| is at least the observed one. Every ordering up to EXACT_MAX_MODELS (exact, the observed one
    included), else `n_perm` random ones ((1 + hits) / (1 + n_perm)). (None, why) below 3 models."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)
    if n < 3:
        return None, f"no p-value with {n} models (any two points lie on a line: r is +-1 or undefined)"
    if rank:
        x, y = rankdata(x), rankdata(y)
    xc = x - x.mean()
    yc = y - y.mean()
    den = math.sqrt(float((xc * xc).sum() * (yc * yc).sum()))
    if den == 0:
        return None, "no p-value: the scores or the gains are all equal"
    r_obs = abs(float((xc * yc).sum()) / den)
    if n <= EXACT_MAX_MODELS:
        perms = np.array(list(itertools.permutations(range(n))))
        r = np.abs(yc[perms] @ xc) / den
        return float(np.mean(r >= r_obs - 1e-12)), f"exact over all {len(perms)} orderings"
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0AA]))
    hits = 0
    for start in range(0, n_perm, 4096):
        b = min(4096, n_perm - start)
        perms = np.argsort(rng.random((b, n)), axis=1)
        hits += int(np.count_nonzero(np.abs(yc[perms] @ xc) / den >= r_obs - 1e-12))
    return (1 + hits) / (1 + n_perm), f"{n_perm} random orderings"


def correlate(scores: np.ndarray, values: np.ndarray, n_perm: int = 10000, seed: int = 0) -> dict[str, Any]:
    """Pearson and Spearman correlation of `values` with `scores` across models, with permutation p-values."""
    p_r, how = permutation_p(scores, values, False, n_perm, seed)
    p_rho, _ = permutation_p(scores, values, True, n_perm, seed)
    n = len(scores)
    note = how
    if n < FEW_MODELS:
        note += f"; only {n} models: a correlation over so few means little"
    if 3 <= n <= EXACT_MAX_MODELS:
        note += f" (the smallest p-value {n} models can give is {2 / math.factorial(n):.3g})"
    return {"n": n, "pearson_r": pearson(scores, values), "spearman_rho": spearman(scores, values),
            "pearson_p": p_r, "spearman_p": p_rho, "note": note}


# ============================================================================= reading the runs
def _read_run(path: str) -> dict:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"run folder {folder} does not exist: give folders written by `sightline perceive --out`")
    res = folder / "results.json"
    if not res.is_file():
        raise UserError(f"{folder} has no results.json: give a folder a finished `sightline perceive` run wrote")
    try:
        data = read_json(res)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"cannot read {res} ({type(err).__name__}): rerun `sightline perceive` into that "
                        "folder") from None
    tasks = data.get("summary", {}).get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, dict):
        raise UserError(f"{res} is not a perceive run's results (no summary.tasks): give `sightline perceive` folders")
    return data


def _names(cfg: PerceiveCompareConfig, runs: list[dict]) -> list[str]:
    if cfg.names:
        if len(cfg.names) != len(cfg.runs):
            raise UserError(f"--names gives {len(cfg.names)} labels for {len(cfg.runs)} --runs: give one per run")
        names = list(cfg.names)
    else:
        names = [Path(str((r["summary"].get("model") or {}).get("name") or p)).name or Path(p).name
                 for r, p in zip(runs, cfg.runs)]
        if len(set(names)) < len(names):
            names = [Path(p).expanduser().resolve().name for p in cfg.runs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise UserError(f"two runs are both called {dup!r}: pass --names with one label per run")
    return names


def _check(cfg: PerceiveCompareConfig) -> None:
    if len(cfg.runs) < 2:
        raise UserError(f"--runs needs two or more run folders (one per model), got {len(cfg.runs)}")
    if len(cfg.scores) != len(cfg.runs):
        raise UserError(f"--scores gives {len(cfg.scores)} numbers for {len(cfg.runs)} --runs: give one score per "
                        "run, in the same order")
    bad = next((s for s in cfg.scores if not math.isfinite(s)), None)
    if bad is not None:
        raise UserError(f"--scores holds {bad}: every score must be a finite number")
    if cfg.permutations < 1:
        raise UserError(f"--permutations must be at least 1, not {cfg.permutations}")


def _tasks(cfg: PerceiveCompareConfig, runs: list[dict], names: list[str]) -> list[str]:
    scored = [list(r["summary"]["tasks"]) for r in runs]
    common = [t for t in scored[0] if all(t in s for s in scored[1:])]
    if cfg.task.strip() in ("", "all"):
        if not common:
            raise UserError("the runs share no task: run `sightline perceive` with the same --task for every model")
        return common
    wanted = [t.strip() for t in cfg.task.split(",") if t.strip()]
    for t in wanted:
        missing = [n for n, s in zip(names, scored) if t not in s]
        if missing:
            raise UserError(f"task {t} was not scored by run {missing[0]}: drop it from --task or rerun that model "
                            f"(the runs share {', '.join(common) or 'no task'})")
    return list(dict.fromkeys(wanted))


# ============================================================================= the job
def compare_perception(cfg: PerceiveCompareConfig) -> RunResult:
    """Read the runs, correlate each task's language-model gain with the scores, write `cfg.out`."""
    _check(cfg)
    runs = [_read_run(p) for p in cfg.runs]
    names = _names(cfg, runs)
    tasks = _tasks(cfg, runs, names)
    out = check_output(cfg.out, cfg.overwrite, UserError)
    t0 = time.perf_counter()
    scores = np.asarray(cfg.scores, np.float64)
    warnings: list[str] = []
    models = []
    for name, path, score, run in zip(names, cfg.runs, cfg.scores, runs):
        per = {}
        for t in tasks:
            s = run["summary"]["tasks"][t]
            bv = s.get("best_values") or {}
            per[t] = {"lm_gain": s.get("lm_gain"), "best_values": bv.get("value"), "best_values_rep": bv.get("rep"),
                      "projector": s.get("projector"), "primary_metric": s.get("primary_metric"),
                      "n_units": s.get("n_units"), "too_small": bool(s.get("too_small")), "source": s.get("source")}
            if s.get("too_small"):
                warnings.append(f"{name}: {t} was scored on only {s.get('n_units')} units: its gain means little")
        gains = [per[t]["lm_gain"] for t in tasks]
        mean = float(np.mean(gains)) if all(g is not None for g in gains) else None
        models.append({"name": name, "run": str(path), "score": float(score),
                       "model": (run["summary"].get("model") or {}).get("name"), "tasks": per, "mean_lm_gain": mean})
    for t in tasks:
        srcs = {(m["tasks"][t]["source"], m["tasks"][t]["n_units"]) for m in models}
        if len(srcs) > 1:
            warnings.append(f"{t}: the runs read different data or numbers of units ({len(srcs)} kinds): their gains "
                            "are not measured alike")
    results_tasks: dict[str, dict] = {}
    for t in tasks + (["mean"] if len(tasks) > 1 else []):
        entry: dict[str, Any] = {}
        for measure in ("lm_gain",) if t == "mean" else MEASURES:
            vals = [m["mean_lm_gain"] if t == "mean" else m["tasks"][t][measure] for m in models]
            keep = [i for i, v in enumerate(vals) if v is not None]
            c = correlate(scores[keep], np.asarray([vals[i] for i in keep], np.float64), cfg.permutations, cfg.seed)
            c["models"] = [names[i] for i in keep]
            c["values"] = [vals[i] for i in keep]
            c["scores"] = [float(scores[i]) for i in keep]
            if len(keep) < len(models):
                c["note"] += (f"; left out {', '.join(names[i] for i in range(len(models)) if i not in keep)} "
                              f"(no {measure} in its run)")
            entry[measure] = c
        results_tasks[t] = entry
    n = len(models)
    if n < FEW_MODELS:
        warnings.insert(0, f"only {n} models: a correlation across so few means little (n and the permutation "
                           "p-value are given beside every r)")
    summary = {
        "out": str(out),
        "score_name": cfg.score_name,
        "n_models": n,
        "models": names,
        "scores": [float(s) for s in scores],
        "tasks": {t: {k: e["lm_gain"][k] for k in ("n", "pearson_r", "spearman_rho", "pearson_p", "spearman_p", "note")}
                  for t, e in results_tasks.items()},
        "lm_gain": {m["name"]: {t: m["tasks"][t]["lm_gain"] for t in tasks} for m in models},
        "warnings": warnings,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    with RunFolder(out, overwrite=cfg.overwrite) as tmp:
        write_json(tmp / "config.json", to_dict(cfg))
        write_json(tmp / "results.json", {"summary": summary, "models": models, "correlations": results_tasks})
        _write_page(tmp, cfg, summary, results_tasks)
    return RunResult(out, summary)


def _write_page(folder: Path, cfg: PerceiveCompareConfig, summary: dict, corr: dict) -> None:
    from sightline.report.html import Section, bullets, write_page
    from sightline.report.perception import plot_gain_scatter

    def f3(v):
        return "n/a" if v is None else f"{v:.3f}"

    n = summary["n_models"]
    lines = []
    for t, c in summary["tasks"].items():
        lines.append(f"{t}: Pearson r {f3(c['pearson_r'])} (p {f3(c['pearson_p'])}), Spearman rho "
                     f"{f3(c['spearman_rho'])} (p {f3(c['spearman_p'])}), n = {c['n']} models.")
    text = (f"How much each model's language model adds to its input (the best values layer's score minus the "
            f"projector's) against {cfg.score_name}, across {n} models. "
            + (f"With only {n} models a correlation means little: read n and the p-values before r. "
               if n < FEW_MODELS else ""))
    sections = [Section("What the comparison found", text, html=bullets(lines), anchor="findings")]
    if summary["warnings"]:
        sections.append(Section("Warnings", html=bullets([f"Warning: {w}" for w in summary["warnings"]], cls="note"),
                                anchor="warnings"))
    for t, entry in corr.items():
        c = entry["lm_gain"]
        path = plot_gain_scatter(c["scores"], c["values"], c["models"], folder / "figures" / f"gain_vs_score_{t}.png",
                                 task=t, score_name=cfg.score_name, stats=c)
        rows = [[m, s, v] for m, s, v in zip(c["models"], c["scores"], c["values"])]
        sections.append(Section(
            f"{t}" if t != "mean" else "mean over tasks", c["note"] + ".",
            figures={"n": c["n"], "Pearson r": c["pearson_r"], "p (Pearson)": c["pearson_p"],
                     "Spearman rho": c["spearman_rho"], "p (Spearman)": c["spearman_p"]},
            images=[(path.relative_to(folder).as_posix(),
                     f"{t}: language-model gain against {cfg.score_name}, one point per model (n = {c['n']}).")],
            tables=[("", ["model", cfg.score_name, "language-model gain"], rows)], anchor=t))
    write_page(folder / "index.html", "Perception across models", f"{n} models · {cfg.score_name}", sections)

"""`sightline demo`: every analysis of the toolkit on the shipped model organism, offline, with no arguments.

It loads the organism, renders held-out synthetic scenes (seeds the training never used), measures
the organism's accuracy per question type, extracts the residual stream, keys and values of every
layer over image and text tokens into an ActivationStore, runs each analysis that exists, and writes
a report: summary.json (stable keys, docs/report.md), figures and index.html.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from sightline.errors import UserError
from sightline.report.files import write_json
from sightline.report.html import (
    Section,
    Thumb,
    bullets,
    frac_count,
    loss_recovered_text,
    write_page,
)
from sightline.report.stats import accuracy_text, wilson_interval

MARKER = ".sightline-demo"
DEMO_QTYPES = ("shape", "colour", "size", "position", "presence", "count")


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs on (defaults: the shipped organism, a few minutes on 2 CPU cores)."""

    out: str = "sightline-demo"
    """output folder (replaced when it is an earlier demo folder)"""
    n: int = 256
    """held-out single-object scenes in the store"""
    seed: int = 7
    """scene seed of the held-out data (training drew from seed 0's "train" stream)"""
    eval_n: int = 40
    """scenes per set for the accuracy table (see sightline.organism.evaluate)"""
    model: str | None = None
    """a checkpoint folder; None = the shipped organism"""
    perception_units: int = 20
    """units per perception task (episodes, sets, images, pairs, clips) on synthetic scenes"""
    keys_images: int = 32
    """images the key scan takes its statistics over"""
    keys_eval_scenes: int = 6
    """scenes per question set answered under each key block"""
    keys_readout_scenes: int = 16
    """scenes of the foreground readout under each key block (half fit, half scored)"""
    prefix_units: int = 20
    """referring-expression images read with each text prefix"""
    surfacing_train_scenes: int = 160
    """scenes the presence / count probes are fitted on"""
    surfacing_test_scenes: int = 40
    """held-out scenes whose presence / count questions are scored"""
    surfacing_blink_questions: int = 10
    """synthetic questions in BLINK's layout per subtask (Visual_Correspondence, Multi-view_Reasoning)"""
    threads: int = 1
    """torch's CPU threads for the run (0 = torch's default). The organism's ops are too small to gain
    from more: on 2 cores a second thread cost 2-3x the CPU time for no gain in wall time, and far more
    when another job holds a core (BENCHMARKS.md)"""
    progress: bool = True
    """show progress bars"""


@dataclass
class DemoContext:
    """What every section of the demo can use."""

    config: DemoConfig
    out: Path
    adapter: object  # the loaded organism (a sightline adapter)
    model_path: str
    store_path: Path  # ActivationStore: resid.0..n, keys, values of every layer, all positions
    manifest: Path  # the held-out JSONL (image, prompt, label, facts) the store was extracted from


def _check_config(cfg: DemoConfig) -> None:
    """The demo's numbers, checked before its folder is touched."""
    for name, least in (("n", 1), ("eval_n", 1), ("threads", 0), ("keys_images", 2), ("keys_eval_scenes", 0),
                        ("keys_readout_scenes", 0), ("prefix_units", 1), ("surfacing_train_scenes", 1),
                        ("surfacing_test_scenes", 1), ("surfacing_blink_questions", 1)):
        if getattr(cfg, name) < least:
            raise UserError(f"--{name.replace('_', '-')} must be at least {least}, not {getattr(cfg, name)}")
    if cfg.model is not None:
        from sightline.models.base import check_model_folder, looks_local

        if looks_local(cfg.model):
            check_model_folder(cfg.model)


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; choose another --out")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise UserError(f"{out} exists and is not a sightline demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by sightline demo; safe to delete\n")


def chance_levels(seed: int, n: int, image_size: int) -> dict[str, dict]:
    """Per question type of `sightline.organism.evaluate` (same seed and n): `uniform`, the mean over its
    questions of 1 / the number of answers the world allows for that question (8 shapes, 8 colours, 3
    sizes, left/right or top/bottom, yes/no, zero to the most objects a scene holds), and `majority`, the
    share of the most common true answer; caption (free text) has none."""
    from sightline.data.synthetic import WorldConfig, answer_family
    from sightline.organism.evaluate import eval_items

    answers: dict[str, list[str]] = {}
    for _, _, answer, qtype in eval_items(seed, n, image_size):
        answers.setdefault(qtype, []).append(answer)
    out = {}
    for qtype, ans in answers.items():
        fams = [answer_family(a, len(WorldConfig().count_probs)) for a in ans]
        if qtype == "caption" or any(f is None for f in fams):
            out[qtype] = {"uniform": None, "majority": None, "answers": None}
            continue
        top = max(set(ans), key=ans.count)
        out[qtype] = {"uniform": round(sum(1 / len(f) for f in fams) / len(fams), 4),
                      "majority": round(ans.count(top) / len(ans), 4),
                      "answers": sorted({len(f) for f in fams})}
    return out


def _organism_section(ctx: DemoContext) -> tuple[dict, Section]:
    from sightline.organism.evaluate import evaluate

    cfg = ctx.config
    res = evaluate(ctx.adapter, seed=cfg.seed, n=cfg.eval_n, progress=cfg.progress)
    write_json(ctx.out / "organism_eval.json", res)
    ad = ctx.adapter
    chance = chance_levels(cfg.seed, cfg.eval_n, ad.config.vision_config.image_size)
    ci = {t: [round(v, 4) for v in wilson_interval(round(a * res["count"][t]), res["count"][t])]
          for t, a in res["accuracy"].items()}
    summary = {
        "model": ctx.model_path,
        "n_layers": ad.n_layers,
        "hidden_size": ad.hidden_size,
        "image_tokens": 64,
        "eval_seed": cfg.seed,
        "eval_n": cfg.eval_n,
        "accuracy": res["accuracy"],
        "questions": res["count"],
        "accuracy_ci95": ci,
        "chance": {t: {k: v for k, v in chance.get(t, {}).items() if k != "answers"} for t in res["accuracy"]},
    }

    def chance_text(t):
        c = chance.get(t) or {}
        if c.get("uniform") is None:
            return "n/a (free-text answer)"
        k = c["answers"]
        return f"{c['uniform']:.3f} (1/{k[0]})" if len(k) == 1 else f"{c['uniform']:.3f} (mixed: 1/{', 1/'.join(map(str, k))})"

    rows = [(t, res["count"][t], accuracy_text(a, res["count"][t]), chance_text(t),
             (chance.get(t) or {}).get("majority"), _verdict(ci[t], (chance.get(t) or {}).get("uniform"),
                                                             (chance.get(t) or {}).get("majority")))
            for t, a in res["accuracy"].items()]
    ex = [(t, e["question"], e["answer"], e["generated"]) for t, es in res["examples"].items() for e in es[:1]]
    sec = Section(
        "The model organism",
        f"A {ad.n_layers}-layer LLaVA trained from scratch on the synthetic world, asked about fresh scenes "
        f"(seed {cfg.seed}, {cfg.eval_n} scenes per set); an answer counts when the greedy generation equals the true "
        "answer. Brackets: Wilson 95% interval. Chance: 1 / the number of answers the world allows for the question "
        "(averaged over the questions where they differ); majority: the share of the most common true answer, what "
        "always giving that answer would score.",
        tables=[("accuracy per question type, with chance beside it",
                 ["question type", "questions", "accuracy [95% interval]", "chance (uniform)", "majority answer",
                  "verdict"], rows),
                ("one example per type", ["type", "question", "answer", "generated"], ex)],
        links=[("organism_eval.json", "organism_eval.json")],
    )
    return summary, sec


def _verdict(ci: list[float], uniform: float | None, majority: float | None) -> str:
    """'above chance' when the whole 95% interval is above both chance levels, else 'at chance'."""
    if uniform is None:
        return "no chance level (free text)"
    floor = max(uniform, majority or 0)
    return "above chance" if ci[0] > floor else "not distinguishable from chance"


def _store_section(ctx: DemoContext) -> tuple[dict, Section]:
    from sightline.store import ActivationStore

    s = ActivationStore.open(ctx.store_path)
    idx = s.index
    from sightline.models.layout import MODALITIES

    mods = {m: int((idx["modality"] == k).sum()) for k, m in enumerate(MODALITIES)}
    grid_fig, grid = _token_grid_figure(ctx, s.examples[0])
    summary = {"path": str(ctx.store_path.relative_to(ctx.out)), "examples": len(s), "tokens": s.n_tokens,
               "tokens_by_modality": mods, "sites": s.sites, "token_grid_figure": grid_fig}
    text = ("Residual stream entering every block (and the last block's output), keys and values of every layer, "
            "over every token of each held-out example.")
    if grid:
        text += (f" Each image becomes a {grid['rows']} x {grid['cols']} grid of image tokens (sequence positions "
                 f"{grid['first_position']} to {grid['first_position'] + grid['rows'] * grid['cols'] - 1}), token "
                 f"(row, col) covering a {grid['step_xy'][1]:g} x {grid['step_xy'][0]:g} px box of the "
                 f"{grid['image_size_hw'][0]} x {grid['image_size_hw'][1]} px image: the figure draws the grid that "
                 "the store keeps per example (TokenLayout, docs/store.md) over one held-out scene.")
    sec = Section("Activations", text,
                  figures={"examples": len(s), "tokens": s.n_tokens, **{f"{m} tokens": n for m, n in mods.items()},
                           "sites": len(s.sites)},
                  images=[(grid_fig, (f"image tokens over the pixels of held-out scene 0: '{s.examples[0]['prompt']}' "
                                      "(each box: row,col and #sequence position)"))] if grid_fig else [])
    return summary, sec


def _token_grid_figure(ctx: DemoContext, example: dict) -> tuple[str | None, dict | None]:
    """figures/token_grid.png: one stored example's image with its base-view token grid drawn over it."""
    import numpy as np
    from PIL import Image

    from sightline.models.layout import ViewGrid
    from sightline.report.layout import plot_token_grid

    grids = example.get("layout") or []
    if not grids or not example.get("path"):
        return None, None
    g = next((d for d in grids if d.get("view", 0) == 0), grids[0])
    xs, ys = ViewGrid.from_json(g).spans()
    img = np.asarray(Image.open(example["path"]).convert("RGB"))
    rel = "figures/token_grid.png"
    plot_token_grid(img, xs, ys, ctx.out / rel, first_position=g.get("first_position"), newline=g.get("newline", False),
                    title=f"{g['rows']} x {g['cols']} image tokens over a {g['image_size_hw'][0]} x "
                          f"{g['image_size_hw'][1]} px scene ({g['step_xy'][0]:g} px per token)")
    return rel, g


def _probe_section(ctx: DemoContext) -> tuple[dict, Section]:
    from sightline.probes.run import ProbeConfig, run_probes

    res = run_probes(ProbeConfig(store=str(ctx.store_path), label="facts.objects.0.shape", out=str(ctx.out / "probes"),
                                 progress=ctx.config.progress))
    keep = ("best_site", "best_top1", "best_top5", "best_control_top1", "best_selectivity", "chance", "classes",
            "split_sizes", "sites")
    summary = {k: res[k] for k in keep if k in res}
    n_test = summary["split_sizes"]["test"]
    summary["best_top1_ci95"] = [round(v, 4) for v in wilson_interval(round(summary["best_top1"] * n_test), n_test)]
    conf = _probe_confusion(ctx, summary["best_site"])
    summary["confusion"] = conf
    rows = [(site, accuracy_text(m.get("test_top1"), n_test, 3), m.get("test_top5"), m.get("control_test_top1"),
             m.get("selectivity")) for site, m in res["sites"].items()]
    uniform = summary["chance"]["uniform"]
    images = [("probes/figures/accuracy_vs_layer.png", "held-out accuracy against layer, control task and chance")]
    if conf:
        images.append((conf["figure"], (f"confusion matrix of the best probe ({summary['best_site']}) on the "
                                        f"{n_test} held-out images")))
    sec = Section(
        "Linear probes: which shape is in the image",
        "Multinomial logistic regression on the mean of the image tokens at every site, L2 chosen on a validation "
        f"split, scored on {n_test} held-out images (brackets: Wilson 95% interval); chance is 1/"
        f"{len(summary['classes'])} = {uniform:.3f}. The control task (labels reassigned at random per image, "
        "Hewitt & Liang 2019) shows how much a probe could memorise.",
        figures={"best site": summary["best_site"],
                 "best held-out top-1 [95% interval]": accuracy_text(summary["best_top1"], n_test, 3),
                 "chance (1 / classes)": round(uniform, 4), "majority class": summary["chance"].get("majority"),
                 "control task top-1 at the best site": summary.get("best_control_top1"),
                 "selectivity (top-1 minus control)": summary.get("best_selectivity")},
        tables=[("held-out accuracy per site", ["site", "top-1 [95% interval]", "top-5", "control top-1",
                                                "selectivity"], rows)],
        images=images,
        links=[("probes/index.html", "probe run page"), ("probes/results.json", "results.json")],
    )
    return summary, sec


def _probe_confusion(ctx: DemoContext, site: str) -> dict | None:
    """figures/probe_confusion.png and its counts: the probe run's probe at `site` on its own test split."""
    import numpy as np

    from sightline.probes.features import pool_features, resolve_labels
    from sightline.probes.linear import load_probes
    from sightline.report.files import read_json
    from sightline.report.probes import plot_confusion
    from sightline.store import ActivationStore

    run = ctx.out / "probes"
    results = read_json(run / "results.json")
    test_ids = results.get("splits", {}).get("examples", {}).get("test")
    probe = load_probes(run).get(site)
    if not test_ids or probe is None:
        return None
    store = ActivationStore.open(ctx.store_path)
    cfg = results.get("config") or read_json(run / "config.json")
    feats = pool_features(store, [site], test_ids, cfg.get("pooling", "mean"), cfg.get("modality", "image"))
    by_id = {e["example"]: e for e in store.examples}
    truth = resolve_labels([by_id[int(i)] for i in feats.example_ids], cfg.get("label", "facts.objects.0.shape"))
    pred = probe.predict(feats.acts[site])
    classes = list(probe.classes)
    counts = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, q in zip(truth, pred):
        if t in classes:
            counts[classes.index(t), classes.index(q)] += 1
    rel = "figures/probe_confusion.png"
    plot_confusion(counts, classes, ctx.out / rel,
                   title=f"shape probe at {site}: {int(np.trace(counts))} of {int(counts.sum())} held-out images right")
    return {"site": site, "classes": classes, "counts": counts.tolist(), "figure": rel}


def _steer_section(ctx: DemoContext) -> tuple[dict, Section]:
    from sightline.data.synthetic import WorldConfig, export_imagefolder
    from sightline.steer import SteerConfig, headline, run_steering

    cfg = ctx.config
    data = export_imagefolder(ctx.out / "steer_data", seed=cfg.seed + 1, n=240, config=WorldConfig(n_objects=1),
                              attribute="shape")
    res = run_steering(SteerConfig(
        model=ctx.model_path, directions=str(ctx.store_path), label="facts.objects.0.shape", data=str(data),
        out=str(ctx.out / "steer"), pairs=("circle:star", "square:heart"), layers="0,1,2,3",
        scales=(0, 3, 6, 9), images_per_class=12, batch_size=64, max_new_tokens=5, progress=cfg.progress),
        adapter=ctx.adapter)
    h = headline(res)
    from sightline.report.files import read_json

    per_layer = read_json(ctx.out / "steer" / "results.json")["summary"]["per_layer"]
    h["max_flip_rate_by_site"] = {site: max((v for v in m["flip_rate"] if v is not None), default=None)
                                  for site, m in per_layer.items()}
    figs = sorted((ctx.out / "steer" / "figures").glob("*.png"))
    examples = _steer_examples(ctx.out, ctx.out / "steer" / "generations.jsonl", h.get("best_site"),
                               h.get("best_scale"))
    sec = Section(
        "Steering: add a shape direction at the image tokens",
        "v = difference of class means (target minus source) of the mean-pooled image tokens at resid.L, unit "
        "norm; k * v is added at the image positions during the prefill only, then the answer is generated "
        "greedily from the edited KV cache: the steering protocol of Line of Sight (Rajaram et al. 2025, "
        "arXiv 2506.04706; settings in PAPERS.md). Flip rate: the free answer to 'What shape is shown?' names "
        "the target; damage: accuracy on the colour question of the same images. Judged swap: the unsteered "
        "model itself, beside a blank image, picks which of four shapes (source, target, two distractors) the "
        "answer names; coherence: the answer's NLL per token under the unsteered model (Line of Sight's judged "
        "swaps and coherence, here by the model rather than an external judge).",
        figures={**{k.replace("_", " "): h[k] for k in ("best_site", "best_scale", "flip_rate", "efficacy",
                                                         "damage_accuracy", "caption_nll_increase",
                                                         "judged_target_rate", "coherence", "clean_flip_rate",
                                                         "clean_damage_accuracy", "clean_judged_target_rate",
                                                         "clean_coherence") if h.get(k) is not None},
                 **{f"highest flip rate at {site} (any k)": v for site, v in h["max_flip_rate_by_site"].items()}},
        tables=[(f"example generations: clean, and steered at {h.get('best_site')}, k = {h.get('best_scale')}",
                 ["image", "source -> target", "open answer, clean", "open answer, steered", "colour, steered",
                  "colour, true"], examples)] if examples else [],
        images=[(str(f.relative_to(ctx.out)), f.stem) for f in figs],
        links=[("steer/index.html", "steering run page"), ("steer/results.json", "results.json"),
               ("steer/generations.jsonl", "generations.jsonl")],
    )
    return h, sec


def _steer_examples(out: Path, generations: Path, site: str | None, scale: float | None,
                    per_pair: int = 4) -> list[tuple]:
    """Rows for the page: per pair, the first images' clean and steered answers at the headline (site, k)."""
    if site is None or not generations.exists():
        return []
    clean: dict[tuple, str] = {}
    steered: dict[tuple, dict[str, dict]] = {}
    order: list[tuple] = []
    for line in generations.read_text().splitlines():
        r = json.loads(line)
        key = (r["source"], r["target"], r["path"])
        if r["site"] is None and r["kind"] == "open":
            clean[key] = r["answer"]
            order.append(key)
        elif r["site"] == site and r["scale"] == scale:
            steered.setdefault(key, {})[r["kind"]] = r
    rows, shown = [], {}
    for key in order:
        pair = key[:2]
        if shown.get(pair, 0) >= per_pair or key not in steered:
            continue
        shown[pair] = shown.get(pair, 0) + 1
        got = steered[key]
        damage = got.get("damage", {})
        rows.append((Thumb(os.path.relpath(key[2], out), alt=Path(key[2]).name), f"{pair[0]} -> {pair[1]}",
                     clean[key], got.get("open", {}).get("answer", ""), damage.get("answer", ""),
                     damage.get("expected", "")))
    return rows


def _sae_section(ctx: DemoContext) -> tuple[dict, Section]:
    from sightline.sae import SAEConfig, SAETrainConfig, train_saes
    from sightline.sae.analyze import SAEAnalyzeConfig, analyze_sae

    cfg = ctx.config
    folders = []
    for L in range(ctx.adapter.n_layers + 1):  # one small TopK SAE per layer, on image and text tokens
        # Few latents die with k = 32 and a strong AuxK acting on latents silent for 4 batches: with k = 16
        # and the library's AuxK defaults (1/32, silent for a tenth of training) up to 26% of resid.0's
        # latents never fired; this setting measured 0-3% per layer at 6 epochs, and at most 7% (resid.0) at
        # the 5 kept to hold the demo to two minutes of CPU (tests/test_demo.py).
        folders += train_saes(SAETrainConfig(
            store=str(ctx.store_path), site=f"resid.{L}", out=str(ctx.out / "sae" / f"resid.{L}"), modality="both",
            batch_size=1024, epochs=5, dead_tokens=4096,
            saes=(SAEConfig(arch="topk", width=256, k=32, aux_coeff=0.25),)), progress=cfg.progress)["paths"]
    res = analyze_sae(SAEAnalyzeConfig(saes=tuple(str(f) for f in folders), store=str(ctx.store_path),
                                       out=str(ctx.out / "sae-analysis"), n_loss=16, loss_batch_size=32, n_features=6,
                                       task_qtypes=("shape", "colour"), n_task=16, max_new_tokens=4,
                                       progress=cfg.progress), adapter=ctx.adapter)
    keep = ("site", "fvu_image", "fvu_text", "l0_image", "l0_text", "frac_dead", "loss_recovered", "task_accuracy",
            "image_only", "text_only", "shared", "probe_coverage")
    from sightline.report.files import read_json

    metrics = read_json(ctx.out / "sae-analysis" / "results.json")["metrics"]["saes"]
    per_sae = []
    for e in res["saes"]:
        m = metrics.get(e.get("name"), {})
        lr = m.get("loss_recovered") or {}
        per_sae.append({k: e.get(k) for k in keep}
                       | {"n_dead": (m.get("reconstruction", {}).get("all") or {}).get("n_dead"),
                          "loss_recovered_note": None if e.get("loss_recovered") is not None else
                          (lr.get("note") or m.get("loss_note") or "not measured")})
    summary = {"shared_by_layer": res["shared_by_layer"], "saes": per_sae}
    basis, basis_rows, basis_figs = _sae_basis(ctx, folders)
    summary.update(basis)
    sec = Section(
        "Sparse autoencoders on image and text tokens",
        "A TopK SAE (256 latents, k = 32, AuxK against dead latents) per layer on the residual stream over image and "
        "text tokens. A latent is "
        "image-only or text-only when at least 90% of its mean activation per token falls on that modality, "
        "shared otherwise (docs/report.md). Dead: share of latents that fire on no token (count in brackets). "
        "Loss recovered = 1 - (NLL_SAE - NLL_clean) / (NLL_zero - NLL_clean) on answer tokens, the reconstruction "
        "spliced in at the image positions; 1 = as good as the model's own activations. Answer accuracy: the same "
        "splice during the prefill, the answer then generated (exact match) on the shape and colour questions of "
        "the held-out scenes, clean / SAE spliced in / zeros there, chance 1/8 (Line of Sight's benchmark accuracy "
        "with the SAE spliced in).",
        tables=[("per layer", ["site", "FVU image", "FVU text", "L0 image", "dead (count)", "loss recovered",
                               "shape: clean / SAE / zero", "colour: clean / SAE / zero", "image-only", "text-only",
                               "shared"],
                 [(e["site"], e["fvu_image"], e["fvu_text"], e["l0_image"], frac_count(e["frac_dead"], e["n_dead"]),
                   loss_recovered_text(e["loss_recovered"], e["loss_recovered_note"]),
                   _spliced_text(e["task_accuracy"], "shape"), _spliced_text(e["task_accuracy"], "colour"),
                   e["image_only"], e["text_only"], e["shared"]) for e in per_sae])],
        images=[("sae-analysis/figures/shared_by_layer.png", "shared fraction of live latents per layer"),
                *basis_figs],
        links=[("sae-analysis/index.html", "feature pages (top image tokens as heatmaps, top text contexts)"),
               ("sae-analysis/results.json", "results.json"),
               ("sae-directions/index.html", "steering directions in the SAE basis"),
               ("sae-sparse-probe/index.html", "sparse probes over SAE latents")],
        html=basis_rows,
    )
    return summary, sec


SAE_BASIS_SITE = "resid.2"  # the middle layer: where tests/test_sae_directions.py validates both on the organism


def _sae_basis(ctx: DemoContext, folders: list) -> tuple[dict, str, list[tuple[str, str]]]:
    """The steering pairs' directions in the SAE basis (OMP) and k-sparse shape probes over the latents, both
    with the SAE the section trained at SAE_BASIS_SITE: (summary keys, HTML tables, figures)."""
    from sightline.report.html import table
    from sightline.sae.directions import ExplainDirectionConfig, explain_directions
    from sightline.sae.sparse_probe import SparseProbeConfig, run_sparse_probes

    sae = next(str(f) for f in folders if Path(f).parent.name == SAE_BASIS_SITE)
    d = explain_directions(ExplainDirectionConfig(
        sae=sae, store=str(ctx.store_path), label="facts.objects.0.shape", classes=("circle:star", "square:heart"),
        features=str(ctx.out / "sae-analysis"), out=str(ctx.out / "sae-directions"), progress=False))
    p = run_sparse_probes(SparseProbeConfig(sae=sae, store=str(ctx.store_path), label="facts.objects.0.shape",
                                       ks=(1, 2, 4, 8), out=str(ctx.out / "sae-sparse-probe"), progress=False))
    dirs = {name: {"latents_for_0.7": r["needed"]["0.7"], "random_latents_for_0.7": r["random_needed"]["0.7"],
                   "cosine_at_20": r["cosine_at"].get("20"), "random_cosine_at_20": r["random_cosine_at"].get("20"),
                   "top_latents": r["top_latents"], "figure": f"sae-directions/{r['figure']}"}
            for name, r in d["directions"].items()}
    summary = {
        "directions": {"site": d["site"], "n_latents": d["n_latents"], "pairs": dirs},
        "sparse_probe": {k: p[k] for k in ("site", "ks", "top1", "dense_top1", "all_latents_top1",
                                           "smallest_k_within_5_points", "top_latent_per_class")},
    }
    html_text = (
        f"<p>Steering directions in the SAE basis (Line of Sight's figure of steering vectors as sparse sums of SAE "
        f"latents): each shape pair's steering vector at {d['site']} (difference of class means) approximated by "
        f"orthogonal matching pursuit over the {d['n_latents']} decoder directions, against random directions of "
        "the same norm (mean of 8).</p>"
        + table(["direction", "latents for cosine 0.7", "random: latents for 0.7", "cosine at 20 latents",
                 "random at 20", "first latents chosen"],
                [[n, e["latents_for_0.7"], e["random_latents_for_0.7"], e["cosine_at_20"], e["random_cosine_at_20"],
                  ", ".join(map(str, e["top_latents"][:5]))] for n, e in dirs.items()])
        + f"<p>Sparse probes (the paper's L0-constrained probes over SAE latents; here k latents per class chosen by "
        f"class separation, then a logistic probe on them): held-out shape accuracy at {p['site']} against k, the "
        f"dense probe on the residual {p['dense_top1']:.3f}.</p>"
        + table(["latents per class (k)", "held-out top-1"], [[k, a] for k, a in zip(p["ks"], p["top1"])]))
    figs = [(e["figure"], f"{n} in the SAE basis: cosine against latents used") for n, e in dirs.items()]
    figs.append(("sae-sparse-probe/figures/accuracy_vs_k.png", "k-sparse probes over SAE latents against k"))
    return summary, html_text, figs


def _spliced_text(task_accuracy: dict | None, qtype: str) -> str:
    """'0.94 / 0.94 / 0.00' (clean / SAE spliced in / zeros) for one question type, or 'n/a'."""
    r = (task_accuracy or {}).get(qtype)
    if not r or r.get("sae") is None:
        return "n/a"
    return f"{r['clean']:.2f} / {r['sae']:.2f} / {r['zero']:.2f} (n = {r['n']})"


PERCEPTION_REPS = ("values", "projector", "encoder")  # values of all KV heads together; `perceive` reads more
# label propagation through clips (tempcorr) is left to `sightline perceive`: it doubled the section's time
PERCEPTION_TASKS = ("fgseg", "coseg", "textseg", "semcorr")  # refseg: the prefix section reads it, every layer


def _perception_section(ctx: DemoContext) -> tuple[dict, Section]:
    from sightline.perception.run import PerceiveConfig, run_perceive
    from sightline.report.files import read_json

    cfg = ctx.config
    res = run_perceive(PerceiveConfig(
        model=ctx.model_path, out=str(ctx.out / "perceive"), reps=PERCEPTION_REPS, heads="concat",
        task=",".join(PERCEPTION_TASKS), n_examples=1,
        synthetic_units=cfg.perception_units, seed=cfg.seed, progress=cfg.progress), adapter=ctx.adapter)
    tasks = read_json(ctx.out / "perceive" / "results.json")["summary"]["tasks"]

    def score(entry):
        return entry.get("value") if isinstance(entry, dict) else entry

    per_task, rows = {}, []
    for task, t in tasks.items():
        bv, ctl, orc = t.get("best_values") or {}, t.get("control_best_values") or {}, t.get("oracle") or {}
        chance = t.get("chance") or {}
        chance_best = max((v for v in (score(c) for c in chance.values()) if v is not None), default=None)
        per_task[task] = {
            "metric": t["primary_metric"], "best_values_rep": bv.get("rep"), "best_values": score(bv),
            "best_values_ci95": list(bv.get("ci") or [None, None]), "projector": score(t.get("projector")),
            "encoder": score(t.get("encoder")), "oracle": score(orc), "control_best_values": score(ctl),
            "chance": chance_best, "lm_gain": t.get("lm_gain"), "n_units": t.get("n_units"),
            "too_small": t.get("too_small"),
        }
        e = per_task[task]
        ci = (f"[{e['best_values_ci95'][0]:.3f}, {e['best_values_ci95'][1]:.3f}]"
              if None not in e["best_values_ci95"] else "")
        rows.append((task, e["metric"], f"{e['best_values_rep']}", e["best_values"], ci, e["projector"], e["encoder"],
                     e["control_best_values"], e["oracle"], e["chance"], e["n_units"]))
    figs = sorted((ctx.out / "perceive" / "figures").glob("*layers*.png"))
    sec = Section(
        "Perception from the image tokens' values",
        "Zero-shot readouts from the language model's image VALUE tokens, layer by layer (Liu et al., COLM 2025, "
        "arXiv 2510.04819; protocols in docs/perception.md) on synthetic scenes with exact masks, keypoints and "
        "clips: few-shot foreground segmentation (5-shot logistic classifier per token), co-segmentation "
        "(clusters shared by a set), text-query segmentation (the shape name's value against the image values) "
        "and keypoint correspondence (nearest neighbour); the prefix section below reads referring-expression "
        "segmentation, and `sightline perceive` adds label propagation through clips and every KV head. Beside each: the projector output (what the language model receives), the vision tower "
        "before the language model was trained on it (stage 1, the encoder baseline), the same architecture "
        "with random weights (control), the token-grid oracle (the ground truth moved onto the 8x8 tokens and "
        "back: the best any token-level readout can score) and chance. Intervals: bootstrap 95% over units.",
        tables=[("best values layer per task", ["task", "metric", "best values rep", "score", "95% interval",
                                                "projector", "encoder", "random-weight control", "oracle",
                                                "chance", "units"], rows)],
        images=[(str(f.relative_to(ctx.out)), f.stem.replace("_", " ")) for f in figs],
        links=[("perceive/index.html", "perception run page (every representation, layer and KV head)"),
               ("perceive/results.json", "results.json")],
    )
    return {"tasks": per_task, "warnings": res.summary.get("warnings", [])}, sec


KEYS_BLOCK_TOP_K = 4  # keys blocked per layer-head in the demo: the organism has few or none flagged (docs/kv.md)


def _keys_section(ctx: DemoContext) -> tuple[dict, Section]:
    from sightline.kv.run import KeysConfig, run_keys

    cfg = ctx.config
    kc = KeysConfig(out=str(ctx.out / "keys"), n_images=cfg.keys_images, block_top_k=KEYS_BLOCK_TOP_K,
                    block_layers="1-3", eval_scenes=cfg.keys_eval_scenes, eval_seed=cfg.seed,
                    readout_scenes=cfg.keys_readout_scenes, seed=cfg.seed, progress=cfg.progress)
    s = run_keys(kc, adapter=ctx.adapter).summary
    n_by_type = s.get("questions") or {}
    acc = s.get("accuracy") or {}
    fg = s.get("foreground_iou") or {}
    summary = {k: s.get(k) for k in ("n_images", "n_keys", "n_flagged", "share_flagged", "n_rope_only",
                                     "n_flagged_where_input_varies", "min_var_ratio", "threshold", "blocked",
                                     "n_blocked", "block_layers")}
    summary["accuracy"] = {c: {"all": a.get("all"), "n": n_by_type.get("all")} for c, a in acc.items()}
    summary["foreground_iou"] = fg
    rows = [(c, accuracy_text(a.get("all"), n_by_type.get("all")),
             *(f"{a[t]:.2f}" if a.get(t) is not None else "n/a" for t in ("shape", "colour", "count", "presence")))
            for c, a in acc.items()]
    fg_rows = [(c, *(f"{v:.3f}" for v in per.values())) for c, per in fg.items()]
    fg_layers = list(next(iter(fg.values()), {}))
    figs = [(f"keys/{f}", t) for f, t in (
        ("figures/flagged_share.png", "share of image keys flagged per layer and KV head"),
        ("figures/var_ratio_grid_keys.png", "var_ratio of the cached keys over the token grid (boxed: flagged)"),
        ("figures/key_pca.png", "PCA of two images' keys (the paper's Figure 4), flagged keys highlighted"),
        ("figures/accuracy_blocked.png", "answers with no block, the most agnostic keys blocked, random keys blocked"),
        ("figures/readout_blocked.png", "foreground probe on image values under each block"))
        if (ctx.out / "keys" / f).exists()]
    sec = Section(
        "Input-agnostic keys, and blocking them",
        f"For every layer, KV head and image-token position: how much of the key varies across "
        f"{s['n_images']} images (var_ratio: across-image variance over the layer-head's total key variance), for the "
        f"keys as cached (post-RoPE) and before RoPE; a key is flagged input-agnostic below {s['threshold']:g} "
        "(Liu et al., COLM 2025; docs/kv.md). Then the " + s["blocked"] + f" at layers {s['block_layers']} "
        f"({s['n_blocked']} keys) are blocked from the text and answer queries (an attention-mask edit), beside as many "
        "random image keys: the answers' accuracy, and a foreground probe on the image values (keys blocked from the "
        "image queries too), under each. The organism has few input-agnostic keys, so the demo blocks the most "
        "agnostic ones of every layer-head (--block-top-k).",
        figures={"image keys scanned": s["n_keys"], "flagged post-RoPE": s["n_flagged"]["keys"],
                 "flagged pre-RoPE": s["n_flagged"]["keys_prerope"], "flagged only post-RoPE (rotation)":
                 s["n_rope_only"], "lowest var_ratio (post-RoPE)": round(s["min_var_ratio"]["keys"], 4),
                 "keys blocked": s["n_blocked"]},
        tables=[("answers under each block (accuracy [Wilson 95%] over every question type, then per type)",
                 ["block", "all", "shape", "colour", "count", "presence"], rows)] + (
            [("foreground IoU of a per-token probe on values.L under each block",
              ["block", *[f"values.{L}" for L in fg_layers]], fg_rows)] if fg_rows else []),
        images=figs,
        links=[("keys/index.html", "keys run page"), ("keys/results.json", "results.json")],
    )
    return summary, sec


def _prefix_section(ctx: DemoContext) -> tuple[dict, Section]:
    from sightline.kv.prefix import PrefixConfig, run_prefix

    cfg = ctx.config
    s = run_prefix(PrefixConfig(out=str(ctx.out / "prefix"), task="refseg", synthetic_units=cfg.prefix_units,
                                kinds=("none", "neutral", "class", "expression"),
                                seed=cfg.seed, progress=cfg.progress), adapter=ctx.adapter).summary
    t = s["tasks"]["refseg"]
    summary = {"task": "refseg", "metric": t["primary_metric"], "n_units": t["n_units"], "none": t["none"],
               "kinds": t["kinds"], "warnings": s.get("warnings", [])}
    rows = []
    for kind, k in t["kinds"].items():
        big = k.get("largest_change") or {}
        ci = (f"[{big['ci_low']:+.3f}, {big['ci_high']:+.3f}]" if big.get("ci_low") is not None else "")
        rows.append((kind, k.get("prefix_example"), f"{k['mean_change']:+.3f}" if k.get("mean_change") is not None
                     else "n/a", big.get("rep"), f"{big['change']:+.3f}" if big else "n/a", ci,
                     f"{k['n_above_zero']} up / {k['n_below_zero']} down of {k['n_reps']}"))
    sec = Section(
        "Text before the image",
        f"Referring-expression segmentation read from the image values of every layer with no text before the image "
        "and with each prefix kind (a neutral sentence, the class name, the referring expression itself; "
        "`sightline prefix` adds the task's own sentence), "
        f"the same {t['n_units']} images for every kind; the change of the {t['primary_metric']} per layer, kind minus "
        "none, paired per image, with a bootstrap 95% interval (Liu et al.: a text prefix changes the image values "
        "and the readouts from them; docs/kv.md). Layer 0's values depend on their own token only, so no prefix "
        "can change them.",
        tables=[("change per prefix kind (the layer with the largest change, and how many layers' intervals exclude 0)",
                 ["prefix", "example", "mean change", "largest at", "change", "95% interval", "intervals"], rows)],
        images=[(f"prefix/{p.relative_to(ctx.out / 'prefix')}", p.stem.replace("_", " "))
                for p in sorted((ctx.out / "prefix" / "figures").glob("*.png"))],
        links=[("prefix/index.html", "prefix run page"), ("prefix/results.json", "results.json")],
    )
    return summary, sec


def _surfacing_section(ctx: DemoContext) -> tuple[dict, Section]:
    from sightline.kv.surfacing import SurfacingConfig, run_surfacing

    cfg = ctx.config
    s = run_surfacing(SurfacingConfig(
        out=str(ctx.out / "surfacing"), style_triples=cfg.surfacing_blink_questions,
        train_scenes=cfg.surfacing_train_scenes, test_scenes=cfg.surfacing_test_scenes,
        kinds="presence_shape,count_objects", subtasks="Visual_Correspondence,Multi-view_Reasoning", seed=cfg.seed,
        progress=cfg.progress), adapter=ctx.adapter).summary
    org = s.get("organism") or {}
    summary = {"organism": org, "subtasks": s.get("subtasks", {}), "warnings": s.get("warnings", [])}
    rows = [(kind, e["n"], accuracy_text(e["readout_accuracy"], e["n"]), e["best_rep"],
             accuracy_text(e["answer_accuracy"], e["n"]), f"{e['majority']:.2f}", f"{e['present_not_surfaced']:.2f}")
            for kind, e in org.items()]
    brow = [(name, e.get("readout_kind"), e["n"],
             accuracy_text(e.get("readout_accuracy"), e.get("n_readout") or e["n"])
             if e.get("readout_accuracy") is not None else "n/a", e.get("best_rep"),
             accuracy_text(e.get("answer_accuracy"), e["n"]), f"{e['chance']:.2f}",
             f"{e['present_not_surfaced']:.2f}" if e.get("present_not_surfaced") is not None else "n/a")
            for name, e in s.get("subtasks", {}).items()]
    sec = Section(
        "Present in the values, not surfaced in the answer",
        "Where a readout of the image representations is right and the model's own answer is wrong (Liu et al.: "
        "33.3% of BLINK Art Style questions). On the organism, with the world's ground truth: a logistic probe on the "
        f"pooled image values of every layer, fitted on {cfg.surfacing_train_scenes} scenes of 1-4 objects, answers "
        f"each presence and count question of {cfg.surfacing_test_scenes} held-out scenes beside the model's greedy "
        "answer; 'present, not surfaced' is the share the probe gets right and the answer wrong. Synthetic questions "
        "in BLINK's layout stand in for two of its subtasks, read with no training: Visual Correspondence (the "
        "candidate point, drawn on the second image, whose token's values are most similar to those under the drawn "
        "reference point) and Multi-view Reasoning (the sign of the median horizontal shift of mutually nearest "
        "tokens between the two frames). The organism was never taught lettered multi-image questions, so its "
        "answers there name no choice and count as wrong. On a real model `sightline surfacing --blink DIR` reads "
        "BLINK itself, every subtask (docs/kv.md).",
        tables=[("organism questions (best values layer; brackets: Wilson 95%)",
                 ["question kind", "questions", "readout accuracy", "layer", "answer accuracy", "majority answer",
                  "present, not surfaced"], rows),
                ("synthetic subtasks in BLINK's layout (best layer; brackets: Wilson 95%)",
                 ["subtask", "readout", "questions", "readout accuracy", "layer", "answer accuracy", "chance",
                  "present, not surfaced"], brow)],
        images=[(f"surfacing/{p.relative_to(ctx.out / 'surfacing')}", p.stem.replace("_", " "))
                for p in sorted((ctx.out / "surfacing" / "figures").glob("*.png"))],
        links=[("surfacing/index.html", "surfacing run page"), ("surfacing/results.json", "results.json")],
    )
    return summary, sec


def _kv_findings(summary: dict) -> list[str]:
    """Sentences on the keys, prefix and surfacing sections, from their summaries."""
    out = []
    k = summary.get("keys") or {}
    if k.get("n_keys"):
        acc = k.get("accuracy") or {}
        text = (f"{k['n_flagged']['keys']} of {k['n_keys']} image keys are input-agnostic as cached (var_ratio under "
                f"{k['threshold']:g} over {k['n_images']} scenes; lowest {k['min_var_ratio']['keys']:.3f}), "
                f"{k['n_flagged']['keys_prerope']} before RoPE; {k['n_flagged_where_input_varies']} of them sit where the "
                "language model's input itself varies")
        if {"none", "agnostic", "random"} <= set(acc):
            n_q = acc["none"]["n"]
            text += (f". Blocking the {k['n_blocked']} most agnostic keys from the text moves answer accuracy from "
                     f"{acc['none']['all']:.2f} to {acc['agnostic']['all']:.2f} (as many random keys: "
                     f"{acc['random']['all']:.2f}; {n_q} questions, one answer = {1 / n_q:.3f}).")
        else:
            text += "."
        out.append(text)
    p = summary.get("prefix") or {}
    if p.get("kinds"):
        big = max(p["kinds"].items(), key=lambda kv: abs((kv[1].get("largest_change") or {}).get("change", 0.0)))
        bc = big[1].get("largest_change") or {}
        up = sum(e["n_above_zero"] for e in p["kinds"].values())
        down = sum(e["n_below_zero"] for e in p["kinds"].values())
        n_int = sum(e["n_reps"] for e in p["kinds"].values())
        verdict = ("no prefix moves the referring-expression readout beyond its 95% interval" if up + down == 0 else
                   f"of {n_int} (prefix, layer) changes of the referring-expression readout, {up} have a 95% interval "
                   f"above zero and {down} below")
        out.append(f"Text before the image: {verdict}; the largest change is {bc.get('change', 0):+.3f} ({big[0]} "
                   f"prefix at {bc.get('rep')}, interval [{bc.get('ci_low', 0):+.3f}, {bc.get('ci_high', 0):+.3f}], "
                   f"{p['n_units']} images; Liu et al. report gains on real models).")
    org = (summary.get("surfacing") or {}).get("organism") or {}
    pres = org.get("presence_shape")
    if pres:
        out.append(f"Present, not surfaced: a probe on the pooled values ({pres['best_rep']}) answers 'Is there a "
                   f"<shape>?' {pres['readout_accuracy']:.0%} right where the organism's own answer is "
                   f"{pres['answer_accuracy']:.0%} right (majority answer {pres['majority']:.0%}): for "
                   f"{pres['present_not_surfaced']:.0%} of {pres['n']} questions the values hold the answer the model "
                   "does not give (Liu et al.: 33.3% of BLINK Art Style).")
    return out


def findings(summary: dict) -> list[str]:
    """The page's opening sentences, each computed from the summary of this run (no number is fixed here)."""
    out = []
    org, pr, st, sae = (summary.get(k, {}) for k in ("organism", "probes", "steer", "sae"))
    probe_sites = pr.get("sites", {})
    if st.get("best_site"):
        best, flips = st["best_site"], st.get("max_flip_rate_by_site", {})
        text = (f"Steering works at {best}: adding k = {st['best_scale']:g} times the shape direction at the image "
                f"tokens flips {st['flip_rate']:.0%} of answers to the target shape (clean {st['clean_flip_rate']:.0%}), "
                f"while colour answers stay {st['damage_accuracy']:.0%} right.")
        if st.get("judged_target_rate") is not None:
            text += (f" Asked itself which of four shapes each steered answer names (beside a blank image), the "
                     f"unsteered model picks the target for {st['judged_target_rate']:.0%} of them (clean answers: "
                     f"{st.get('clean_judged_target_rate') or 0:.0%}).")
        fail = {s: v for s, v in flips.items() if s != best and v is not None and v < 0.5}
        if fail:
            accs = [probe_sites[s]["test_top1"] for s in fail if s in probe_sites]
            text += (f" At {', '.join(fail)} it does not (highest flip rate at any k: "
                     f"{max(fail.values()):.0%})")
            text += (f", although the probe still reads the shape from those layers' image tokens "
                     f"({min(accs):.2f}-{max(accs):.2f})" if accs else "")
            if best.endswith(".0") and all(not s.endswith(".0") for s in fail):
                text += (": an edit at resid.L changes the image tokens from block L on, but the text positions "
                         "have already read the clean shape from the image in the blocks before L, and the answer "
                         "reads it from there (on the organism, after block 0; tests/test_steer.py).")
            else:
                text += "."
        out.append(text)
    if pr.get("best_site"):
        n = pr["split_sizes"]["test"]
        lo, hi = pr["best_top1_ci95"]
        accs = {s: m["test_top1"] for s, m in probe_sites.items()}
        worst = min(accs, key=accs.get) if accs else None
        text = (f"Shape is linearly decodable from the image tokens: the best probe layer is {pr['best_site']} with "
                f"held-out top-1 {pr['best_top1']:.2f} (95% interval {lo:.2f}-{hi:.2f}, {n} test images) against "
                f"chance {pr['chance']['uniform']:.3f} (1/{len(pr['classes'])}) and a control task at "
                f"{pr['best_control_top1']:.2f}")
        text += (f"; the weakest site, {worst}, still reads {accs[worst]:.2f}." if worst and worst != pr["best_site"]
                 else ".")
        out.append(text)
    curve = sae.get("shared_by_layer") or []
    if len(curve) >= 2:
        lo, hi = curve[0], curve[-1]
        peak = max(curve, key=lambda c: c["shared"])
        trend = ("rises" if hi["shared"] > lo["shared"] else "falls" if hi["shared"] < lo["shared"] else "stays")
        text = (f"SAE features shared between image and text tokens: {lo['shared']:.0%} of live latents at "
                f"{lo['site']} ({lo['image_only']:.0%} image-only), {hi['shared']:.0%} at {hi['site']} "
                f"({hi['image_only']:.0%} image-only); sharing {trend} with depth")
        text += (f", peaking at {peak['site']} ({peak['shared']:.0%})."
                 if peak['shared'] > max(lo["shared"], hi["shared"]) + 0.01 else ".")
        out.append(text)
    spliced = [(e["site"], (e.get("task_accuracy") or {}).get("shape")) for e in sae.get("saes", [])]
    spliced = [(site, r) for site, r in spliced if r and r.get("sae") is not None]
    if spliced:
        site, r = spliced[0]
        out.append(f"With the {site} SAE's reconstruction spliced in at the image positions the organism still names "
                   f"{r['sae']:.0%} of shapes (clean {r['clean']:.0%}, zeros there {r['zero']:.0%}, chance "
                   f"{r['chance']:.0%}; {r['n']} questions).")
    out += _perception_findings(summary.get("perception", {}).get("tasks", {}))
    out += _kv_findings(summary)
    acc, ci, chance = org.get("accuracy", {}), org.get("accuracy_ci95", {}), org.get("chance", {})
    above, at = [], []
    for t, a in acc.items():
        c = chance.get(t) or {}
        if c.get("uniform") is None:
            continue
        floor = max(c["uniform"], c.get("majority") or 0)
        part = f"{t} {a:.2f} [{ci[t][0]:.2f}, {ci[t][1]:.2f}] vs chance {c['uniform']:.3g}"
        if (c.get("majority") or 0) > c["uniform"]:
            part += f" (majority answer {c['majority']:.2f})"
        (above if ci[t][0] > floor else at).append(part)
    if above:
        out.append("The organism answers above chance on " + "; ".join(above) + " (accuracy [Wilson 95% interval], "
                   f"{org.get('eval_n')} scenes per set).")
    if at:
        out.append("Not distinguishable from chance (the interval reaches the uniform or majority-answer level): "
                   + "; ".join(at) + ".")
    return out



def _perception_findings(tasks: dict) -> list[str]:
    """One sentence on where the values support perception, from the perception section's summary."""
    if not tasks:
        return []
    beats, loses = [], []
    for task, e in tasks.items():
        if e.get("best_values") is None:
            continue
        part = f"{task} {e['best_values']:.2f} at {e['best_values_rep']}"
        ref = [f"control {e['control_best_values']:.2f}" if e.get("control_best_values") is not None else None,
               f"projector {e['projector']:.2f}" if e.get("projector") is not None else None,
               f"oracle {e['oracle']:.2f}" if e.get("oracle") is not None else None]
        part += " (" + ", ".join(r for r in ref if r) + ")"
        ctl, low = e.get("control_best_values"), (e.get("best_values_ci95") or [None])[0]
        (beats if ctl is None or (low if low is not None else e["best_values"]) > ctl else loses).append(part)
    out = []
    if beats:
        out.append("The image tokens' values support zero-shot perception above the random-weight control (the "
                   "best values layer's 95% interval lies above the control's best) on "
                   + "; ".join(beats) + " (primary metric per task; docs/perception.md).")
    if loses:
        out.append("They do not clearly beat the random-weight control on " + "; ".join(loses)
                   + ": there the readout finds little more in the trained values than in random features.")
    small = [t for t, e in tasks.items() if e.get("too_small")]
    if small:
        n = min(tasks[t]["n_units"] for t in small)
        out.append(f"The perception figures rest on as few as {n} units per task ({', '.join(small)}): too few to "
                   "mean much (raise --perception-units).")
    return out


# Sections that analyses add: name -> function(ctx) -> (summary dict, Section). Run in this order.
SECTIONS: list[tuple[str, Callable[[DemoContext], tuple[dict, Section]]]] = [
    ("organism", _organism_section),
    ("store", _store_section),
    ("probes", _probe_section),
    ("steer", _steer_section),
    ("sae", _sae_section),
    ("perception", _perception_section),
    ("keys", _keys_section),
    ("prefix", _prefix_section),
    ("surfacing", _surfacing_section),
]


def run_demo(config: DemoConfig | None = None, **overrides) -> dict:
    """Run the demo; returns the summary (also written to OUT/summary.json next to OUT/index.html)."""
    from dataclasses import replace

    cfg = replace(config or DemoConfig(), **overrides)
    _check_config(cfg)  # before anything is created
    import torch

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_demo(cfg)
    finally:
        torch.set_num_threads(threads)


def _run_demo(cfg: DemoConfig) -> dict:
    from sightline.config import save_config
    from sightline.data.synthetic import WorldConfig, export_jsonl
    from sightline.extract import ExtractConfig, extract
    from sightline.models import load_model
    from sightline.organism import checkpoint_path

    out = Path(cfg.out)
    _prepare_out(out)
    save_config(cfg, out / "config.json")  # `sightline demo --config OUT/config.json` reruns it
    t0 = time.perf_counter()
    model_path = cfg.model or str(checkpoint_path())
    adapter = load_model(model_path, progress=cfg.progress)
    manifest = export_jsonl(out / "data", seed=cfg.seed, n=cfg.n, config=WorldConfig(n_objects=1),
                            qtypes=DEMO_QTYPES, per_image=1, progress=cfg.progress)
    t_extract = time.perf_counter()
    store = extract(ExtractConfig(model=model_path, data=str(manifest), out=str(out / "store"),
                                  sites="resid,keys,values", positions="all", batch_size=32, progress=cfg.progress))
    extract_seconds = round(time.perf_counter() - t_extract, 2)
    ctx = DemoContext(cfg, out, adapter, model_path, Path(store), manifest)
    summary: dict = {"sightline_demo": {"config": asdict(cfg)}}
    sections: list[Section] = []
    for name, fn in SECTIONS:
        t = time.perf_counter()
        part, sec = fn(ctx)
        # the store's time is the extraction's wall time (its section only opens the store)
        part["seconds"] = extract_seconds if name == "store" else round(time.perf_counter() - t, 2)
        summary[name] = part
        sections.append(sec)
    summary["findings"] = findings(summary)
    summary["sightline_demo"]["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(out / "summary.json", summary)
    top = Section("What this run shows", "Computed from this run's numbers (summary.json, key findings); the "
                  "sections below give the detail.", html=bullets(summary["findings"]), anchor="findings")
    write_page(out / "index.html", "sightline demo",
               f"The model organism, {cfg.n} held-out scenes, every analysis of the toolkit "
               f"({summary['sightline_demo']['seconds']:.0f} s wall).", [top, *sections])
    print(f"demo: report in {out}/index.html, headline numbers in {out}/summary.json")
    return summary

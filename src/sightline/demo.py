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
from sightline.report.html import Section, Thumb, write_page

MARKER = ".sightline-demo"
DEMO_QTYPES = ("shape", "colour", "size", "position", "presence", "count")


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs on (defaults: the shipped organism, a few minutes on 2 CPU cores)."""

    out: str = "sightline-demo"
    """output folder (replaced when it is an earlier demo folder)"""
    n: int = 320
    """held-out single-object scenes in the store"""
    seed: int = 7
    """scene seed of the held-out data (training drew from seed 0's "train" stream)"""
    eval_n: int = 60
    """scenes per set for the accuracy table (see sightline.organism.evaluate)"""
    model: str | None = None
    """a checkpoint folder; None = the shipped organism"""
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
    for name, least in (("n", 1), ("eval_n", 1)):
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


def _organism_section(ctx: DemoContext) -> tuple[dict, Section]:
    from sightline.organism.evaluate import evaluate

    cfg = ctx.config
    res = evaluate(ctx.adapter, seed=cfg.seed, n=cfg.eval_n, progress=cfg.progress)
    write_json(ctx.out / "organism_eval.json", res)
    ad = ctx.adapter
    summary = {
        "model": ctx.model_path,
        "n_layers": ad.n_layers,
        "hidden_size": ad.hidden_size,
        "image_tokens": 64,
        "eval_seed": cfg.seed,
        "eval_n": cfg.eval_n,
        "accuracy": res["accuracy"],
    }
    rows = [(t, res["count"][t], res["accuracy"][t]) for t in res["accuracy"]]
    ex = [(t, e["question"], e["answer"], e["generated"]) for t, es in res["examples"].items() for e in es[:1]]
    sec = Section(
        "The model organism",
        f"A {ad.n_layers}-layer LLaVA trained from scratch on the synthetic world, asked about fresh scenes "
        f"(seed {cfg.seed}); an answer counts when the greedy generation equals the true answer.",
        tables=[("accuracy per question type", ["question type", "questions", "accuracy"], rows),
                ("one example per type", ["type", "question", "answer", "generated"], ex)],
        links=[("organism_eval.json", "organism_eval.json")],
    )
    return summary, sec


def _store_section(ctx: DemoContext) -> tuple[dict, Section]:
    from sightline.store import ActivationStore

    s = ActivationStore.open(ctx.store_path)
    idx = s.index
    from sightline.models.layout import MODALITIES

    mods = {m: int((idx["modality"] == k).sum()) for k, m in enumerate(MODALITIES)}
    summary = {"path": str(ctx.store_path.relative_to(ctx.out)), "examples": len(s), "tokens": s.n_tokens,
               "tokens_by_modality": mods, "sites": s.sites}
    sec = Section("Activations", "Residual stream entering every block (and the last block's output), keys and "
                  "values of every layer, over every token of each held-out example.",
                  figures={"examples": len(s), "tokens": s.n_tokens, **{f"{m} tokens": n for m, n in mods.items()},
                           "sites": len(s.sites)})
    return summary, sec


def _probe_section(ctx: DemoContext) -> tuple[dict, Section]:
    from sightline.probes.run import ProbeConfig, run_probes

    res = run_probes(ProbeConfig(store=str(ctx.store_path), label="facts.objects.0.shape", out=str(ctx.out / "probes"),
                                 progress=ctx.config.progress))
    keep = ("best_site", "best_top1", "best_top5", "best_control_top1", "best_selectivity", "chance", "classes",
            "split_sizes", "sites")
    summary = {k: res[k] for k in keep if k in res}
    rows = [(site, m.get("test_top1"), m.get("test_top5"), m.get("control_test_top1"), m.get("selectivity"))
            for site, m in res["sites"].items()]
    sec = Section(
        "Linear probes: which shape is in the image",
        "Multinomial logistic regression on the mean of the image tokens at every site, L2 chosen on a validation "
        "split, scored on held-out images; the control task (labels reassigned at random per image, Hewitt & "
        "Liang) shows how much a probe could memorise.",
        figures={k: summary[k] for k in ("best_site", "best_top1", "best_top5", "best_control_top1", "best_selectivity")
                 if k in summary},
        tables=[("held-out accuracy per site", ["site", "top-1", "top-5", "control top-1", "selectivity"], rows)],
        images=[("probes/figures/accuracy_vs_layer.png", "accuracy vs layer")],
        links=[("probes/index.html", "probe run page"), ("probes/results.json", "results.json")],
    )
    return summary, sec


def _steer_section(ctx: DemoContext) -> tuple[dict, Section]:
    from sightline.data.synthetic import WorldConfig, export_imagefolder
    from sightline.steer import SteerConfig, headline, run_steering

    cfg = ctx.config
    data = export_imagefolder(ctx.out / "steer_data", seed=cfg.seed + 1, n=240, config=WorldConfig(n_objects=1),
                              attribute="shape")
    res = run_steering(SteerConfig(
        model=ctx.model_path, directions=str(ctx.store_path), label="facts.objects.0.shape", data=str(data),
        out=str(ctx.out / "steer"), pairs=("circle:star", "square:heart"), layers="0,1,2,3",
        scales=(0, 2, 4, 6, 8, 10, 12), images_per_class=20, batch_size=64, max_new_tokens=8, progress=cfg.progress))
    h = headline(res)
    figs = sorted((ctx.out / "steer" / "figures").glob("*.png"))
    examples = _steer_examples(ctx.out, ctx.out / "steer" / "generations.jsonl", h.get("best_site"),
                               h.get("best_scale"))
    sec = Section(
        "Steering: add a shape direction at the image tokens",
        "v = difference of class means (target minus source) of the mean-pooled image tokens at resid.L, unit "
        "norm; k * v is added at the image positions during the prefill only, then the answer is generated "
        "greedily from the edited KV cache (Line of Sight's protocol). Flip rate: the free answer to "
        "'What shape is shown?' names the target; damage: accuracy on the colour question of the same images.",
        figures={k: h[k] for k in ("best_site", "best_scale", "flip_rate", "efficacy", "damage_accuracy",
                                   "caption_nll_increase", "clean_flip_rate", "clean_damage_accuracy") if k in h},
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
        folders += train_saes(SAETrainConfig(
            store=str(ctx.store_path), site=f"resid.{L}", out=str(ctx.out / "sae" / f"resid.{L}"), modality="both",
            batch_size=1024, epochs=12, saes=(SAEConfig(arch="topk", width=256, k=16),)), progress=cfg.progress)["paths"]
    res = analyze_sae(SAEAnalyzeConfig(saes=tuple(str(f) for f in folders), store=str(ctx.store_path),
                                       out=str(ctx.out / "sae-analysis"), n_loss=32, n_features=12,
                                       progress=cfg.progress))
    keep = ("site", "fvu_image", "fvu_text", "l0_image", "l0_text", "frac_dead", "loss_recovered", "image_only",
            "text_only", "shared", "probe_coverage")
    per_sae = [{k: e.get(k) for k in keep} for e in res["saes"]]
    summary = {"shared_by_layer": res["shared_by_layer"], "saes": per_sae}
    sec = Section(
        "Sparse autoencoders on image and text tokens",
        "A TopK SAE (256 latents, k = 16) per layer on the residual stream over image and text tokens. A latent is "
        "image-only or text-only when at least 90% of its mean activation per token falls on that modality, "
        "shared otherwise (docs/report.md); loss recovered splices the reconstruction in at the image positions.",
        tables=[("per layer", ["site", "FVU image", "FVU text", "L0 image", "dead", "loss recovered", "image-only",
                               "text-only", "shared"],
                 [(e["site"], e["fvu_image"], e["fvu_text"], e["l0_image"], e["frac_dead"], e["loss_recovered"],
                   e["image_only"], e["text_only"], e["shared"]) for e in per_sae])],
        images=[("sae-analysis/figures/shared_by_layer.png", "shared fraction of latents per layer")],
        links=[("sae-analysis/index.html", "feature pages (top image tokens as heatmaps, top text contexts)"),
               ("sae-analysis/results.json", "results.json")],
    )
    return summary, sec


# Sections that analyses add: name -> function(ctx) -> (summary dict, Section). Run in this order.
SECTIONS: list[tuple[str, Callable[[DemoContext], tuple[dict, Section]]]] = [
    ("organism", _organism_section),
    ("store", _store_section),
    ("probes", _probe_section),
    ("steer", _steer_section),
    ("sae", _sae_section),
]


def run_demo(config: DemoConfig | None = None, **overrides) -> dict:
    """Run the demo; returns the summary (also written to OUT/summary.json next to OUT/index.html)."""
    from dataclasses import replace

    from sightline.data.synthetic import WorldConfig, export_jsonl
    from sightline.extract import ExtractConfig, extract
    from sightline.models import load_model
    from sightline.organism import checkpoint_path

    cfg = replace(config or DemoConfig(), **overrides)
    _check_config(cfg)  # before anything is created
    out = Path(cfg.out)
    _prepare_out(out)
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
    summary["sightline_demo"]["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(out / "summary.json", summary)
    write_page(out / "index.html", "sightline demo",
               f"The model organism, {cfg.n} held-out scenes, every analysis of the toolkit "
               f"({summary['sightline_demo']['seconds']:.0f} s).", sections)
    print(f"demo: report in {out}/index.html, figures in {out}/summary.json")
    return summary

"""The keys job: find input-agnostic image keys, then block them (and as many random keys) and measure the effects.

`run_keys(KeysConfig(...))` loads the model (default: the shipped organism), streams `n_images` images (a folder,
or scenes of the synthetic world) through `scan_keys`, flags keys by var_ratio < `threshold` for post- and
pre-RoPE keys, then blocks the flagged keys of `block_kind` at `block_layers` (or, with `block_top_k`, the k most
agnostic keys of every layer-head there) and as many random image keys, and measures on the organism the
accuracy per question type of its answers and a foreground probe on later layers' image values; with `bench`, on
any model, the accuracy per task of a multiple-choice benchmark under each block set (`sightline.kv.bench`). Writes
OUT/{config.json, results.json, figures/, index.html} whole or not at all (docs/outputs.md, docs/kv.md).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sightline.config import ConfigIO, to_dict
from sightline.errors import UserError
from sightline.kv.keys import FLAG_THRESHOLD, KINDS
from sightline.report.files import RunFolder, RunResult, check_output, write_json


@dataclass(frozen=True)
class KeysConfig(ConfigIO):
    """Everything a keys run depends on (saved as OUT/config.json)."""

    model: str | None = None
    """Model folder or Hugging Face id; default: the shipped model organism."""
    data: str | None = None
    """A folder of images (scanned recursively, sorted); default: scenes of the synthetic world."""
    out: str = "keys"
    """Output folder (config.json, results.json, figures/, index.html)."""
    n_images: int = 64
    """Images the statistics are taken over."""
    image_size: int | None = None
    """Resize every image to this square size first (models whose token grid follows the image size need one
    size); default: as they are (synthetic scenes: the model's own image size)."""
    prompt: str = ""
    """Text after the image (the same for every image)."""
    prefix: str | None = None
    """Text before the image."""
    layers: str = "all"
    """Layers scanned: all, 0,4,8 or 4-12."""
    threshold: float = FLAG_THRESHOLD
    """A key is input-agnostic when its across-image variance is below this share of its layer-head's total key
    variance (var_ratio, docs/kv.md)."""
    block_kind: str = "keys"
    """Which flags are blocked: keys (post-RoPE, as cached) or keys_prerope."""
    block_layers: str = "all"
    """Layers whose keys are blocked (among the scanned ones)."""
    block_top_k: int = 0
    """0: block the flagged keys; k > 0: block the k keys of lowest var_ratio of every layer-head of block_layers
    (for a model with few or none flagged)."""
    bench: str | None = None
    """A multiple-choice benchmark answered with no block, the blocked keys and the random control (any model):
    a BLINK folder, a CV-Bench folder or file (parquet / JSONL), or a plain JSONL (docs/kv.md)."""
    bench_format: str = "cvbench"
    """Layout of --bench: blink, cvbench or jsonl (image or images, question, choices, answer, optional task a line)."""
    bench_n: int | None = None
    """At most this many questions per benchmark task (default: all)."""
    bench_subtasks: str = "all"
    """BLINK subtasks: all (every one found; several images per question are shown in one prompt, the block
    applied to each image's grid) or a comma list."""
    bench_prompt: str = "prompt"
    """What follows the question's images: prompt (the question with lettered choices) or question (the bare
    question, for a model that answers in words, e.g. the organism); the choice is parsed from the greedy answer."""
    image_queries: bool = False
    """Block the keys from later image queries too in the answer and benchmark studies (every image token after the
    key, other images' included; the perception readout always does: image values cannot change otherwise)."""
    eval_scenes: int = 20
    """Organism only: scenes per set for the answer accuracy per question type (0: no answer study)."""
    eval_seed: int = 1
    """Organism only: seed of the answer study's scenes."""
    readout_scenes: int = 40
    """Organism only: synthetic scenes for the foreground readout (half fit, half scored; 0: none)."""
    readout_layers: str = "all"
    """Layers whose image values the foreground readout reads."""
    pca_layer: int | None = None
    """Layer of the PCA figure; default: the layer-head with the most flagged keys (else the last layer)."""
    seed: int = 0
    """Seeds the synthetic scenes and the random control."""
    batch_size: int = 16
    """Images per forward."""
    model_dtype: str = "auto"
    """auto (bfloat16 on GPU, float32 on CPU), float32, float16 or bfloat16."""
    device: str = "auto"
    """auto (CUDA if available), cpu, cuda:0."""
    overwrite: bool = False
    """Replace an existing output folder."""
    progress: bool = True
    """Show progress bars."""



def _check(cfg: KeysConfig) -> None:
    if cfg.n_images < 2:
        raise UserError(f"--n-images must be at least 2, not {cfg.n_images}")
    if not 0 < cfg.threshold < 1:
        raise UserError(f"--threshold must be in (0, 1), not {cfg.threshold}")
    if cfg.block_kind not in KINDS:
        raise UserError(f"--block-kind {cfg.block_kind!r}: choose keys or keys_prerope")
    for name in ("block_top_k", "eval_scenes", "readout_scenes"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more, not {getattr(cfg, name)}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {cfg.batch_size}")
    if cfg.readout_scenes == 1:
        raise UserError("--readout-scenes must be 0 or at least 2 (half fit, half scored)")
    if cfg.data is not None and not Path(cfg.data).expanduser().is_dir():
        raise UserError(f"--data {cfg.data} is not a folder; give a folder of images")
    if cfg.bench_format not in ("blink", "cvbench", "jsonl"):
        raise UserError(f"--bench-format {cfg.bench_format!r}: choose blink, cvbench or jsonl")
    if cfg.bench_prompt not in ("prompt", "question"):
        raise UserError(f"--bench-prompt {cfg.bench_prompt!r}: choose prompt or question")
    if cfg.bench_n is not None and cfg.bench_n < 1:
        raise UserError(f"--bench-n must be at least 1, not {cfg.bench_n}")
    if cfg.image_size is not None and cfg.image_size < 8:
        raise UserError(f"--image-size must be at least 8 pixels, not {cfg.image_size}")


def _images(cfg: KeysConfig, size: int) -> Iterator:
    """The scan's images, one at a time (memory does not grow with n_images)."""
    from sightline.data.synthetic import WorldConfig, derive_seed, render_scene

    if cfg.data is None:
        world = WorldConfig(image_size=cfg.image_size or size)
        for i in range(cfg.n_images):
            yield render_scene(derive_seed(cfg.seed, "keys", i), world).to_pil()
        return
    from sightline.data.images import is_image_file, load_image

    files = sorted(p for p in Path(cfg.data).expanduser().rglob("*") if p.is_file() and is_image_file(p.name))
    if len(files) < cfg.n_images:
        raise UserError(f"--data {cfg.data} holds {len(files)} images, fewer than --n-images {cfg.n_images}")
    for p in files[: cfg.n_images]:
        im = load_image(p)
        yield im.resize((cfg.image_size, cfg.image_size)) if cfg.image_size else im


def _is_organism(cfg: KeysConfig) -> bool:
    from sightline.organism import checkpoint_path

    if cfg.model is None:
        return True
    try:
        return Path(cfg.model).expanduser().resolve() == checkpoint_path().resolve()
    except (UserError, OSError):
        return False


def run_keys(cfg: KeysConfig, adapter=None) -> RunResult:
    """Scan, flag, block and measure (module docstring); `adapter`: an already loaded model (else cfg.model)."""
    from sightline.capture import parse_layers
    from sightline.kv.block import (
        answer_accuracy,
        foreground_readout,
        lowest_keys,
        random_block_set,
    )
    from sightline.kv.keys import scan_keys

    _check(cfg)
    out = check_output(cfg.out, cfg.overwrite, UserError)
    t0 = time.time()
    organism = _is_organism(cfg) if adapter is None else False
    if adapter is None:
        from sightline.models import load_model
        from sightline.organism import checkpoint_path
        from sightline.runtime import resolve_placement

        device, dtype = resolve_placement(cfg.device, cfg.model_dtype, None)
        adapter = load_model(cfg.model or str(checkpoint_path()), dtype=dtype, device=device, progress=cfg.progress)
    elif cfg.model is None:
        organism = True  # an adapter passed with no model named: taken to be the organism (the demo, tests)
    layers = [L for L in parse_layers(cfg.layers, adapter.n_layers) if L in adapter.kv_layers]
    if not layers:
        raise UserError(f"no layer with keys in --layers {cfg.layers}")
    size = int(getattr(adapter.config.vision_config, "image_size", 336) or 336)
    warnings: list[str] = []
    bench = None if cfg.bench is None else _load_bench(cfg, adapter, warnings)
    scan = scan_keys(adapter, _images(cfg, size), prompt=cfg.prompt, prefix=cfg.prefix, layers=layers,
                     batch_size=cfg.batch_size, progress=cfg.progress, total=cfg.n_images)
    t_scan = time.time() - t0
    flags = {k: scan.flags(k, cfg.threshold) for k in scan.kinds}
    share = {k: f.mean(-1) for k, f in flags.items()}
    rope_only = flags["keys"] & ~flags["keys_prerope"]
    input_low = scan.input_stats["var_ratio"][0, 0] < cfg.threshold  # [P]: the input itself barely varies there
    block_layers = [L for L in parse_layers(cfg.block_layers, adapter.n_layers) if L in layers]
    if cfg.block_top_k:
        at = [layers.index(L) for L in block_layers]
        block = lowest_keys(scan.stats[cfg.block_kind]["var_ratio"][at], block_layers, min(cfg.block_top_k, len(scan.positions)))
        block_what = f"the {cfg.block_top_k} keys of lowest var_ratio ({cfg.block_kind}) of every layer-head"
    else:
        block = {lh: p for lh, p in scan.flagged_positions(cfg.block_kind, cfg.threshold).items() if lh[0] in block_layers}
        block_what = f"the flagged {cfg.block_kind} (var_ratio < {cfg.threshold:g})"
    n_blocked = int(sum(len(v) for v in block.values()))
    control = random_block_set(block, len(scan.positions), cfg.seed,
                               exclude=scan.flagged_positions(cfg.block_kind, cfg.threshold) if not cfg.block_top_k else block)
    effects: dict = {}
    if not n_blocked:
        warnings.append(f"no keys to block: none flagged at var_ratio < {cfg.threshold:g} in layers {block_layers}; "
                        "--block-top-k K blocks the K most agnostic keys of every layer-head")
    if cfg.bench is not None:
        effects["bench"] = _bench(cfg, adapter, bench, {"none": {}, "agnostic": block, "random": control},
                                  len(scan.positions))
    if n_blocked and not organism and cfg.bench is None:
        warnings.append("the answer and perception effects are measured on the organism only (its synthetic questions"
                        " and masks); this run reports the detection and the block sets (--bench PATH: a multiple-choice"
                        " benchmark)")
    elif n_blocked and organism:
        from sightline.data.synthetic import WorldConfig, derive_seed, render_scene
        from sightline.organism.evaluate import eval_items

        conds = {"none": {}, "agnostic": block, "random": control}
        if cfg.eval_scenes:
            items = eval_items(cfg.eval_seed, cfg.eval_scenes, size)
            effects["questions"] = dict(Counter(qtype for *_, qtype in items), all=len(items))
            effects["accuracy"] = answer_accuracy(adapter, items, conds, image_queries=cfg.image_queries,
                                                  batch_size=max(cfg.batch_size, 32))
        if cfg.readout_scenes:
            rl = [L for L in parse_layers(cfg.readout_layers, adapter.n_layers) if L in adapter.kv_layers]
            scenes = [render_scene(derive_seed(cfg.seed, "keys-readout", i), WorldConfig(image_size=size))
                      for i in range(cfg.readout_scenes)]
            effects["foreground_iou"] = foreground_readout(adapter, scenes, rl, conds, batch_size=cfg.batch_size)
    stats = {k: {s: scan.stats[k][s] for s in ("var_ratio", "image_share", "cosine", "norm", "cos_to_grand")}
             for k in scan.kinds}
    n_flag = {k: int(f.sum()) for k, f in flags.items()}
    summary = {
        "out": str(out), "model": cfg.model or "organism", "n_images": scan.n_images, "layers": layers,
        "grid_hw": list(scan.grid_hw), "threshold": cfg.threshold, "n_keys": int(flags["keys"].size),
        "n_flagged": n_flag, "share_flagged": {k: float(f.mean()) for k, f in flags.items()},
        "n_rope_only": int(rope_only.sum()),
        "n_flagged_where_input_varies": int((flags["keys"] & ~input_low[None, None]).sum()),
        "min_var_ratio": {k: float(scan.stats[k]["var_ratio"].min()) for k in scan.kinds},
        "blocked": block_what, "n_blocked": n_blocked, "block_layers": block_layers,
        "image_queries": cfg.image_queries, "organism": organism,
        "accuracy": effects.get("accuracy"), "questions": effects.get("questions"),
        "bench": None if "bench" not in effects else {
            "path": cfg.bench, "format": cfg.bench_format, "prompt": cfg.bench_prompt,
            "n_questions": effects["bench"]["tasks"]["all"]["none"]["n"],
            "accuracy": {c: {t: v[c]["accuracy"] for t, v in effects["bench"]["tasks"].items()}
                         for c in effects["bench"]["conditions"]},
            "changed": {c: effects["bench"]["tasks"]["all"][c]["changed"] for c in effects["bench"]["conditions"]}},
        "foreground_iou": {c: {str(L): v for L, v in per.items()} for c, per in effects["foreground_iou"].items()}
        if "foreground_iou" in effects else None,
        "scan_seconds": round(t_scan, 3), "seconds": None, "warnings": warnings,
    }
    with RunFolder(out, overwrite=cfg.overwrite) as tmp:
        write_json(tmp / "config.json", to_dict(cfg))
        figs = _figures(tmp, scan, flags, share, cfg, effects)
        summary["seconds"] = round(time.time() - t0, 3)
        results = {"summary": summary, "share_flagged_lh": share, "position_share_lh":
                   {k: scan.stats[k]["position_share"] for k in scan.kinds},
                   "total_variance_lh": {k: scan.stats[k]["total"] for k in scan.kinds},
                   "stats": stats, "input_var_ratio": scan.input_stats["var_ratio"][0, 0],
                   "flagged": {k: {f"{L}.{h}": v for (L, h), v in scan.flagged_positions(k, cfg.threshold).items()}
                               for k in scan.kinds},
                   "block": {f"{L}.{h}": v for (L, h), v in block.items()},
                   "control": {f"{L}.{h}": v for (L, h), v in control.items()}, "figures": figs,
                   "bench": effects.get("bench")}
        write_json(tmp / "results.json", results)
        _write_page(tmp, cfg, summary)
    return RunResult(out, summary)


def _load_bench(cfg: KeysConfig, adapter, warnings: list[str]) -> dict:
    """The questions of --bench, read before the scan; a model that cannot lay out several images in one prompt
    (LLaVA-OneVision) has the multi-image subtasks left out with a warning, or refused when named."""
    from sightline.data.cvbench import load_bench
    from sightline.kv.block import left_padded

    named = None if cfg.bench_subtasks.strip() in ("", "all") else [s.strip() for s in cfg.bench_subtasks.split(",")
                                                                      if s.strip()]
    bench = load_bench(cfg.bench, cfg.bench_format, cfg.bench_n, named)
    multi = sorted(t for t, qs in bench.items() if any(q.n_images > 1 for q in qs))
    if multi:
        q = next(q for q in bench[multi[0]] if q.n_images > 1)
        try:  # the processor and the layout only, no forward
            left_padded(adapter, [q.images()], [q.question])
        except UserError as err:
            if named:
                raise UserError(f"--bench-subtasks {multi[0]} shows several images per question: {err}") from None
            warnings.append(f"left out the multi-image subtasks {', '.join(multi)}: {err}")
            bench = {t: qs for t, qs in bench.items() if t not in multi}
    if not bench:
        raise UserError(f"--bench {cfg.bench} has no question this model can be shown: pick single-image subtasks")
    return bench


def _bench(cfg: KeysConfig, adapter, bench: dict, blocks: dict, n_positions: int) -> dict:
    """The benchmark study of --bench (sightline.kv.bench): every question under each block set."""
    from sightline.kv.bench import bench_study

    return bench_study(adapter, bench, blocks, n_positions=n_positions, prompt=cfg.bench_prompt,
                       image_size=cfg.image_size, image_queries=cfg.image_queries, batch_size=cfg.batch_size,
                       progress=cfg.progress)


def _figures(folder: Path, scan, flags, share, cfg: KeysConfig, effects: dict) -> list[str]:
    from sightline.report import kv as fig

    f = folder / "figures"
    made = [fig.plot_flagged_share(share, scan.layers, f / "flagged_share.png", cfg.threshold)]
    for k in scan.kinds:
        made.append(fig.plot_grid_maps(scan.stats[k]["var_ratio"], flags[k], scan.layers, scan.grid_hw,
                                       f / f"var_ratio_grid_{k}.png", f"{k}: var_ratio over the token grid "
                                       f"(boxed: < {cfg.threshold:g})"))
    if cfg.pca_layer is not None:
        if cfg.pca_layer not in scan.layers:
            raise UserError(f"--pca-layer {cfg.pca_layer} was not scanned; scanned layers are {scan.layers}")
        i = scan.layers.index(cfg.pca_layer)
        h = int(np.argmax(flags["keys"][i].sum(-1)))
    else:
        counts = flags["keys"].sum(-1)
        i, h = np.unravel_index(int(np.argmax(counts)), counts.shape) if counts.max() else (len(scan.layers) - 1, 0)
    made.append(fig.plot_key_pca({k: scan.examples[k][:, i, h].numpy() for k in scan.kinds},
                                 {k: flags[k][i, h] for k in scan.kinds}, f / "key_pca.png",
                                 f"keys of two images, layer {scan.layers[i]} KV head {h}"))
    if "accuracy" in effects:
        made.append(fig.plot_accuracy(effects["accuracy"], f / "accuracy_blocked.png",
                                      "answers: none / agnostic keys / random keys blocked"))
    if "bench" in effects:
        made.append(fig.plot_bench_accuracy(effects["bench"]["tasks"], f / "bench_accuracy.png",
                                            f"{cfg.bench_format} benchmark: accuracy per task (Wilson 95%)"))
    if "foreground_iou" in effects:
        made.append(fig.plot_readout(effects["foreground_iou"], f / "readout_blocked.png",
                                     "foreground probe on image values"))
    return [str(p.relative_to(folder)) for p in made]


def _write_page(folder: Path, cfg: KeysConfig, s: dict) -> None:
    import html

    from sightline.report.html import Section, figure_images, write_page

    found = [(f"{s['n_flagged']['keys']} of {s['n_keys']} image keys flagged post-RoPE and "
              f"{s['n_flagged']['keys_prerope']} pre-RoPE (var_ratio < {s['threshold']:g}, {s['n_images']} images); "
              f"{s['n_rope_only']} flagged only post-RoPE (a rotation effect); "
              f"{s['n_flagged_where_input_varies']} flagged where the language model's input varies."),
             f"Blocked: {s['blocked']}, {s['n_blocked']} keys at layers {s['block_layers']}; control: as many random keys."]
    tables = []
    if s["accuracy"]:
        conds = list(s["accuracy"])
        types = list(s["accuracy"][conds[0]])
        tables.append(("Answer accuracy per question type", ["question type", *conds],
                       [[t, *[s["accuracy"][c][t] for c in conds]] for t in types]))
    if s["bench"]:
        b = s["bench"]
        conds = list(b["accuracy"])
        title = (f"Benchmark accuracy per task ({b['n_questions']} questions; changed: answers the block "
                 "changed against no block)")
        tables.append((title, ["task", *conds, *[f"changed ({c})" for c in conds[1:]]],
                       [[t, *[b["accuracy"][c][t] for c in conds], *([b["changed"][c] for c in conds[1:]]
                                                                     if t == "all" else ["" for _ in conds[1:]])]
                        for t in b["accuracy"][conds[0]]]))
    if s["foreground_iou"]:
        conds = list(s["foreground_iou"])
        ls = sorted(s["foreground_iou"][conds[0]], key=int)
        tables.append(("Foreground IoU of the value probe per layer", ["layer", *conds],
                       [[L, *[s["foreground_iou"][c][L] for c in conds]] for L in ls]))
    sections = []
    if s["warnings"]:
        sections.append(Section("Warnings", html="".join(f"<p><b>Warning:</b> {html.escape(w)}</p>" for w in s["warnings"])))
    sections += [Section("What this run found", html="<ul class='findings'>" + "".join(
                     f"<li>{html.escape(x)}</li>" for x in found) + "</ul>",
                         figures={"flagged post-RoPE": s["n_flagged"]["keys"], "flagged pre-RoPE": s["n_flagged"]["keys_prerope"],
                                  "min var_ratio": s["min_var_ratio"]["keys"], "blocked": s["n_blocked"]}, tables=tables),
                 Section("Figures", images=figure_images(folder)),
                 Section("Files", links=[("results.json", "results.json"), ("config.json", "config.json")])]
    write_page(folder / "index.html", "Input-agnostic keys", f"{s['model']} · {s['n_images']} images", sections)

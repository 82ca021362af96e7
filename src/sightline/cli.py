"""The `sightline` command: thin subcommands that parse arguments into a config and call one function.

Imports are lazy so that `sightline --help` answers at once; a user mistake (UserError) prints one
line and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local checkpoint folder or hub id")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--model-dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, float16, bfloat16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--device-map", default=None, help='e.g. "auto" to spread a large model over GPUs (accelerate)')
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the checkpoint (off by default)")


def _add_prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default=None, help="text after the image (default: the image alone)")
    p.add_argument("--prefix", default=None, help="text placed before the image in the user turn")
    p.add_argument("--raw-prompt", action="store_true", help="feed --prompt as is, not through the chat template")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="sightline",
        description="What a vision-language model's language model knows about its image, and how to edit it.",
    )
    ap.add_argument("--version", action="store_true", help="print the version and exit")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="run the whole pipeline on the built-in model, no arguments needed")
    p.add_argument("--out", default="sightline-demo", help="output folder (default: ./sightline-demo)")
    p.add_argument("--n", type=int, default=None, help="held-out scenes in the store (default 320)")
    p.add_argument("--model", default=None, help="a checkpoint folder instead of the shipped organism")

    p = sub.add_parser("extract", help="capture sites of a dataset into an ActivationStore")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="image folder (class subfolders or flat) or a .jsonl manifest")
    _add_prompt_args(p)
    p.add_argument("--sites", default="resid", help="kinds (resid,keys,values,keys_prerope,attn_out,mlp_out,"
                   "vision,projector) and/or exact sites (resid.3)")
    p.add_argument("--layers", default="all", help="all, 0,4,8 or 4-12 (for the kinds given without a layer)")
    p.add_argument("--positions", default="image", choices=["image", "text", "all"])
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="store dtype")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True, help="store folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted store")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    p.add_argument("--skip-bad", action="store_true", help="record unreadable images in the store and go on")
    p.add_argument("--shard-mb", type=float, default=256.0, help="shard size in MiB")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("inspect", help="print the token layout of one image in the model's prompt")
    _add_model_args(p)
    p.add_argument("--image", required=True)
    _add_prompt_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser("organism", help="the built-in model organism: path, eval, train")
    osub = p.add_subparsers(dest="organism_command", metavar="ORGANISM_COMMAND")
    osub.add_parser("path", help="print the shipped checkpoint's folder")
    q = osub.add_parser("eval", help="accuracy per question type on fresh synthetic scenes, as JSON")
    q.add_argument("--seed", type=int, default=1, help="scene seed (training used seed 0's train stream)")
    q.add_argument("--n", type=int, default=200, help="scenes per set (single-object and 1-4 objects)")
    q.add_argument("--model", default=None, help="a checkpoint folder (default: the shipped organism)")
    q.add_argument("--out", default=None, help="also write the JSON here")
    q = osub.add_parser("train", help="train an organism from scratch (resumes an interrupted run)")
    q.add_argument("--out", default="organism-train", help="run folder (checkpoints, log, final model/)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--vision-steps", type=int, default=None, help="stage 1 steps (dense patch labels)")
    q.add_argument("--steps", type=int, default=None, help="stage 2 steps (question answering)")
    q.add_argument("--batch-size", type=int, default=None)
    q.add_argument("--n-scenes", type=int, default=None)
    q.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")

    p = sub.add_parser("probe", help="linear probes for a label at every site and layer of a store")
    p.add_argument("store", help="an ActivationStore folder")
    p.add_argument("--label", default="label", help="example field, JSONL meta key, dotted path "
                   "(meta.facts.objects.0.shape) or mask.<shape|colour|size|object> for per-token labels")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sites", default="all", help="all, kinds (resid,keys,...) and/or exact sites (resid.3)")
    p.add_argument("--layers", default="all", help="layers of the kinds in --sites: all, 0,4,8 or 4-12")
    p.add_argument("--pooling", default="mean", choices=["mean", "max", "last", "token"])
    p.add_argument("--modality", default="image", help="tokens pooled: image, or e.g. image,image_newline")
    p.add_argument("--where", default=None, help="keep examples with these fields, e.g. qtype=shape")
    p.add_argument("--drop-classes", default=None, help="classes to leave out, a,b")
    p.add_argument("--val-frac", type=float, default=0.2)
    p.add_argument("--test-frac", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--l2", default="1e-1,1e-2,1e-3,1e-4,1e-5", help="L2 strengths tried on the validation split")
    p.add_argument("--no-control", action="store_true", help="skip the control task (Hewitt & Liang)")
    p.add_argument("--max-iter", type=int, default=500)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--max-per-class", type=int, default=None)
    p.add_argument("--min-cover", type=float, default=0.5, help="mask.* labels: share of a token a label must cover")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("steer", help="add a class direction at the image tokens; measure efficacy, flips and damage")
    _add_model_args(p)
    p.add_argument("--directions", required=True, help="directions .safetensors (keys site/class or site/src:tgt), "
                   "a folder holding directions.safetensors, or an activation store")
    p.add_argument("--data", required=True, help="image folder with class subfolders (or .jsonl); images of each "
                   "source class are steered")
    p.add_argument("--pairs", default="", help="src:tgt,... (default: each class to the next)")
    p.add_argument("--layers", default="auto", help="resid layers: auto (those the directions hold), all, 0,4,8, 4-12")
    p.add_argument("--scales", default="", help="k values 0,2,4 or start:stop:count (default 0:30:20, the paper's)")
    p.add_argument("--normalize", default="unit", choices=["unit", "resid", "none"])
    p.add_argument("--positions", default="image", choices=["image", "text", "all", "last"])
    p.add_argument("--mode", default="prefill", choices=["prefill", "every_step"])
    p.add_argument("--images-per-class", type=int, default=20)
    p.add_argument("--efficacy-prompt", default=None)
    p.add_argument("--efficacy-metric", default=None, choices=["prob", "share"])
    p.add_argument("--open-prompt", default=None)
    p.add_argument("--caption-prompt", default=None)
    p.add_argument("--damage-qtypes", default="", help="synthetic data: question types for damage (default: the other attributes)")
    p.add_argument("--class-words", default=None, help="JSON file {class folder: word used in prompts}")
    p.add_argument("--label", default="label", help="store field holding the class (directions from a store)")
    p.add_argument("--data-label", default="label", help="dataset field holding the class, e.g. facts.objects.0.shape")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("sae", help="sparse autoencoders on image and text tokens: train, analyze")
    ssub_sae = p.add_subparsers(dest="sae_command", metavar="SAE_COMMAND")
    q = ssub_sae.add_parser("train", help="train one or more SAEs on a site of a store, in one pass (resumable)")
    q.add_argument("store", help="an ActivationStore folder")
    q.add_argument("--site", required=True, help="e.g. resid.2")
    q.add_argument("--out", required=True, help="run folder (one SAELens-layout folder per SAE)")
    q.add_argument("--arch", default="topk", help="topk, batchtopk or relu")
    q.add_argument("--width", default="0", help="latents, comma list (0: --expansion x d)")
    q.add_argument("--expansion", type=int, default=8)
    q.add_argument("--k", default="32", help="active latents (topk/batchtopk), comma list")
    q.add_argument("--l1-coeff", default="5.0", help="relu: lambda, comma list")
    q.add_argument("--lr", type=float, default=None, help="default: relu 5e-5 (paper), topk scaled by width")
    q.add_argument("--modality", default="image", choices=["image", "text", "both"])
    q.add_argument("--image-fraction", type=float, default=0.0, help="modality both: image share per batch (0: the store's)")
    q.add_argument("--batch-size", type=int, default=4096, help="tokens per step")
    q.add_argument("--epochs", type=float, default=1.0)
    q.add_argument("--total-tokens", type=int, default=0, help="tokens to train on (0: --epochs passes)")
    q.add_argument("--dead-tokens", type=int, default=0,
                   help="a latent silent this many tokens is dead (0: min(10M, total / 10))")
    q.add_argument("--checkpoint-every", type=int, default=500, help="steps between resumable checkpoints")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="auto")
    q.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    q.add_argument("--no-progress", action="store_true")
    q = ssub_sae.add_parser("analyze", help="metrics by modality, loss recovered, modality sharing, feature pages")
    q.add_argument("--sae", nargs="+", required=True, help="SAE folders or sae-train run folders")
    q.add_argument("--store", required=True, help="the ActivationStore (extracted with --positions all)")
    q.add_argument("--out", default="sae-analysis")
    q.add_argument("--model", default=None, help="model for loss recovered (default: the store's)")
    q.add_argument("--data", default=None, help="question/answer JSONL for loss recovered (default: the store's examples)")
    q.add_argument("--no-loss", action="store_true", help="skip loss recovered (no model run)")
    q.add_argument("--n-loss", type=int, default=64)
    q.add_argument("--concepts", default="auto", choices=["auto", "facts", "label", "none"])
    q.add_argument("--share-threshold", type=float, default=0.1)
    q.add_argument("--n-features", type=int, default=24)
    q.add_argument("--features", default="", help="latents to show, e.g. 3,17")
    q.add_argument("--device", default="auto")
    q.add_argument("--model-dtype", default="auto")
    q.add_argument("--batch-size", type=int, default=4096)
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("store", help="look at an ActivationStore")
    ssub = p.add_subparsers(dest="store_command", metavar="STORE_COMMAND")
    q = ssub.add_parser("info", help="sites, shapes, examples, tokens and completeness of a store")
    q.add_argument("path")
    q.add_argument("--json", action="store_true")
    return ap


def cmd_extract(a) -> int:
    from sightline.extract import ExtractConfig, extract

    cfg = ExtractConfig(
        model=a.model, data=a.data, out=a.out, prompt=a.prompt, prefix=a.prefix, raw_prompt=a.raw_prompt,
        sites=a.sites, layers=a.layers, positions=a.positions, dtype=a.dtype, model_dtype=a.model_dtype,
        batch_size=a.batch_size, device=a.device, device_map=a.device_map, revision=a.revision,
        trust_remote_code=a.trust_remote_code, resume=a.resume, limit=a.limit, skip_bad=a.skip_bad,
        shard_mb=a.shard_mb, progress=not a.no_progress,
    )
    path = extract(cfg)
    from sightline.store import ActivationStore

    s = ActivationStore.open(path)
    print(f"wrote {path}: {len(s)} examples, {s.n_tokens} tokens, {len(s.sites)} sites"
          + ("" if s.complete else " (incomplete: other ranks still writing, or rerun with --resume)"))
    return 0


def cmd_inspect(a) -> int:
    from sightline.data import load_image
    from sightline.models import load_model
    from sightline.runtime import resolve_placement

    device, dtype = resolve_placement(a.device, a.model_dtype, a.device_map)
    image = load_image(a.image)
    ad = load_model(a.model, dtype=dtype, device=device, device_map=a.device_map, revision=a.revision,
                    trust_remote_code=a.trust_remote_code)
    text = ad.render_prompt(a.prompt, prefix=a.prefix, raw=a.raw_prompt)
    batch = ad.prepare([image], [text])
    lay = batch.layouts[0]
    info = {"model": ad.describe(), "image": a.image, "image_size_hw": [image.height, image.width], "text": text,
            **lay.summary()}
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model      {ad.name} ({ad.family}, {ad.n_layers} layers, {ad.n_kv_heads} KV heads x {ad.head_dim})")
    print(f"image      {a.image}  {image.width}x{image.height} px")
    print(f"text       {text!r}")
    t = info["tokens"]
    print(f"sequence   {info['seq_len']} tokens: {t['image']} image, {t['image_newline']} newline, "
          f"{t['text']} text, {t['special']} special")
    img_pos = lay.image_positions
    if len(img_pos):
        print(f"image at   positions {img_pos[0]}..{img_pos[-1]} ({len(img_pos)} placeholder tokens)")
    for g in info["grids"]:
        extra = (" + newline per row" if g["newline"] else "") + (" (interpolated)" if g["interpolated"] else "")
        px, py = g["pixels_per_token_xy"]
        print(f"  image {g['image']} view {g['view']}: {g['rows']}x{g['cols']} grid{extra}, from position "
              f"{g['first_position']}, {g['n_tokens']} tokens, {px:g}x{py:g} px per token")
    return 0


def cmd_store_info(a) -> int:
    from sightline.store import ActivationStore

    s = ActivationStore.open(a.path)
    info = {
        "path": a.path,
        "model": s.manifest.get("model", {}).get("name"),
        "examples": len(s),
        "skipped": len(s.skipped),
        "planned": s.manifest.get("n_examples"),
        "complete": s.complete,
        "tokens": s.n_tokens,
        "dtype": str(s.dtype).replace("torch.", ""),
        "sites": {k: list(v) for k, v in s.manifest["sites"].items()},
        "config": s.manifest.get("config", {}),
    }
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"store     {a.path}")
    print(f"model     {info['model']}")
    print(f"examples  {info['examples']} written, {info['skipped']} skipped, {info['planned']} planned"
          f" ({'complete' if info['complete'] else 'INCOMPLETE: rerun extract with --resume'})")
    print(f"tokens    {info['tokens']}  dtype {info['dtype']}")
    print("sites     " + ", ".join(f"{k} {tuple(v)}" for k, v in info["sites"].items()))
    return 0


def cmd_organism(a) -> int:
    if a.organism_command == "path":
        from sightline.organism import checkpoint_path

        print(checkpoint_path())
        return 0
    if a.organism_command == "eval":
        from sightline.models import load_model
        from sightline.organism import checkpoint_path
        from sightline.organism.evaluate import evaluate

        adapter = load_model(a.model or str(checkpoint_path()))
        res = evaluate(adapter, seed=a.seed, n=a.n)
        text = json.dumps(res, indent=2)
        if a.out:
            from pathlib import Path

            Path(a.out).write_text(text)
        print(text)
        return 0
    if a.organism_command == "train":
        from dataclasses import replace

        from sightline.organism.train import TrainConfig, train

        cfg = TrainConfig(out=a.out, seed=a.seed, threads=a.threads)
        over = {k: v for k, v in (("steps", a.steps), ("vision_steps", a.vision_steps), ("batch_size", a.batch_size),
                                  ("n_scenes", a.n_scenes))
                if v is not None}
        path = train(replace(cfg, **over))
        print(f"trained organism saved to {path}")
        return 0
    build_parser().parse_args(["organism", "--help"])
    return 2


def cmd_probe(a) -> int:
    from sightline.probes.run import ProbeConfig, run_probes

    res = run_probes(ProbeConfig(
        store=a.store, label=a.label, out=a.out, sites=a.sites, layers=a.layers, pooling=a.pooling,
        modality=a.modality, where=a.where, drop_classes=tuple(x for x in (a.drop_classes or "").split(",") if x),
        val_frac=a.val_frac, test_frac=a.test_frac, seed=a.seed, l2_grid=tuple(float(x) for x in a.l2.split(",")),
        control=not a.no_control, max_iter=a.max_iter, tol=a.tol, max_per_class=a.max_per_class,
        min_cover=a.min_cover, device=a.device, overwrite=a.overwrite, progress=not a.no_progress))
    print(f"wrote {a.out}: best {res['best_site']} top-1 {res['best_top1']:.3f} (control {res['best_control_top1']}, "
          f"selectivity {res['best_selectivity']})")
    return 0


def cmd_steer(a) -> int:
    from sightline.steer import SteerConfig, headline, parse_pairs, parse_scales, run_steering

    res = run_steering(SteerConfig(
        model=a.model, directions=a.directions, data=a.data, out=a.out, pairs=parse_pairs(a.pairs), layers=a.layers,
        scales=parse_scales(a.scales), normalize=a.normalize, positions=a.positions, mode=a.mode,
        images_per_class=a.images_per_class, efficacy_prompt=a.efficacy_prompt, efficacy_metric=a.efficacy_metric,
        open_prompt=a.open_prompt, caption_prompt=a.caption_prompt,
        damage_qtypes=tuple(q for q in a.damage_qtypes.split(",") if q), class_words=a.class_words, label=a.label,
        data_label=a.data_label, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, model_dtype=a.model_dtype,
        device=a.device, device_map=a.device_map, revision=a.revision, trust_remote_code=a.trust_remote_code,
        overwrite=a.overwrite, progress=not a.no_progress))
    h = headline(res)
    print(f"wrote {a.out}: best {h['best_site']} k={h['best_scale']}: flip rate {h['flip_rate']}, "
          f"efficacy {h['efficacy']}, unrelated-question accuracy {h['damage_accuracy']}")
    return 0


def cmd_sae(a) -> int:
    if a.sae_command == "train":
        from sightline.sae import SAETrainConfig, sae_grid, train_saes

        common = {"expansion": a.expansion, **({"lr": a.lr} if a.lr is not None else {})}
        cfg = SAETrainConfig(store=a.store, site=a.site, out=a.out, modality=a.modality,
                             image_fraction=a.image_fraction, batch_size=a.batch_size, epochs=a.epochs,
                             total_tokens=a.total_tokens, dead_tokens=a.dead_tokens,
                             checkpoint_every=a.checkpoint_every, seed=a.seed, device=a.device, threads=a.threads,
                             saes=sae_grid(a.arch, a.width, a.k, a.l1_coeff, **common))
        paths = train_saes(cfg, progress=not a.no_progress)["paths"]
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line from rank 0
            print("trained " + ", ".join(str(p) for p in paths))
        return 0
    if a.sae_command == "analyze":
        from sightline.sae.analyze import SAEAnalyzeConfig, analyze_sae

        res = analyze_sae(SAEAnalyzeConfig(
            saes=tuple(a.sae), store=a.store, out=a.out, model=a.model, data=a.data, loss=not a.no_loss,
            n_loss=a.n_loss, concepts=a.concepts, share_threshold=a.share_threshold, n_features=a.n_features,
            features=tuple(int(x) for x in a.features.split(",") if x), device=a.device, model_dtype=a.model_dtype,
            batch_size=a.batch_size, overwrite=a.overwrite, progress=not a.no_progress))
        print(json.dumps({k: res[k] for k in ("out", "html", "shared_by_layer") if k in res}, indent=2))
        return 0
    build_parser().parse_args(["sae", "--help"])
    return 2


def cmd_demo(a) -> int:
    from sightline.demo import DemoConfig, run_demo

    over = {k: v for k, v in (("n", a.n), ("model", a.model)) if v is not None}
    run_demo(DemoConfig(out=a.out, **over))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.version:
        from sightline import __version__

        print(__version__)
        return 0
    handlers = {"extract": cmd_extract, "inspect": cmd_inspect, "demo": cmd_demo, "organism": cmd_organism,
                "probe": cmd_probe, "steer": cmd_steer,
                "sae": cmd_sae}
    if a.command == "store":
        if a.store_command != "info":
            ap.parse_args(["store", "--help"])
        handler = cmd_store_info
    elif a.command in handlers:
        handler = handlers[a.command]
    else:
        ap.print_help()
        return 0
    from sightline.errors import UserError

    try:
        return handler(a)
    except UserError as e:
        print(f"sightline: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sightline: interrupted (an extraction continues with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

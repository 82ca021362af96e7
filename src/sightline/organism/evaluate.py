"""Held-out accuracy of a VLM on the synthetic world, per question type, by greedy generation.

Scenes come from a seed the training set never used (`derive_seed(seed, "eval", i)`), questions
from the world's own generator; an answer counts when the generated text equals the true answer
(lower-case, stripped). `single_shape` and `single_colour` are single-object scenes, the
organism's headline figures.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from sightline.data.synthetic import QTYPES, WorldConfig, derive_seed, questions, render_scene


def eval_items(seed: int = 1, n: int = 200, image_size: int = 112) -> list[tuple[object, str, str, str]]:
    """(PIL image, question, answer, qtype) items: n single-object scenes asked the world's shape and
    colour questions, and n scenes of 1-4 objects asked one question of every type they settle."""
    items = []
    single = WorldConfig(image_size=image_size, n_objects=1)
    multi = WorldConfig(image_size=image_size)
    for i in range(n):
        scene = render_scene(derive_seed(seed, "eval-single", i), single)
        img = scene.to_pil()
        qs = questions(scene, ("shape", "colour"))  # "What shape is shown?", "What colour is the <shape>?"
        for qtype in ("shape", "colour"):
            q = next(q for q in qs if q.qtype == qtype)
            items.append((img, q.question, q.answer, f"single_{qtype}"))
    for i in range(n):
        scene = render_scene(derive_seed(seed, "eval", i), multi)
        img = scene.to_pil()
        by_type = defaultdict(list)
        for q in questions(scene):
            by_type[q.qtype].append(q)
        rng = np.random.default_rng([seed, i])
        for qtype in QTYPES:
            if by_type[qtype]:
                q = by_type[qtype][rng.integers(len(by_type[qtype]))]
                items.append((img, q.question, q.answer, qtype))
    return items


def left_padded_inputs(adapter, images, texts: list[str]) -> dict:
    """The processor's batch of `images` and rendered `texts`, padded on the LEFT (for batch generation)."""
    tok = adapter.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        return dict(adapter.processor(images=adapter.processor_images(list(images)), text=list(texts),
                                      return_tensors="pt", padding=True))
    finally:
        tok.padding_side = side


@torch.no_grad()
def greedy_answers(adapter, inputs: dict, max_new_tokens: int = 24, lower: bool = True) -> list[str]:
    """Greedy generations from a left-padded batch, decoded, stripped and (`lower`) lower-cased."""
    inputs = {k: v.to(adapter.device) for k, v in inputs.items()}
    out = adapter.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = adapter.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip().lower() if lower else t.strip() for t in new]


def answer(adapter, images, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy answers of the model to one question per image (left-padded batch generation)."""
    texts = [adapter.render_prompt(p) for p in prompts]
    return greedy_answers(adapter, left_padded_inputs(adapter, images, texts), max_new_tokens)


def evaluate(adapter, seed: int = 1, n: int = 200, batch_size: int = 64, progress: bool = True) -> dict:
    """Accuracy per question type (and counts) on fresh scenes from `seed`."""
    from tqdm.auto import tqdm

    size = adapter.config.vision_config.image_size
    items = eval_items(seed, n, size)
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    examples: dict[str, list] = defaultdict(list)
    for k in tqdm(range(0, len(items), batch_size), desc="eval", disable=not progress, dynamic_ncols=True):
        chunk = items[k : k + batch_size]
        got = answer(adapter, [c[0] for c in chunk], [c[1] for c in chunk])
        for (_, q, a, t), g in zip(chunk, got):
            total[t] += 1
            correct[t] += int(g == a)
            if len(examples[t]) < 3:
                examples[t].append({"question": q, "answer": a, "generated": g})
    acc = {t: round(correct[t] / total[t], 4) for t in total}
    return {"seed": seed, "n": n, "accuracy": acc, "count": dict(total), "examples": dict(examples)}


@dataclass(frozen=True)
class EvalConfig:
    """What `sightline organism eval` measures."""

    seed: int = 1
    """scene seed (training drew from seed 0's train stream)"""
    n: int = 200
    """scenes per set (single-object, and 1-4 objects)"""
    model: str | None = None
    """a checkpoint folder (default: the shipped organism)"""
    out: str | None = None
    """also write the JSON here"""
    batch_size: int = 64
    """questions answered per generate call"""
    progress: bool = True
    """show a progress bar"""


def run_eval(cfg: EvalConfig) -> dict:
    """Load the model (default: the shipped organism) and `evaluate` it; writes `cfg.out` when given."""
    from sightline.models import load_model
    from sightline.organism import checkpoint_path
    from sightline.report.files import write_json

    res = evaluate(load_model(cfg.model or str(checkpoint_path()), progress=cfg.progress), seed=cfg.seed, n=cfg.n,
                   batch_size=cfg.batch_size, progress=cfg.progress)
    if cfg.out:
        write_json(cfg.out, res)
    return res

"""Blocking image keys on a multiple-choice benchmark: accuracy per task under each block set.

Every question is answered greedily (left-padded batch generation, the blocked keys blocked in every call,
prefill and generated tokens, as `sightline.kv.block.blocked_answers`) from one prompt: the question's images in
order, then the benchmark's lettered prompt (`prompt="prompt"`: the question and "(A) ..." choices, as BLINK and
CV-Bench write it) or the bare question (`prompt="question"`: for a model that answers in words, e.g. the
organism). One image: `adapter.render_prompt`; several (BLINK's multi-image subtasks): one user turn of the
family's chat template holding them all, then the text (`sightline.kv.surfacing.multi_image_prompt`). A batch
may mix numbers of images (every family's processor takes such a batch; LLaVA-OneVision lays out one image per
prompt only, and its multi-image questions are refused). The choice is parsed from the generation
(`sightline.data.blink.parse_choice`: "(B)", a leading "B", or the one choice text it contains); an answer that
names no choice counts as wrong. Parsing a generation rather than scoring each choice's likelihood keeps the
answer the model would give, and lets one generation per question serve every number of choices.

The block set's grid indices (the scan's, of single images) are blocked in the grid of EVERY image of a prompt
(the random control likewise: the same count per image), from the text between images, the text and answer
queries after the last image and, with `image_queries`, from every image token after the key
(`sightline.kv.block.block_edits`). So every
image must give the scan's grid.

Per task and condition: n, right, accuracy with its Wilson 95% interval, and `changed`: the answers whose
parsed choice differs from the unblocked condition's (the first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sightline.errors import UserError
from sightline.kv.block import BlockSet, block_edits, left_padded

PROMPTS = ("prompt", "question")


def _images(q, image_size: int | None) -> list:
    ims = q.images()
    return [im.resize((image_size, image_size)) for im in ims] if image_size else ims


@torch.no_grad()
def bench_answers(adapter, images: Sequence, prompts: Sequence[str], block: BlockSet, *, n_positions: int,
                  image_queries: bool = False, max_new_tokens: int = 12) -> list[str]:
    """The greedy generations (decoded, stripped, case kept) for one batch with `block` applied; images[i]: the
    question's image or list of images. UserError when an image gives another grid than the `n_positions` the
    block set indexes."""
    from sightline.capture import apply_edits
    from sightline.organism.evaluate import greedy_answers

    inputs, grid, after = left_padded(adapter, images, prompts)
    for g in grid:
        for one in (g if isinstance(g, list) else [g]):
            if len(one) != n_positions:
                raise UserError(f"a benchmark image gives {len(one)} image tokens where the scanned images gave "
                                f"{n_positions}: give --image-size so every image has the scan's size")
    S = inputs["input_ids"].shape[1]
    edits = block_edits(adapter, grid, after, block, n_columns=S + max_new_tokens, image_queries=image_queries)
    with apply_edits(adapter, edits):
        return greedy_answers(adapter, inputs, max_new_tokens, lower=False)


def bench_study(adapter, bench: Mapping[str, Sequence], blocks: Mapping[str, BlockSet], *, n_positions: int,
                prompt: str = "prompt", image_size: int | None = None, image_queries: bool = False,
                batch_size: int = 16, max_new_tokens: int = 12, progress: bool = False) -> dict[str, Any]:
    """Answer every question of `bench` ({task: [BlinkQuestion]}, questions with a hidden answer left out) under
    each block set of `blocks` (the first: the reference for `changed`, usually the empty one). Returns
    {"conditions", "tasks": {task or "all": {condition: {n, right, accuracy, ci, changed, unparsed}}},
    "items": [{id, task, n_images, answer, generated: {condition: text}, parsed: {condition: index or None}}]}."""
    from tqdm.auto import tqdm

    from sightline.data.blink import parse_choice
    from sightline.report.stats import wilson_interval

    if prompt not in PROMPTS:
        raise UserError(f"--bench-prompt {prompt!r}: choose prompt (the lettered choices) or question (the bare one)")
    qs = [q for task in bench for q in bench[task] if q.answer is not None]
    if not qs:
        raise UserError("the benchmark has no question with a known answer (a test split may hide them)")
    conds = list(blocks)
    items = [{"id": q.id, "task": q.subtask, "n_images": q.n_images, "answer": q.answer, "generated": {}, "parsed": {}}
             for q in qs]
    for s in tqdm(range(0, len(qs), batch_size), desc="benchmark", disable=not progress, dynamic_ncols=True):
        chunk = qs[s:s + batch_size]
        images = [_images(q, image_size) for q in chunk]
        texts = [q.prompt if prompt == "prompt" else q.question for q in chunk]
        for c in conds:
            got = bench_answers(adapter, images, texts, blocks[c], n_positions=n_positions,
                                image_queries=image_queries, max_new_tokens=max_new_tokens)
            for it, q, g in zip(items[s:s + batch_size], chunk, got):
                it["generated"][c] = g
                it["parsed"][c] = parse_choice(g, q.choices)
    tasks: dict[str, dict[str, Any]] = {}
    for task in [*dict.fromkeys(it["task"] for it in items), "all"]:
        rows = [it for it in items if task == "all" or it["task"] == task]
        tasks[task] = {}
        for c in conds:
            right = sum(it["parsed"][c] == it["answer"] for it in rows)
            lo, hi = wilson_interval(right, len(rows))
            tasks[task][c] = {"n": len(rows), "right": int(right), "accuracy": right / len(rows), "ci": [lo, hi],
                              "changed": int(sum(it["parsed"][c] != it["parsed"][conds[0]] for it in rows)),
                              "unparsed": int(sum(it["parsed"][c] is None for it in rows))}
    return {"conditions": conds, "prompt": prompt, "tasks": tasks, "items": items}

"""Blocking chosen image keys from attention, and what it does: the model's answers and later layers' perception.

A block set is {(layer, KV head): grid indices (row-major, the KeyScan's positions)}. `block_edits` turns it
into the foundation's attention edits (`sightline.capture.BlockAttention`): at each chosen layer, the query
heads that share that KV head stop attending to those keys, from the text and answer queries (every position
after the last image token, generated tokens included) and, with `image_queries`, from the later image queries
too. Keys that every head of a layer blocks go into one edit (one mask per layer). A prompt with several images
(`left_padded` given a list of images per prompt) has the block set's indices blocked in EVERY image's grid; an
image query is then any grid token of any image, and causality makes "later" exact: a key is blocked from every
image query after its own position (its own image's later tokens and every token of the images after it).

The control (`random_block_set`) blocks as many random image keys of the same layer-heads, none of them
flagged. Effects:

    answer_accuracy(adapter, items, block)        accuracy per question type of the greedy answers (organism)
    foreground_readout(adapter, scenes, layers)   a per-token foreground probe on later layers' image values

Image values depend only on the image and what precedes it, so blocking keys from the TEXT queries cannot
change them: the perception readout moves only with `image_queries` (later image tokens read the image
through those keys too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from sightline.capture import BlockAttention
from sightline.errors import UserError

BlockSet = Mapping[tuple[int, int], Sequence[int] | np.ndarray]


def query_heads(adapter, kv_head: int) -> list[int]:
    """The query heads that read KV head `kv_head` (grouped-query attention: n_heads / n_kv_heads each)."""
    group = adapter.n_heads // adapter.n_kv_heads
    return list(range(kv_head * group, (kv_head + 1) * group))


def block_edits(adapter, grid_positions: Sequence, after_image: Sequence[int], block: BlockSet, *,
                n_columns: int, image_queries: bool = False, broadcast: bool = False) -> list[BlockAttention]:
    """Attention edits that block `block`'s keys at their layers and heads.

    grid_positions[i]: example i's sequence positions of the grid, row-major (a block's indices pick from them),
    or a list of such arrays, one per image of the prompt (the indices then pick from every image's grid);
    after_image[i]: its first position after the last image; n_columns: the columns the queries may reach (the
    padded prompt plus any generated tokens). Queries: after_image..n_columns and, with several images, every
    position between one image's grid and the next's (the text a chat template puts between images: it could
    read the earlier images' blocked keys and carry them on); with `image_queries` every grid position of every
    image too (a query before a key cannot see it anyway: causality makes the block reach exactly the queries
    after the key). Blocks every call (prefill and generated tokens). An empty
    block set gives no edits. `broadcast`: one example's positions that hold for every example of any batch
    (the same prompt and image size).
    """
    if broadcast and len(grid_positions) != 1:
        raise ValueError("broadcast takes the positions of one example")
    n_kv = adapter.n_kv_heads
    by_layer: dict[int, dict[int, np.ndarray]] = {}
    for (L, h), idx in block.items():
        idx = np.unique(np.asarray(idx, dtype=np.int64).reshape(-1))
        if not len(idx):
            continue
        if L not in adapter.kv_layers or not 0 <= h < n_kv:
            raise UserError(f"cannot block keys at layer {L} KV head {h}: layers {adapter.kv_layers}, KV heads 0..{n_kv - 1}")
        by_layer.setdefault(int(L), {})[int(h)] = idx
    grids = [_image_grids(g) for g in grid_positions]  # per example: [one array per image]
    queries = []
    for g, a in zip(grids, after_image):
        # the text between consecutive images (a chat template's separators) is text too: it could read an
        # earlier image's blocked keys and pass them on
        between = [np.arange(int(g[i].max()) + 1, int(g[i + 1].min()), dtype=np.int64) for i in range(len(g) - 1)
                   if len(g[i]) and len(g[i + 1])]
        q = np.concatenate([*between, np.arange(int(a), int(n_columns), dtype=np.int64)])
        queries.append(np.concatenate([*g, q]) if image_queries else q)
    edits = []
    for L, heads in sorted(by_layer.items()):
        sets = list(heads.values())
        if len(heads) == n_kv and all(np.array_equal(sets[0], s) for s in sets[1:]):
            keys = [np.concatenate([im[sets[0]] for im in g]) for g in grids]
            edits.append(BlockAttention(L, *_one(keys, queries, broadcast), prefill_only=False))
            continue
        for h, idx in sorted(heads.items()):
            keys = [np.concatenate([im[idx] for im in g]) for g in grids]
            edits.append(BlockAttention(L, *_one(keys, queries, broadcast), heads=query_heads(adapter, h),
                                        prefill_only=False))
    return edits


def _image_grids(g) -> list[np.ndarray]:
    """One example's grid positions as a list of flat arrays, one per image (an array alone: one image)."""
    if isinstance(g, (list, tuple)):
        return [np.asarray(x, dtype=np.int64).reshape(-1) for x in g]
    return [np.asarray(g, dtype=np.int64).reshape(-1)]


def _one(keys, queries, broadcast):
    return (keys[0], queries[0]) if broadcast else (keys, queries)


def random_block_set(block: BlockSet, n_positions: int, seed: int = 0,
                     exclude: BlockSet | None = None) -> dict[tuple[int, int], np.ndarray]:
    """The control: per layer-head as many random grid indices as `block` has there, none of `exclude` (default:
    `block` itself) where enough remain."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xB10C]))
    exclude = block if exclude is None else exclude
    out = {}
    for lh in sorted(block):
        k = len(np.unique(np.asarray(block[lh]).reshape(-1)))
        if not k:
            continue
        pool = np.setdiff1d(np.arange(n_positions), np.asarray(exclude.get(lh, []), dtype=np.int64))
        if len(pool) < k:
            pool = np.arange(n_positions)
        out[lh] = np.sort(rng.choice(pool, size=k, replace=False))
    return out


def lowest_keys(stat_lhp: np.ndarray, layers: Sequence[int], k: int) -> dict[tuple[int, int], np.ndarray]:
    """{(layer, head): the k grid indices with the lowest statistic} (e.g. var_ratio: the most agnostic keys)."""
    return {(int(L), h): np.sort(np.argsort(stat_lhp[i, h], kind="stable")[:k])
            for i, L in enumerate(layers) for h in range(stat_lhp.shape[1])}


def left_padded(adapter, images: Sequence, prompts: Sequence[str], view: int = 0) -> tuple[dict, list, list[int]]:
    """Inputs padded on the LEFT for generation, with each example's grid positions (row-major) and first position
    after its last image.

    images[i]: one image (grid: one array) or a list of images (grid: a list of arrays, one per image). The
    prompt: one image, `adapter.render_prompt(prompts[i])`; several, one user turn of the family's chat template
    holding them in order, then the prompt (`sightline.kv.surfacing.multi_image_prompt`). A batch may mix numbers
    of images. One image per prompt gives exactly `sightline.organism.evaluate.left_padded_inputs`."""
    from sightline.models.layout import TokenLayout

    multi = [isinstance(im, (list, tuple)) for im in images]
    lists = [list(im) if m else [im] for im, m in zip(images, multi)]
    if any(not ims for ims in lists):
        raise ValueError("a prompt needs at least one image")
    texts = [_render(adapter, len(ims), p) for ims, p in zip(lists, prompts)]
    nested = isinstance(adapter.processor_images(lists[0][:1])[0], (list, tuple))
    flat = [im for ims in lists for im in ims]
    if all(len(ims) == 1 for ims in lists):
        arg = adapter.processor_images(flat)  # exactly the single-image call
    else:
        arg = lists if nested else flat
    tok = adapter.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        inputs = dict(adapter.processor(images=arg, text=texts, return_tensors="pt", padding=True,
                                        padding_side="left", **adapter.processor_kwargs()))
    finally:
        tok.padding_side = side
    inputs.pop("labels", None)
    ids = inputs["input_ids"].numpy()
    S = ids.shape[1]
    n_real = (inputs["attention_mask"].numpy().sum(1) if "attention_mask" in inputs else np.full(len(ids), S))
    grid, after = [], []
    for i, ims in enumerate(lists):
        shift = S - int(n_real[i])
        try:
            views = adapter.image_grids(inputs, i, [(im.height, im.width) for im in ims])
        except NotImplementedError as err:
            if len(ims) == 1:
                raise
            raise UserError(f"model {adapter.name}: {err}; several images in one prompt cannot be laid out "
                            "(pick single-image questions)") from None
        # the same layout `adapter.prepare` builds, on the unpadded tail of the left-padded row
        lay = TokenLayout.build(ids[i, shift:], adapter.image_token_id, views, adapter.special_ids,
                                adapter.lead_tokens_per_image)
        g = [lay.grid_positions(k, view).reshape(-1) + shift for k in range(len(ims))]
        grid.append(g if multi[i] else g[0])
        after.append(int(lay.image_positions.max()) + 1 + shift)
    return inputs, grid, after


def _render(adapter, n_images: int, prompt: str) -> str:
    if n_images == 1:
        return adapter.render_prompt(prompt)
    from sightline.kv.surfacing import multi_image_prompt

    return multi_image_prompt(adapter, n_images, prompt)


@torch.no_grad()
def blocked_answers(adapter, images: Sequence, prompts: Sequence[str], block: BlockSet, *, image_queries: bool = False,
                    max_new_tokens: int = 24, view: int = 0) -> list[str]:
    """Greedy answers (left-padded batch generation, as `sightline.organism.evaluate.answer`) with `block` applied;
    images[i]: one image or a list of images (`left_padded`)."""
    from sightline.capture import apply_edits
    from sightline.organism.evaluate import greedy_answers

    inputs, grid, after = left_padded(adapter, images, prompts, view)
    S = inputs["input_ids"].shape[1]
    edits = block_edits(adapter, grid, after, block, n_columns=S + max_new_tokens, image_queries=image_queries)
    with apply_edits(adapter, edits):
        return greedy_answers(adapter, inputs, max_new_tokens)


def answer_accuracy(adapter, items: Sequence[tuple], blocks: Mapping[str, BlockSet], *, image_queries: bool = False,
                    batch_size: int = 64, max_new_tokens: int = 24) -> dict[str, dict[str, float]]:
    """{condition: {question type: accuracy}} of the greedy answers to `items` ((image, question, answer, qtype),
    as `sightline.organism.evaluate.eval_items`) under each block set (an empty one: the unedited model)."""
    out: dict[str, dict[str, float]] = {}
    for name, block in blocks.items():
        right: dict[str, int] = {}
        seen: dict[str, int] = {}
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            got = blocked_answers(adapter, [c[0] for c in chunk], [c[1] for c in chunk], block,
                                  image_queries=image_queries, max_new_tokens=max_new_tokens)
            for (_, _, a, t), g in zip(chunk, got):
                seen[t] = seen.get(t, 0) + 1
                right[t] = right.get(t, 0) + int(g == a)
        acc = {t: right[t] / seen[t] for t in seen}
        acc["all"] = sum(right.values()) / max(sum(seen.values()), 1)
        out[name] = acc
    return out


@torch.no_grad()
def foreground_readout(adapter, scenes: Sequence, layers: Sequence[int], blocks: Mapping[str, BlockSet], *,
                       train_fraction: float = 0.5, l2: float = 10.0, token_fraction: float = 0.5,
                       batch_size: int = 16) -> dict[str, dict[int, float]]:
    """{condition: {layer: foreground IoU}} of a per-token logistic probe on image values (all KV heads) of each
    layer, fitted on the first `train_fraction` of `scenes` (synthetic `Scene`s) and scored on the rest, with each
    block set applied to the image queries (the only way a key block reaches image values). A token is
    foreground when >= `token_fraction` of its pixels are an object; IoU over all test tokens."""
    from sightline.capture import apply_edits
    from sightline.models.layout import mask_to_tokens
    from sightline.perception.readouts import fit_token_classifier
    from sightline.perception.represent import Featurizer, Rep

    reps = [Rep("values", int(L)) for L in layers]
    images = [s.to_pil() for s in scenes]
    n_train = max(1, round(len(scenes) * train_fraction))
    if n_train >= len(scenes):
        raise UserError(f"the foreground readout needs scenes to test on: {len(scenes)} scenes, {n_train} for training")
    probe = adapter.prepare(images[:1], [adapter.render_prompt("")])
    lay0 = probe.layouts[0]
    grid0 = lay0.grid_positions(0, 0).reshape(-1)
    after0 = int(lay0.image_positions.max()) + 1
    labels = [torch.as_tensor(mask_to_tokens(lay0, s.class_mask > 0).reshape(-1) >= token_fraction) for s in scenes]
    out: dict[str, dict[int, float]] = {}
    for name, block in blocks.items():
        edits = block_edits(adapter, [grid0], [after0], block, n_columns=probe.inputs["input_ids"].shape[1],
                            image_queries=True, broadcast=True)
        feat = Featurizer(adapter, reps, batch_size=batch_size)
        with apply_edits(adapter, edits):
            feats = feat(images)
        res = {}
        for rep in reps:
            x = [f.feats[rep.name] for f in feats]
            clf = fit_token_classifier(torch.cat(x[:n_train]), torch.cat(labels[:n_train]).long(), l2=l2,
                                       class_weight="balanced")
            pred = torch.cat([clf.predict(t) for t in x[n_train:]])
            truth = torch.cat(labels[n_train:])
            union = int((pred | truth).sum())
            res[rep.layer] = float((pred & truth).sum()) / union if union else 1.0
        out[name] = res
    return out

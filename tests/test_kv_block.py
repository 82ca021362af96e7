"""Blocking chosen image keys: equal to a forward given the explicit 4-D masks, a no-op when nothing is blocked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import gradient_image

from sightline.capture import apply_edits, cache_kwarg
from sightline.kv.block import (
    block_edits,
    blocked_answers,
    left_padded,
    lowest_keys,
    query_heads,
    random_block_set,
)

BLOCK = {(1, 0): [10, 11], (1, 1): [10, 11], (2, 0): [3, 17, 40], (3, 1): [0, 5, 63]}  # layer 1: one edit, all heads


@pytest.fixture(scope="module")
def batch(organism):
    """Two images, prompts of different lengths (right-padded)."""
    images = [gradient_image(112, 112, seed=s) for s in (0, 1)]
    prompts = ["What shape is shown?", "Is there a red circle on the left of the image?"]
    return organism.prepare(images, [organism.render_prompt(p) for p in prompts])


def _forward(ad, inputs, edits=(), masks=None):
    """(logits, values [L][B, n_kv, S, hd]) of one forward; `masks`: {layer: explicit mask} swapped in by a pre-hook."""
    from transformers import DynamicCache

    cache = DynamicCache(config=ad.model.config)
    hooks = []
    for L, m in (masks or {}).items():
        hooks.append(ad.attention(L).register_forward_pre_hook(
            lambda mod, a, kw, m=m: (a, {**kw, "attention_mask": m}), with_kwargs=True))
    try:
        with torch.no_grad(), apply_edits(ad, list(edits)):
            out = ad.model(**batch_inputs(inputs), **{cache_kwarg(ad.model): cache}, use_cache=True, return_dict=True)
    finally:
        for h in hooks:
            h.remove()
    return out.logits, [cache.layers[L].values.clone() for L in range(ad.n_layers)]


def batch_inputs(inputs):
    return {k: v for k, v in inputs.items()}


def _explicit_masks(ad, batch, block, image_queries):
    """Brute force: per layer a bool [B, n_heads, S, S] mask (True = attend), causal and padding, with every blocked
    (query head, query, key) triple removed, built position by position from the layouts."""
    att = batch.inputs["attention_mask"].bool()
    B, S = att.shape
    base = torch.tril(torch.ones(S, S, dtype=torch.bool))[None, None] & att[:, None, None, :]
    group = ad.n_heads // ad.n_kv_heads
    masks = {}
    for (L, h), idx in block.items():
        m = masks.setdefault(L, base.expand(B, ad.n_heads, S, S).clone())
        for b, lay in enumerate(batch.layouts):
            grid = lay.grid_positions(0, 0).reshape(-1)
            last_image = lay.image_positions.max()
            for q in range(S):
                if q > last_image or (image_queries and q in set(grid.tolist())):
                    for k in grid[idx]:
                        for qh in range(h * group, (h + 1) * group):
                            m[b, qh, q, k] = False
    return masks


@pytest.mark.parametrize("image_queries", [False, True])
def test_block_equals_the_forward_with_explicit_masks(organism, batch, image_queries):
    ad = organism
    grid = [lay.grid_positions(0, 0).reshape(-1) for lay in batch.layouts]
    after = [int(lay.image_positions.max()) + 1 for lay in batch.layouts]
    S = batch.inputs["input_ids"].shape[1]
    edits = block_edits(ad, grid, after, BLOCK, n_columns=S, image_queries=image_queries)
    assert len(edits) == 3  # layer 1 merged (same keys on every head), one per head elsewhere
    got_logits, got_values = _forward(ad, batch.inputs, edits)
    ref_logits, ref_values = _forward(ad, batch.inputs, masks=_explicit_masks(ad, batch, BLOCK, image_queries))
    clean_logits, clean_values = _forward(ad, batch.inputs)
    real = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(got_logits[real], ref_logits[real], rtol=1e-5, atol=1e-5)
    for L in range(ad.n_layers):
        torch.testing.assert_close(got_values[L], ref_values[L], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got_logits[real], clean_logits[real], atol=1e-4)
    for b, lay in enumerate(batch.layouts):  # image values move only when image queries are blocked too
        img = torch.as_tensor(lay.image_positions)
        same = all(torch.equal(got_values[L][b][:, img], clean_values[L][b][:, img]) for L in range(ad.n_layers))
        assert same == (not image_queries)


def test_blocking_no_keys_changes_nothing(organism, batch):
    ad = organism
    grid = [lay.grid_positions(0, 0).reshape(-1) for lay in batch.layouts]
    after = [int(lay.image_positions.max()) + 1 for lay in batch.layouts]
    S = batch.inputs["input_ids"].shape[1]
    clean_logits, clean_values = _forward(ad, batch.inputs)
    for block in ({}, {(2, 0): [], (3, 1): np.array([], np.int64)}):
        edits = block_edits(ad, grid, after, block, n_columns=S, image_queries=True)
        assert edits == []
        logits, values = _forward(ad, batch.inputs, edits)
        assert torch.equal(logits, clean_logits)
        assert all(torch.equal(a, b) for a, b in zip(values, clean_values))


def test_answers_without_a_block_are_the_organisms_own(organism):
    from sightline.organism.evaluate import answer, eval_items

    items = eval_items(3, 6)
    images, prompts = [i[0] for i in items], [i[1] for i in items]
    assert blocked_answers(organism, images, prompts, {}) == answer(organism, images, prompts)
    inputs, grid, after = left_padded(organism, images, prompts)
    ids = inputs["input_ids"]
    for b in range(len(items)):  # the shifted positions are the image tokens, and the first one after them
        assert (ids[b, grid[b]] == organism.image_token_id).all()
        assert ids[b, after[b]] != organism.image_token_id and ids[b, after[b] - 1] == organism.image_token_id
        assert (ids[b] == organism.image_token_id).sum() == len(grid[b])


def test_random_control_matches_counts_and_avoids_the_flagged():
    block = {(2, 0): [1, 2, 3], (3, 1): [63], (0, 0): []}
    ctrl = random_block_set(block, 64, seed=4)
    assert set(ctrl) == {(2, 0), (3, 1)}
    assert len(ctrl[2, 0]) == 3 and len(ctrl[3, 1]) == 1
    assert not set(ctrl[2, 0]) & {1, 2, 3} and 63 not in ctrl[3, 1]
    assert all(np.array_equal(ctrl[k], random_block_set(block, 64, seed=4)[k]) for k in ctrl)
    stat = np.random.default_rng(0).random((2, 2, 64))
    low = lowest_keys(stat, [2, 3], 5)
    assert set(low[3, 1]) == set(np.argsort(stat[1, 1])[:5])


def test_query_heads_follow_grouped_query_attention(organism):
    assert query_heads(organism, 0) == [0, 1] and query_heads(organism, 1) == [2, 3]


# ------------------------------------------------------------------ several images in one prompt
MULTI_PROMPTS = ["Which image has the same style as the first?", "What shape is shown?", "Are they the same?"]


@pytest.fixture(scope="module")
def multi(organism):
    """A left-padded batch of three prompts: three images, one image (alone, not in a list), two images."""
    ims = [gradient_image(112, 112, seed=s) for s in range(5)]
    images = [[ims[0], ims[1], ims[2]], ims[3], [ims[4], ims[0]]]
    return images, left_padded(organism, images, MULTI_PROMPTS)


def _explicit_multi_masks(ad, inputs, block, image_queries):
    """Brute force from the token ids alone: image i of a prompt is its i-th run of P image tokens (P = the image
    tokens over the images); (q, k) is blocked when k is a blocked grid index of some image and q is after the
    prompt's last image token, or (image_queries) q is an image token at or after k (the key's own token
    too). Padded rows see themselves."""
    ids, att = inputs["input_ids"], inputs["attention_mask"].bool()
    B, S = ids.shape
    base = (torch.tril(torch.ones(S, S, dtype=torch.bool))[None] & att[:, None, :]) | torch.eye(S, dtype=torch.bool)
    group = ad.n_heads // ad.n_kv_heads
    masks = {}
    for (L, h), idx in block.items():
        m = masks.setdefault(L, base[:, None].expand(B, ad.n_heads, S, S).clone())
        for b in range(B):
            img = [p for p in range(S) if ids[b, p] == ad.image_token_id]
            n_images = 1 if b == 1 else len(img) // 64  # the organism's grid: 8 x 8
            P = len(img) // n_images
            keys = [img[i * P + j] for i in range(n_images) for j in idx]
            for k in keys:
                for q in range(S):
                    if q > img[-1] or (image_queries and q >= k and ids[b, q] == ad.image_token_id):
                        m[b, h * group:(h + 1) * group, q, k] = False
    return masks


@pytest.mark.parametrize("image_queries", [False, True])
def test_multi_image_block_equals_the_forward_with_explicit_masks(organism, multi, image_queries):
    ad = organism
    _, (inputs, grid, after) = multi
    assert [len(g) if isinstance(g, list) else 1 for g in grid] == [3, 1, 2]
    S = inputs["input_ids"].shape[1]
    edits = block_edits(ad, grid, after, BLOCK, n_columns=S, image_queries=image_queries)
    got_logits, got_values = _forward(ad, inputs, edits)
    ref_logits, ref_values = _forward(ad, inputs, masks=_explicit_multi_masks(ad, inputs, BLOCK, image_queries))
    clean_logits, clean_values = _forward(ad, inputs)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got_logits[real], ref_logits[real], rtol=1e-5, atol=1e-5)
    for L in range(ad.n_layers):
        torch.testing.assert_close(got_values[L].transpose(1, 2)[real], ref_values[L].transpose(1, 2)[real],
                                   rtol=1e-5, atol=1e-5)
    for b in range(3):  # every prompt is changed at its last position
        assert not torch.allclose(got_logits[b, -1], clean_logits[b, -1], atol=1e-4)
    # the first image's values: untouched without image queries; with them, moved from the block's first layer on
    # (its own later tokens read its blocked keys)
    first = torch.as_tensor(grid[0][0])
    for L in range(ad.n_layers):
        same = torch.equal(got_values[L][0][:, first], clean_values[L][0][:, first])
        assert same == (not image_queries or L <= min(k[0] for k in BLOCK))


def test_multi_image_prompt_is_the_images_in_order_then_the_text(organism, multi):
    """Each row of the left-padded batch is, token for token and pixel for pixel, the processor's own input for
    the family's chat-template turn holding the prompt's images in order, then the text, given alone."""
    from sightline.kv.surfacing import multi_image_prompt

    images, (inputs, grid, after) = multi
    ids, att = inputs["input_ids"], inputs["attention_mask"].bool()
    rows = []
    for b, (ims, text) in enumerate(zip(images, MULTI_PROMPTS)):
        ims = ims if isinstance(ims, list) else [ims]
        prompt = organism.render_prompt(text) if len(ims) == 1 else multi_image_prompt(organism, len(ims), text)
        alone = organism.processor(images=ims, text=[prompt], return_tensors="pt")
        assert torch.equal(ids[b][att[b]], alone["input_ids"][0])
        rows.append(alone["pixel_values"])
        g = grid[b] if isinstance(grid[b], list) else [grid[b]]
        shift = int((~att[b]).sum())
        assert all(np.array_equal(x, shift + np.flatnonzero(alone["input_ids"][0] == organism.image_token_id)[
            k * 64:(k + 1) * 64]) for k, x in enumerate(g))
        assert after[b] == 1 + g[-1][-1]
    assert torch.equal(inputs["pixel_values"], torch.cat(rows))


def test_mixed_image_counts_batch_as_each_prompt_alone(tiny_adapter):
    """Qwen2.5-VL (grids follow the image size, M-RoPE over several images): a batch mixing numbers and sizes of
    images gives each prompt's last logits as that prompt alone; LLaVA-OneVision refuses several images in one line."""
    from sightline.errors import UserError

    ad = tiny_adapter("qwen2_5_vl")
    a, b, c = gradient_image(112, 112, 0), gradient_image(84, 140, 1), gradient_image(112, 112, 2)
    images, prompts = [[a, b], c, [c, a, b]], ["Same?", "What is it?", "Which two match?"]
    inputs, grid, _ = left_padded(ad, images, prompts)
    assert [[len(x) for x in g] if isinstance(g, list) else len(g) for g in grid] == [[16, 15], 16, [16, 16, 15]]
    with torch.no_grad():
        got = ad.model(**inputs).logits[:, -1]
        for i in range(3):
            one = ad.model(**left_padded(ad, [images[i]], [prompts[i]])[0]).logits[0, -1]
            torch.testing.assert_close(got[i], one, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="several images in one prompt") as err:
        left_padded(tiny_adapter("llava_onevision"), [[a, c]], ["Same?"])
    assert len(str(err.value).splitlines()) == 1


def test_text_between_images_is_a_text_query(organism):
    """With several images, the positions between one image's grid and the next's (a chat template's separators)
    are text queries too: they could read an earlier image's blocked keys and carry them to the answer."""
    grids = [np.arange(10, 14), np.arange(20, 24)]
    (e,) = block_edits(organism, [grids], [26], {(1, 0): [0, 2]}, n_columns=30)
    assert sorted(np.asarray(e.keys[0]).tolist()) == [10, 12, 20, 22]  # the block set's indices in every image
    assert sorted(np.asarray(e.queries[0]).tolist()) == [*range(14, 20), *range(26, 30)]
    (e,) = block_edits(organism, [grids], [26], {(1, 0): [0, 2]}, n_columns=30, image_queries=True)
    assert sorted(np.asarray(e.queries[0]).tolist()) == [*range(10, 24), *range(26, 30)]
    (one,) = block_edits(organism, [grids[0]], [14], {(1, 0): [0, 2]}, n_columns=18)  # one image: nothing between
    assert sorted(np.asarray(one.queries[0]).tolist()) == [14, 15, 16, 17]

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

"""Attention edits: a block equals Hugging Face's own forward given the equivalent explicit 4-D mask, for every family,
under sdpa and eager, for one forward and for generate; a no-op block is bit-for-bit the bare forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FAMILIES, gradient_image
from sightline.capture import BlockAttention, Capture, Edit, add_vector, apply_edits, cache_kwarg
from sightline.errors import UserError

IMPLS = ("sdpa", "eager")
# Families whose own mask is not plain causal (bidirectional image blocks, sliding windows): the explicit-mask
# references below build a causal mask, so these are checked against HF's OWN per-layer masks instead
# (test_block_equals_hf_own_mask_with_pairs_removed).
OWN_MASK = ("gemma3", "paligemma", "aya_vision")
CAUSAL = tuple(f for f in FAMILIES if f not in OWN_MASK)
# The first five families run every variant by default; the later ones run one representative check by default
# (a block at every layer, sdpa and eager, equal to HF) and their other variants under `-m slow`, to keep the
# default suite's time (each family's variants cost about a minute on 2 cores).
FIRST = ("llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen2_vl")


def variants(families):
    """Families as parameters, the later ones marked slow."""
    return [f if f in FIRST else pytest.param(f, marks=pytest.mark.slow) for f in families]
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint):
    """(family, attn_implementation) -> a freshly loaded adapter running that implementation."""
    from sightline.models import load_model

    cache: dict = {}

    def get(family: str, impl: str):
        if (family, impl) not in cache:
            ad = load_model(tiny_checkpoint(family))
            ad.model.set_attn_implementation(impl)
            assert ad.attn_implementation == impl
            cache[family, impl] = ad
        return cache[family, impl]

    return get


def _batch(ad, n: int = 2, seeds=(0, 1)):
    """n examples of the same image size, prompts of different lengths (so the batch is padded)."""
    prompts = ["What is shown?", "Describe the image in detail, please."][:n]
    images = [gradient_image(60, 80, seed=s) for s in seeds[:n]]
    return ad.prepare(images, [ad.render_prompt(p) for p in prompts])


def _image_keys_text_queries(batch):
    """Block every image key (newlines included) from every text query, per example."""
    keys = [lay.image_positions for lay in batch.layouts]
    queries = [lay.text_positions for lay in batch.layouts]
    return keys, queries


def _explicit_mask(ad, batch, keys, queries=None, heads=None, dtype=torch.float32):
    """HF's causal + padding mask with the blocked (query, key) pairs removed, in the format `ad` runs:
    bool (True = attend) for sdpa, additive float for eager; [B, 1 or n_heads, S, S]."""
    att = batch.inputs["attention_mask"].bool()
    B, S = att.shape
    allowed = torch.tril(torch.ones(S, S, dtype=torch.bool))[None, None] & att[:, None, None, :]
    n_h = ad.n_heads if heads is not None else 1
    allowed = allowed.expand(B, n_h, S, S).clone()
    for b in range(B):
        rows = torch.arange(S) if queries is None else torch.as_tensor(queries[b])
        cols = torch.as_tensor(keys[b])
        hs = torch.as_tensor(list(heads) if heads is not None else [0])
        allowed[b, hs[:, None, None], rows[None, :, None], cols[None, None, :]] = False
    if ad.attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def _clean(ad, inputs):
    """Bare forward, with what the decoder and each block received (to replay them with a mask)."""
    seen: dict = {}
    hooks = [ad.decoder.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("decoder", kw), with_kwargs=True)]
    hooks += [layer.register_forward_pre_hook(lambda m, a, kw, L=L: seen.__setitem__(L, (a, kw)), with_kwargs=True)
              for L, layer in enumerate(ad.decoder_layers)]
    try:
        with torch.no_grad():
            out = ad.model(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def _decoder_with_mask(ad, seen, mask):
    """HF's own decoder on the same embeddings and (M-)RoPE positions, given an explicit 4-D mask."""
    # everything the decoder got in the clean run (embeddings, (M-)RoPE positions, Qwen3-VL's deepstack
    # features, ...) but the mask and the cache
    kw = {k: v for k, v in seen["decoder"].items()
          if k not in ("attention_mask", "use_cache", "past_key_values", "cache", "output_hidden_states", "return_dict")}
    with torch.no_grad():
        out = ad.decoder(**kw, attention_mask=mask, use_cache=False, output_hidden_states=True)
        logits = ad.model.lm_head(out.last_hidden_state)
    return out, logits


def _blocked(ad, inputs, edits):
    with torch.no_grad(), apply_edits(ad, edits):
        return ad.model(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", CAUSAL)
def test_block_at_every_layer_equals_hf_with_explicit_mask(adapter, family, impl):
    ad = adapter(family, impl)
    batch = _batch(ad)
    keys, queries = _image_keys_text_queries(batch)
    clean, seen = _clean(ad, batch.inputs)
    got = _blocked(ad, batch.inputs, [BlockAttention(ad.kv_layers, keys, queries)])
    ref, logits = _decoder_with_mask(ad, seen, _explicit_mask(ad, batch, keys, queries))
    torch.testing.assert_close(got.logits, logits, **TOL)
    assert not torch.allclose(got.logits, clean.logits)  # the block did something
    for L in range(ad.n_layers):  # hidden_states[n_layers] is after the final norm: last_hidden_state
        torch.testing.assert_close(got.hidden_states[L], ref.hidden_states[L], **TOL)
    torch.testing.assert_close(got.hidden_states[-1], ref.last_hidden_state, **TOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", variants(CAUSAL))
def test_per_head_block_equals_hf_with_per_head_mask(adapter, family, impl):
    """HF takes a [B, n_heads, S, S] mask as is (eager adds it; sdpa repeats KV heads when given a mask)."""
    ad = adapter(family, impl)
    batch = _batch(ad)
    keys, queries = _image_keys_text_queries(batch)
    heads = [1, ad.n_heads - 1]
    clean, seen = _clean(ad, batch.inputs)
    got = _blocked(ad, batch.inputs, [BlockAttention(ad.kv_layers, keys, queries, heads=heads)])
    ref, logits = _decoder_with_mask(ad, seen, _explicit_mask(ad, batch, keys, queries, heads=heads))
    torch.testing.assert_close(got.logits, logits, **TOL)
    torch.testing.assert_close(got.hidden_states[-1], ref.last_hidden_state, **TOL)
    assert not torch.allclose(got.logits, clean.logits)  # the heads mattered


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", variants(CAUSAL))
def test_block_at_one_layer_equals_that_block_run_with_explicit_mask(adapter, family, impl):
    """Layers below are untouched bit for bit; the chosen block equals HF's block given the mask."""
    ad = adapter(family, impl)
    batch = _batch(ad)
    keys, queries = _image_keys_text_queries(batch)
    L = ad.kv_layers[-1]
    clean, seen = _clean(ad, batch.inputs)
    got = _blocked(ad, batch.inputs, [BlockAttention(L, keys, queries)])
    for i in range(L + 1):
        assert torch.equal(got.hidden_states[i], clean.hidden_states[i])
    a, kw = seen[L]
    kw = {**kw, "attention_mask": _explicit_mask(ad, batch, keys, queries)}
    with torch.no_grad():
        ref = ad.decoder_layers[L](*a, **kw)
    ref = ref[0] if isinstance(ref, tuple) else ref
    torch.testing.assert_close(ad.decoder.norm(ref), got.hidden_states[L + 1], **TOL)
    assert not torch.allclose(got.hidden_states[L + 1], clean.hidden_states[L + 1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", variants(FAMILIES))
def test_noop_block_is_the_bare_forward_bit_for_bit(adapter, family, impl):
    ad = adapter(family, impl)
    for n in (1, 2):  # sdpa gets no mask at all for one unpadded example, a padded mask for two
        batch = _batch(ad, n)
        clean, _ = _clean(ad, batch.inputs)
        got = _blocked(ad, batch.inputs, [BlockAttention(ad.kv_layers, np.array([], np.int64))])
        assert torch.equal(got.logits, clean.logits)
        assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, clean.hidden_states))


def _reference_decode(ad, inputs, steps, mask_for_call):
    """Greedy decoding by hand with HF's cache; `mask_for_call(call, n_keys)` gives the explicit 4-D mask the
    decoder receives in that call (None: HF's own). Returns the tokens and each step's logits [steps, vocab]."""
    from transformers import DynamicCache

    cache = DynamicCache(config=ad.model.config)
    eos = ad.model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    att = inputs["attention_mask"]
    call = {"i": 0}

    def swap(m, a, kw):
        n_keys = att.shape[1]
        mask = mask_for_call(call["i"], n_keys)
        call["i"] += 1
        return (a, {**kw, "attention_mask": mask}) if mask is not None else None

    tokens, logits = [], []
    hook = ad.decoder.register_forward_pre_hook(swap, with_kwargs=True)
    try:
        with torch.no_grad():
            out = ad.model(**inputs, **{cache_kwarg(ad.model): cache}, use_cache=True, return_dict=True)
            for _ in range(steps):
                logits.append(out.logits[:, -1])
                scores = out.logits[:, -1].clone()
                scores[:, eos] = float("-inf")  # as generate's min_new_tokens: no end of sequence yet
                nxt = scores.argmax(-1, keepdim=True)
                tokens.append(int(nxt))
                att = torch.cat([att, torch.ones_like(nxt)], 1)
                pos = torch.tensor([[att.shape[1] - 1]])
                deltas = getattr(ad.model.model, "rope_deltas", None)  # M-RoPE: text position + the prompt's delta
                extra = {} if deltas is None else {"position_ids": (pos + deltas)[None].expand(3, -1, -1)}
                out = ad.model(input_ids=nxt, attention_mask=att, **{cache_kwarg(ad.model): cache}, use_cache=True,
                               cache_position=pos[0], return_dict=True, **extra)
    finally:
        hook.remove()
    return tokens, torch.cat(logits)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", variants(CAUSAL))
def test_generate_with_block_equals_hand_decoding_with_explicit_masks(adapter, family, impl):
    """Prefill-only: text queries lose the image keys in the prompt, decoding is clean. Every step (queries None):
    every query of the prompt and every generated token loses the image keys (the prompt's text before the image
    keeps every image query something to attend to)."""
    ad = adapter(family, impl)
    batch = _batch(ad, 1)
    keys, queries = _image_keys_text_queries(batch)
    S = batch.inputs["input_ids"].shape[1]
    n = 4

    def new_token_mask(n_keys):  # the generated query sees every key but the image's
        allowed = torch.ones(1, 1, 1, n_keys, dtype=torch.bool)
        allowed[..., torch.as_tensor(keys[0])] = False
        if ad.attn_implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)

    prompt_text = _explicit_mask(ad, batch, keys, queries)
    prompt_all = _explicit_mask(ad, batch, keys, None)
    cases = [
        (BlockAttention(ad.kv_layers, keys, queries), lambda call, k: None if call else prompt_text),
        (BlockAttention(ad.kv_layers, keys, None, prefill_only=False),
         lambda call, k: new_token_mask(k) if call else prompt_all),
    ]
    for block, masks in cases:
        with torch.no_grad(), apply_edits(ad, [block]):
            out = ad.model.generate(**batch.inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True)
        tokens, logits = _reference_decode(ad, batch.inputs, n, masks)
        assert out.sequences[0, S:].tolist() == tokens, f"prefill_only={block.prefill_only}"
        torch.testing.assert_close(torch.cat(out.logits), logits, **TOL)
    # the generated tokens' own block mattered: the same prompt with clean decoding gives other logits
    _, prefill_all_only = _reference_decode(ad, batch.inputs, n, lambda call, k: None if call else prompt_all)
    assert not torch.allclose(prefill_all_only[1:], logits[1:])


def _remove_pairs(mask, impl, keys, queries, heads, n_heads):
    """HF's own 4-D mask with the blocked (query, key) pairs removed, per example (and head)."""
    B, _, S, K = mask.shape
    n_h = n_heads if heads is not None else mask.shape[1]
    out = mask.expand(B, n_h, S, K).clone()
    fill = False if out.dtype == torch.bool else torch.finfo(out.dtype).min
    hs = torch.as_tensor(list(heads) if heads is not None else range(n_h))
    for b in range(B):
        rows = torch.as_tensor(queries[b])
        cols = torch.as_tensor(keys[b])
        out[b, hs[:, None, None], rows[None, :, None], cols[None, None, :]] = fill
    return out


@pytest.mark.parametrize("heads", [None, pytest.param([1, 3], marks=pytest.mark.slow)])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", [f for f in OWN_MASK if f in FAMILIES])
def test_block_equals_hf_own_mask_with_pairs_removed(adapter, family, impl, heads):
    """Bidirectional / sliding-window families: a block equals HF's decoder given, per layer type, the mask HF
    itself built for that type with the blocked pairs removed."""
    ad = adapter(family, impl)
    batch = _batch(ad)
    keys, queries = _image_keys_text_queries(batch)
    own: dict = {}
    hooks = [ad.attention(L).register_forward_pre_hook(
        lambda m, a, kw, L=L: own.__setitem__(L, kw["attention_mask"]), with_kwargs=True) for L in range(ad.n_layers)]
    try:
        clean, seen = _clean(ad, batch.inputs)
    finally:
        for h in hooks:
            h.remove()
    types = getattr(ad.text_config, "layer_types", None) or ["full_attention"] * ad.n_layers
    assert all(own[L] is not None for L in own)  # HF writes these masks out (bidirectional parts)
    masks = {types[L]: _remove_pairs(own[L], impl, keys, queries, heads, ad.n_heads) for L in range(ad.n_layers)}
    got = _blocked(ad, batch.inputs, [BlockAttention(ad.kv_layers, keys, queries, heads=heads)])
    ref, logits = _decoder_with_mask(ad, seen, masks if len(set(types)) > 1 else masks[types[0]])
    torch.testing.assert_close(got.logits, logits, **TOL)
    torch.testing.assert_close(got.hidden_states[-1], ref.last_hidden_state, **TOL)
    assert not torch.allclose(got.logits, clean.logits)


@pytest.mark.parametrize("family", variants(FAMILIES))
def test_text_blocked_from_image_at_every_layer_does_not_depend_on_the_image(adapter, family):
    ad = adapter(family, "sdpa")
    if ad.kv_layers != list(range(ad.n_layers)):
        pytest.skip("linear-attention layers (no mask to edit) carry the image into the text positions")
    one, two = (ad.prepare([gradient_image(60, 80, seed=s)], [ad.render_prompt("What is shown?")]) for s in (0, 5))
    assert torch.equal(one.inputs["input_ids"], two.inputs["input_ids"])
    keys, queries = _image_keys_text_queries(one)
    sites = [f"resid.{L}" for L in range(1, ad.n_layers + 1)]
    block = BlockAttention(ad.kv_layers, keys, queries)
    got = []
    for batch in (one, two):
        with apply_edits(ad, [block]):
            got.append(Capture(ad, sites).run(batch, queries)[0])
        free = Capture(ad, sites).run(batch, queries)[0]
        got.append(free)
    blocked_one, free_one, blocked_two, free_two = got
    after_image = queries[0] > keys[0].max()
    for s in sites:
        torch.testing.assert_close(blocked_one[s], blocked_two[s], rtol=0, atol=1e-6)
        assert not torch.allclose(free_one[s][after_image], free_two[s][after_image])  # the image did matter


def test_activation_and_attention_edits_together(adapter):
    """Both kinds in one apply_edits compose: equal to the activation edit fed into HF's decoder with the mask."""
    ad = adapter("llava", "sdpa")
    batch = _batch(ad)
    keys, queries = _image_keys_text_queries(batch)
    v = torch.randn(ad.hidden_size, generator=torch.Generator().manual_seed(0))
    img = [lay.image_positions for lay in batch.layouts]
    _, seen = _clean(ad, batch.inputs)
    got = _blocked(ad, batch.inputs, [Edit("resid.0", img, add_vector(v, 3.0)),
                                      BlockAttention(ad.kv_layers, keys, queries)])
    embeds = seen["decoder"]["inputs_embeds"].clone()
    for b, p in enumerate(img):
        embeds[b, p] += 3.0 * v
    _, logits = _decoder_with_mask(ad, {"decoder": {**seen["decoder"], "inputs_embeds": embeds}},
                                     _explicit_mask(ad, batch, keys, queries))
    torch.testing.assert_close(got.logits, logits, **TOL)


@pytest.mark.parametrize("make,message", [
    (lambda ad: BlockAttention(ad.n_layers, [np.array([1])]), "attention edit layer 2 out of range: this model has 2"),
    (lambda ad: BlockAttention([0, -1], [np.array([1])]), "layer -1 out of range"),
    (lambda ad: BlockAttention(0, [np.array([1])], heads=[ad.n_heads]), "head 4 out of range: each layer has 4 query heads"),
    (lambda ad: BlockAttention([], [np.array([1])]), "no layers"),
])
def test_bad_attention_edits_are_user_errors(adapter, make, message):
    ad = adapter("llava", "sdpa")
    batch = _batch(ad, 1)
    with pytest.raises(UserError, match=message) as err:
        with apply_edits(ad, [make(ad)]):
            ad.model(**batch.inputs)
    assert "\n" not in str(err.value)
    assert sum(len(m._forward_pre_hooks) for m in ad.model.modules()) == 0  # nothing left behind


def test_unsupported_attention_implementation_is_a_user_error(adapter):
    ad = adapter("llava", "sdpa")
    ad.model.set_attn_implementation("flex_attention")
    try:
        with pytest.raises(UserError, match="need attn_implementation 'sdpa' or 'eager', not 'flex_attention'"):
            with apply_edits(ad, [BlockAttention(0, [np.array([1])])]):
                pass
    finally:
        ad.model.set_attn_implementation("sdpa")

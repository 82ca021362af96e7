"""Edits at sites: exact against Hugging Face's own computation, visible to captures, prefill-only under generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import gradient_image
from sightline.capture import Capture, cache_kwarg
from sightline.capture.edit import Edit, add_vector, apply_edits, replace_with
from sightline.errors import UserError

EDIT_FAMILIES = ("llava", "qwen2_5_vl")  # plain RoPE and M-RoPE


def _one(ad, prompt="What is shown?"):
    return ad.prepare([gradient_image(60, 80)], [ad.render_prompt(prompt)])


@pytest.mark.parametrize("family", EDIT_FAMILIES)
def test_resid0_edit_equals_feeding_edited_embeddings(tiny_adapter, family):
    """Adding v at resid.0 image positions == HF's language model run on inputs_embeds + v there."""
    ad = tiny_adapter(family)
    batch = _one(ad)
    pos = batch.layouts[0].image_positions
    v = torch.randn(ad.hidden_size, generator=torch.Generator().manual_seed(0))
    seen = {}
    hook = ad.decoder.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            clean = ad.model(**batch.inputs, output_hidden_states=True, return_dict=True)
    finally:
        hook.remove()
    with torch.no_grad():
        with apply_edits(ad, [Edit("resid.0", [pos], add_vector(v, 3.0))]):
            edited = ad.model(**batch.inputs, output_hidden_states=True, return_dict=True)
        embeds = clean.hidden_states[0].clone()
        embeds[0, pos] += 3.0 * v
        ref = ad.decoder(inputs_embeds=embeds, attention_mask=batch.inputs["attention_mask"],
                         position_ids=seen["position_ids"])  # the (M-)RoPE positions the full model used
    torch.testing.assert_close(edited.hidden_states[-1], ref.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(edited.hidden_states[-1], clean.hidden_states[-1])


@pytest.mark.parametrize("family", EDIT_FAMILIES)
def test_capture_inside_edit_sees_exactly_the_edit(tiny_adapter, family):
    ad = tiny_adapter(family)
    batch = _one(ad)
    lay = batch.layouts[0]
    pos = lay.image_positions[::3]
    L = ad.n_layers  # resid.{n_layers}: output of the last block; also check a middle layer
    for site in (f"resid.{L}", "resid.1"):
        v = torch.randn(ad.hidden_size, generator=torch.Generator().manual_seed(1))
        everything = [lay.positions("all")]
        before = Capture(ad, [site, "resid.0"]).run(batch, everything)[0]
        with apply_edits(ad, [Edit(site, [pos], add_vector(v, 2.0))]):
            after = Capture(ad, [site, "resid.0"]).run(batch, everything)[0]
        delta = after[site] - before[site]
        expect = torch.zeros_like(delta)
        expect[pos] = 2.0 * v
        torch.testing.assert_close(delta, expect, rtol=1e-5, atol=1e-4)
        assert torch.equal(after["resid.0"], before["resid.0"])  # upstream untouched


def test_edit_changes_only_later_positions(tiny_adapter):
    """Causality: an edit at position p leaves every earlier position's later-layer state unchanged."""
    ad = tiny_adapter("llava")
    batch = _one(ad)
    lay = batch.layouts[0]
    p = int(lay.image_positions[len(lay.image_positions) // 2])
    allpos = [lay.positions("all")]
    before = Capture(ad, ["resid.2"]).run(batch, allpos)[0]["resid.2"]
    with apply_edits(ad, [Edit("resid.1", [np.array([p])], replace_with(torch.zeros_like))]):
        after = Capture(ad, ["resid.2"]).run(batch, allpos)[0]["resid.2"]
    assert torch.equal(after[:p], before[:p])
    assert not torch.allclose(after[p:], before[p:])


def _greedy(ad, inputs, steps, edit_every_call=None):
    """Reference greedy decoding with HF's cache: prefill, then one token per call."""
    from transformers import DynamicCache

    cache = DynamicCache(config=ad.model.config)
    att = inputs["attention_mask"]
    out_tokens = []
    with torch.no_grad():
        out = ad.model(**inputs, **{cache_kwarg(ad.model): cache}, use_cache=True, return_dict=True)
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out_tokens.append(int(nxt))
            att = torch.cat([att, torch.ones_like(nxt)], 1)
            pos = torch.tensor([[att.shape[1] - 1]])
            kw = dict(input_ids=nxt, attention_mask=att, **{cache_kwarg(ad.model): cache}, use_cache=True,
                      cache_position=pos[0], return_dict=True)
            if edit_every_call is not None:
                with apply_edits(ad, [edit_every_call]):
                    out = ad.model(**kw)
            else:
                out = ad.model(**kw)
    return out_tokens


def test_prefill_only_edit_under_generate_equals_edited_prefill_then_clean_decoding(tiny_adapter):
    ad = tiny_adapter("llava")
    batch = _one(ad)
    pos = batch.layouts[0].image_positions
    v = torch.randn(ad.hidden_size, generator=torch.Generator().manual_seed(2))
    edit = Edit("resid.1", [pos], add_vector(v, 50.0))
    n = 6
    with torch.no_grad():
        clean = ad.model.generate(**batch.inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        with apply_edits(ad, [edit]):
            steered = ad.model.generate(**batch.inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    with apply_edits(ad, [edit]):  # the edit sees the prefill only, then the reference decodes clean
        ref = _greedy(ad, batch.inputs, n)
    S = batch.inputs["input_ids"].shape[1]
    assert steered[0, S:].tolist() == ref
    assert steered[0, S:].tolist() != clean[0, S:].tolist()  # the edit did something


def test_every_step_edit_reaches_generated_tokens(tiny_adapter):
    ad = tiny_adapter("llava")
    batch = _one(ad)
    v = torch.randn(ad.hidden_size, generator=torch.Generator().manual_seed(3))
    edit = Edit("resid.2", None, add_vector(v, 20.0), prefill_only=False)
    n = 5
    with torch.no_grad(), apply_edits(ad, [edit]):
        steered = ad.model.generate(**batch.inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    with apply_edits(ad, [edit]):
        ref = _greedy(ad, batch.inputs, n, edit_every_call=edit)
    S = batch.inputs["input_ids"].shape[1]
    assert steered[0, S:].tolist() == ref


def test_bad_edit_sites_are_user_errors(tiny_adapter):
    ad = tiny_adapter("llava")
    batch = _one(ad)
    for site, msg in (("values.0", "cannot be edited"), (f"resid.{ad.n_layers + 1}", "out of range"),
                      ("mlp_out.99", "out of range")):
        with pytest.raises(UserError, match=msg):
            with apply_edits(ad, [Edit(site, None, replace_with(torch.zeros_like))]):
                ad.model(**batch.inputs)


def test_cache_kwarg_follows_the_forward_signature(tiny_adapter):
    """transformers >= 5.24 takes the KV cache as `cache` (`past_key_values` deprecated); 5.23 as `past_key_values`."""
    from sightline.capture import cache_kwarg

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, past_key_values=None, **kwargs):
            return None

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return None

    assert cache_kwarg(New()) == "cache"
    assert cache_kwarg(Old()) == "past_key_values"
    import inspect

    expect = "cache" if "cache" in inspect.signature(tiny_adapter("llava").model.forward).parameters else "past_key_values"
    assert cache_kwarg(tiny_adapter("llava").model) == expect

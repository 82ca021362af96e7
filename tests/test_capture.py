"""Every captured site equals Hugging Face's own output at the same positions, for every family."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from conftest import FAMILIES, gradient_image
from sightline.capture import Capture, resolve_sites
from sightline.errors import UserError

RTOL, ATOL = 1e-5, 1e-5


def close(a, b):
    return torch.allclose(a.float(), b.float(), rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module", params=FAMILIES)
def run(request, tiny_adapter):
    """A batch of two differently sized images through Capture (all sites, all positions) and HF."""
    ad = tiny_adapter(request.param)
    images = [gradient_image(60, 80), gradient_image(100, 45, seed=1)]
    texts = [ad.render_prompt("What is shown?"), ad.render_prompt("Describe the image in detail, please.")]
    batch = ad.prepare(images, texts)
    sites = resolve_sites("resid,keys,keys_prerope,values,attn_out,mlp_out,projector,vision", "all",
                          ad.n_layers, ad.n_vision_layers, ad.kv_layers)
    positions = [lay.positions("all") for lay in batch.layouts]
    got = Capture(ad, sites).run(batch, positions)
    rope = {}

    def seen(m, a, kw, L):  # each block's RoPE tables and its input (what enters it: resid.L)
        rope[L] = kw["position_embeddings"]
        rope["in", L] = kw["hidden_states"] if "hidden_states" in kw else a[0]

    hooks = [layer.register_forward_pre_hook(lambda m, a, kw, L=L: seen(m, a, kw, L), with_kwargs=True)
             for L, layer in enumerate(ad.decoder_layers)]
    try:
        with torch.no_grad():
            out = ad.model(**batch.inputs, output_hidden_states=True, use_cache=True, return_dict=True)
    finally:
        for h in hooks:
            h.remove()
    return ad, batch, got, out, rope


def test_resid_equals_hidden_states(run):
    ad, batch, got, out, seen = run
    for i, n in enumerate(batch.lengths):
        for L in range(ad.n_layers):
            assert close(got[i][f"resid.{L}"], seen["in", L][i, :n]), f"resid.{L} example {i}: not block L's input"
            if not ad.resid_at_block_input:
                assert close(got[i][f"resid.{L}"], out.hidden_states[L][i, :n]), f"resid.{L} example {i}"
            else:  # the decoder adds between blocks: hidden_states[L] (block L-1's output) differs, at images only
                text = batch.layouts[i].text_positions
                assert close(got[i][f"resid.{L}"][text], out.hidden_states[L][i, text])
                if L == 1:  # the tiny models inject after block 0: image positions must differ there
                    img = batch.layouts[i].image_positions
                    assert not close(got[i]["resid.1"][img], out.hidden_states[1][i, img])
        # HF's last hidden state is after the final norm; resid.{n} is before it
        assert close(ad.decoder.norm(got[i][f"resid.{ad.n_layers}"]), out.hidden_states[ad.n_layers][i, :n])


def test_keys_values_equal_cache(run):
    ad, batch, got, out, _ = run
    S = batch.inputs["input_ids"].shape[1]
    for i, n in enumerate(batch.lengths):
        for L in ad.kv_layers:  # layers with keys and values (not Qwen3.5's linear-attention ones)
            cache = out.past_key_values.layers[L]
            assert got[i][f"keys.{L}"].shape == (n, ad.n_kv_heads, ad.head_dim)
            # a sliding-window layer of HF's cache keeps only the last positions (Gemma 3): compare those;
            # sightline keeps them all (their rotation is checked at every position below)
            start = S - cache.keys.shape[2]
            if start:
                assert getattr(cache, "is_sliding", False)
            m = max(n - start, 0)  # real positions the cache still holds
            k, v = cache.keys[i, :, :m].transpose(0, 1), cache.values[i, :, :m].transpose(0, 1)
            assert close(got[i][f"keys.{L}"][n - m :], k), f"keys.{L}"
            assert close(got[i][f"values.{L}"][n - m :], v), f"values.{L}"


def test_prerope_keys_rotate_to_cached_keys(run):
    ad, batch, got, out, rope = run
    for L in ad.kv_layers:
        if not ad.rotates_keys(L):  # a layer without RoPE (Cohere 2's global layers): cached keys are pre-RoPE keys
            for i in range(len(batch)):
                assert torch.equal(got[i][f"keys_prerope.{L}"], got[i][f"keys.{L}"])
            continue
        apply = sys.modules[type(ad.attention(L)).__module__].apply_rotary_pos_emb
        cos, sin = rope[L]
        for i, n in enumerate(batch.lengths):
            k = got[i][f"keys_prerope.{L}"].transpose(0, 1)[None]  # [1, n_kv, n, hd]
            b = min(i, cos.shape[0] - 1)  # position embeddings may be shared across the batch
            _, k_rot = apply(k, k, cos[b : b + 1, :n], sin[b : b + 1, :n])
            assert close(k_rot[0].transpose(0, 1), got[i][f"keys.{L}"]), f"layer {L} example {i}"
            # and the rotation matters: pre-RoPE keys differ from cached ones away from position 0
            assert not close(got[i][f"keys_prerope.{L}"][1:], got[i][f"keys.{L}"][1:])


def test_projector_is_lm_input_at_image_positions(run):
    ad, batch, got, out, _ = run
    for i, lay in enumerate(batch.layouts):
        img = lay.image_positions
        assert len(img) > 0
        assert close(got[i]["projector"][img], out.hidden_states[0][i, img])
        # image positions really hold image features, not the placeholder token's embedding
        placeholder = ad.model.get_input_embeddings().weight[ad.image_token_id]
        assert not torch.allclose(out.hidden_states[0][i, img[0]], placeholder)


def test_block_writes_sum_to_residual(run):
    ad, batch, got, out, _ = run
    for i, n in enumerate(batch.lengths):
        for L in range(ad.n_layers):
            step = got[i][f"attn_out.{L}"] + got[i][f"mlp_out.{L}"]
            # block L's output (HF's hidden_states[L + 1], before the final norm on the last)
            block_out = out.hidden_states[L + 1][i, :n] if L + 1 < ad.n_layers else got[i][f"resid.{L + 1}"]
            assert close(got[i][f"resid.{L}"] + step, block_out)
            if not ad.resid_at_block_input:
                assert close(got[i][f"resid.{L}"] + step, got[i][f"resid.{L + 1}"])


def test_vision_sites_only_at_patches(run):
    ad, batch, got, _, _ = run
    for i, lay in enumerate(batch.layouts):
        v = got[i][f"vision.{ad.n_vision_layers}"]
        assert v.shape[1:] == tuple(ad.vision_site_shape())
        has = ~torch.isnan(v.reshape(len(v), -1)).any(1)
        text = torch.as_tensor(lay.text_positions)
        assert not has[text].any(), "vision features at text positions"
        image = torch.as_tensor(np.flatnonzero((lay.modality == 1) & ~lay.interpolated))
        assert has[image].all(), "image token without its vision patch"


def test_vision_equals_hf_hidden_states_llava(tiny_adapter):
    ad = tiny_adapter("llava")
    batch = ad.prepare([gradient_image(50, 70)], [ad.render_prompt("hi")])
    sites = [f"vision.{i}" for i in range(ad.n_vision_layers + 1)]
    pos = [batch.layouts[0].image_positions]
    got = Capture(ad, sites).run(batch, pos)[0]
    with torch.no_grad():
        ref = ad.vision_tower(batch.inputs["pixel_values"], output_hidden_states=True).hidden_states
    for i in range(ad.n_vision_layers + 1):
        assert close(got[f"vision.{i}"], ref[i][0, 1:])  # CLS dropped, patches row-major


def test_capture_subset_stops_early_and_matches(tiny_adapter):
    """A capture of early sites only gives the same numbers as a full one (and skips later layers)."""
    ad = tiny_adapter("llava")
    batch = ad.prepare([gradient_image(64, 64)], [ad.render_prompt("hi")])
    pos = [batch.layouts[0].image_positions]
    calls = []
    h = ad.decoder_layers[-1].register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        early = Capture(ad, ["resid.1", "keys.0"]).run(batch, pos)[0]
        assert calls == [], "last layer ran although nothing needed it"
        full = Capture(ad, ["resid.1", "keys.0", f"resid.{ad.n_layers}"]).run(batch, pos)[0]
        assert calls == [1]
    finally:
        h.remove()
    assert torch.equal(early["resid.1"], full["resid.1"]) and torch.equal(early["keys.0"], full["keys.0"])


def test_capture_leaves_no_hooks(tiny_adapter):
    ad = tiny_adapter("llava")
    batch = ad.prepare([gradient_image(64, 64)], [ad.render_prompt("hi")])
    cap = Capture(ad, resolve_sites("resid,keys,attn_out,vision,projector", "all", ad.n_layers, ad.n_vision_layers))

    def n_hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in ad.model.modules())

    cap.run(batch, [batch.layouts[0].image_positions])  # HF may install its own hooks on a first call
    before = n_hooks()
    cap.run(batch, [batch.layouts[0].image_positions])
    assert n_hooks() == before


def test_capture_casts_dtype(tiny_adapter):
    ad = tiny_adapter("llava")
    batch = ad.prepare([gradient_image(64, 64)], [ad.render_prompt("hi")])
    got = Capture(ad, ["resid.1"], dtype=torch.float16).run(batch, [batch.layouts[0].image_positions])[0]
    assert got["resid.1"].dtype == torch.float16


@pytest.mark.parametrize(
    "sites,layers,message",
    [
        ("resid", "0-40", "out of range"),
        ("keys.7", "all", "out of range"),
        ("bogus", "all", "unknown site"),
        ("resid", "x", "bad --layers"),
        ("projector.3", "all", "takes no layer"),
    ],
)
def test_bad_sites_are_user_errors(sites, layers, message):
    with pytest.raises(UserError, match=message):
        resolve_sites(sites, layers, n_layers=2, n_vision_layers=2)


def test_keys_exist_only_on_attention_layers():
    """Qwen3.5's linear-attention layers have no keys or values: bare kinds skip them, exact names are refused."""
    assert resolve_sites("keys,values,resid", "all", 4, 2, kv_layers=[1, 3]) == [
        "resid.0", "resid.1", "resid.2", "resid.3", "resid.4", "keys.1", "keys.3", "values.1", "values.3"]
    with pytest.raises(UserError, match=r"site keys_prerope.2 does not exist: layer 2 is linear attention .* 1, 3"):
        resolve_sites("keys_prerope.2", "all", 4, 2, kv_layers=[1, 3])
    with pytest.raises(UserError, match="no values in the chosen layers: only layers 1, 3"):
        resolve_sites("values", "0,2", 4, 2, kv_layers=[1, 3])


def test_resolve_sites_expands_layers():
    s = resolve_sites("resid,keys,resid.1,projector", "0-1", n_layers=2, n_vision_layers=2)
    assert s == ["projector", "resid.0", "resid.1", "keys.0", "keys.1"]
    assert "resid.2" in resolve_sites("resid", "all", 2, 2)  # the last block's output

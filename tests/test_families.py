"""The family table: every adapter is discovered, has a tiny builder and a test row, and its module paths resolve."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import FAMILIES
from sightline.capture import resolve_site, resolve_sites
from sightline.models.base import module_at, supported
from sightline.models.testing import tiny_families


def test_family_table_lists_every_discovered_adapter():
    assert sorted(FAMILIES) == sorted(supported())  # a new family file needs its row in conftest.FAMILIES
    assert sorted(tiny_families()) == sorted(supported())  # ... and a build_tiny


@pytest.mark.parametrize("family", FAMILIES)
def test_module_table_resolves_on_the_model(tiny_adapter, family):
    ad = tiny_adapter(family)
    names = ad.modules
    kv0 = ad.kv_layers[0]  # the first layer with softmax attention (Qwen3.5's layer 0 is linear attention)
    roots = {"decoder": ad.model, "layers": ad.decoder, "attention": ad.decoder_layers[kv0], "mlp": ad.decoder_layers[0],
             "linear_attention": ad.decoder_layers[0],
             "attn_out": ad.decoder_layers[0], "mlp_out": ad.decoder_layers[0],
             "k_proj": ad.attention(kv0), "k_norm": ad.attention(kv0), "v_proj": ad.attention(kv0),
             "vision_tower": ad.model, "vision_blocks": ad.vision_tower, "projector": ad.model}
    for f in dataclasses.fields(names):
        path = getattr(names, f.name)
        if f.name in ("k_norm", "k_norm_heads_first") or path is None:  # optional: used where the LM has one (checked below)
            continue
        assert module_at(roots[f.name], path) is not None, f"{family}: no {f.name} at {path!r}"
    norm = module_at(ad.attention(kv0), names.k_norm) if names.k_norm else None
    assert ad.prerope_keys_module(kv0) is (norm if norm is not None else ad.attention(kv0).k_proj)
    assert len(ad.vision_layers) == ad.n_vision_layers > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_resolves_to_one_place(tiny_adapter, family):
    ad = tiny_adapter(family)
    sites = resolve_sites("resid,keys,keys_prerope,values,attn_out,mlp_out,projector,vision", "all",
                          ad.n_layers, ad.n_vision_layers, ad.kv_layers)
    where = {s: resolve_site(ad, s) for s in sites}
    if ad.resid_at_block_input:  # the decoder adds between blocks: read what enters block 1
        assert where["resid.1"].module is ad.decoder_layers[1] and where["resid.1"].when == "pre"
    else:
        assert where["resid.1"].module is ad.decoder_layers[0] and where["resid.1"].when == "post"
    assert where["resid.0"].module is ad.decoder_layers[0] and where["resid.0"].when == "pre"
    assert where[f"keys.{ad.kv_layers[0]}"].when == where[f"values.{ad.kv_layers[-1]}"].when == "cache"
    assert where["projector"].module is ad.decoder and where["projector"].arg == "inputs_embeds"
    assert where[f"vision.{ad.n_vision_layers}"].module is ad.vision_layers[-1]
    assert {s for s, w in where.items() if w.writable} == {s for s in sites if s.split(".")[0] in
                                                            ("resid", "attn_out", "mlp_out")}

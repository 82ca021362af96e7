"""Layouts of the families added after the first five: token counts, markers, pixel boxes, and the vision
features at every image position, against the model's own computation (tiny checkpoints, hypothesis sizes).

For each family, `vision.{i}` captured at the image positions and pushed through the model's OWN
connector modules (merger, pixel shuffle + projection, pooling + projection, ...) must give exactly
what the language model receives at those positions (HF's `hidden_states[0]`): this checks, per
token, which patches the layout says it is made of, and in which order.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import gradient_image
from sightline.capture import Capture
from sightline.models.layout import IMAGE


def _last(ad):
    return f"vision.{ad.n_vision_layers}"


def _qwen3(ad, caps):
    x = caps[_last(ad)]
    return ad.vision_tower.merger(x.reshape(-1, x.shape[-1]))


def _glm4v(ad, caps):
    v = ad.vision_tower
    x = v.post_layernorm(caps[_last(ad)])  # [n, 4, d]: the token's 2x2 patches, row-major
    x = x.reshape(-1, 2, 2, x.shape[-1]).permute(0, 3, 1, 2)
    return v.merger(v.downsample(x).reshape(len(x), -1))


def _vipllava(ad, caps):
    layers = ad.config.vision_feature_layer  # hidden_states[i] is the input of block i (= vision.i)
    n = ad.n_vision_layers + 1
    feats = torch.cat([caps[f"vision.{i % n}"] for i in layers], -1)
    return ad.model.model.multi_modal_projector(feats)


def _gemma3(ad, caps):
    tower = getattr(ad.vision_tower, "vision_model", ad.vision_tower)
    proj = ad.model.model.multi_modal_projector
    pooled = tower.post_layernorm(caps[_last(ad)]).mean(1)  # the token's k x k patches, average-pooled
    return proj.mm_soft_emb_norm(pooled) @ proj.mm_input_projection_weight


def _paligemma(ad, caps):
    tower = getattr(ad.vision_tower, "vision_model", ad.vision_tower)
    return ad.model.model.multi_modal_projector(tower.post_layernorm(caps[_last(ad)]))


def _idefics3(ad, caps):
    x = ad.model.model.vision_model.post_layernorm(caps[_last(ad)])  # [n, s*s, d]: row-major in the group
    return ad.model.model.connector.modality_projection(x.reshape(len(x), -1))


def _internvl(ad, caps):
    x = ad.vision_tower.layernorm(caps[_last(ad)])  # Identity with mean pooling (InternViT-300M)
    return ad.model.model.multi_modal_projector(x.reshape(len(x), -1))


def _aya_vision(ad, caps):
    proj = ad.model.model.multi_modal_projector
    x = caps[_last(ad)]  # [n, 4, d]: SigLIP's last block output (no post-norm), row-major in the group
    h = proj.linear_1(proj.layernorm(x.reshape(len(x), -1)))
    a, gate = h.chunk(2, dim=-1)
    return proj.linear_2(proj.act(gate) * a)


def _deepseek_vl(ad, caps):
    tower = getattr(ad.vision_tower, "vision_model", ad.vision_tower)
    return ad.model.model.aligner(tower.post_layernorm(caps[_last(ad)]))


def _ovis2(ad, caps):
    v = ad.vision_tower
    x = caps[_last(ad)]  # [n, s*s, d]: the last block's output, row-major in the group
    x = v.transformer.rms_norm(x).reshape(len(x), -1)
    prob = torch.softmax(v.head_norm(v.head_linear(x)), -1)
    prob = torch.cat([prob, prob.new_zeros(len(prob), v.num_visual_indicator_tokens)], -1)
    return prob @ ad.model.model.visual_embeddings_table.weight


# family -> (vision sites the connector reads, the connector as HF's own modules)
CONNECTORS = {
    "vipllava": (lambda ad: [f"vision.{i % (ad.n_vision_layers + 1)}" for i in ad.config.vision_feature_layer],
                 _vipllava),
    "qwen3_vl": (lambda ad: [_last(ad)], _qwen3),
    "qwen3_vl_moe": (lambda ad: [_last(ad)], _qwen3),
    "qwen3_5": (lambda ad: [_last(ad)], _qwen3),
    "glm4v": (lambda ad: [_last(ad)], _glm4v),
    "gemma3": (lambda ad: [_last(ad)], _gemma3),
    "paligemma": (lambda ad: [_last(ad)], _paligemma),
    "idefics3": (lambda ad: [_last(ad)], _idefics3),
    "internvl": (lambda ad: [_last(ad)], _internvl),
    "aya_vision": (lambda ad: [_last(ad)], _aya_vision),
    "deepseek_vl": (lambda ad: [_last(ad)], _deepseek_vl),
    "janus": (lambda ad: [_last(ad)], _deepseek_vl),
    "ovis2": (lambda ad: [_last(ad)], _ovis2),
}
PADDED = ("deepseek_vl", "janus")  # padded to a square: tokens over the padding have empty boxes
FAMILIES = tuple(CONNECTORS)

sizes = st.one_of(st.tuples(st.integers(20, 300), st.integers(20, 300)),
                  st.tuples(st.integers(20, 40), st.integers(200, 300)),  # extreme aspect ratios
                  st.tuples(st.integers(200, 300), st.integers(20, 40)))


def check_layout(ad, hw_list, seed=0):
    images = [gradient_image(h, w, seed + k) for k, (h, w) in enumerate(hw_list)]
    prompts = ["What is shown?", "Describe the image in detail, please."]
    batch = ad.prepare(images, [ad.render_prompt(prompts[k % 2]) for k in range(len(images))])
    ids = batch.inputs["input_ids"].numpy()
    for i, lay in enumerate(batch.layouts):
        n = batch.lengths[i]
        img = lay.image_positions
        # the layout's image positions are exactly HF's placeholders, every one in a grid
        np.testing.assert_array_equal(img, np.flatnonzero(ids[i, :n] == ad.image_token_id))
        assert sum(g.n_tokens for g in lay.grids) == len(img)
        assert (lay.row[img] >= 0).all() and (lay.image[img] == 0).all()
        # each grid's boxes lie on the original image and every token has a non-empty box
        h, w = hw_list[i]
        for g in lay.grids:
            b = g.boxes()
            assert (b[..., 0] >= 0).all() and (b[..., 2] <= w).all() and (b[..., 1] >= 0).all() and (b[..., 3] <= h).all()
            nonempty = (b[..., 2] > b[..., 0]) & (b[..., 3] > b[..., 1])
            assert nonempty.all() or (ad.family in PADDED and nonempty.any())
            if ad.family not in PADDED or g.rows * g.cols == 1:
                continue
            # padded: the non-empty boxes tile the whole image
            area = ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]))[nonempty].sum()
            assert abs(area - h * w) < 1e-3 * h * w
        # text and special positions are not image tokens
        assert not np.isin(lay.text_positions, img).any()
    sites, connect = CONNECTORS[ad.family]
    positions = [lay.image_positions[lay.modality[lay.image_positions] == IMAGE] for lay in batch.layouts]
    caps = Capture(ad, sorted(set(sites(ad))) + ["projector"]).run(batch, positions)
    for i, c in enumerate(caps):
        for s in sites(ad):
            assert not torch.isnan(c[s]).any(), f"{s}: an image token without its vision patches"
        with torch.no_grad():
            lm_in = connect(ad, c)
        torch.testing.assert_close(lm_in, c["projector"], rtol=1e-5, atol=1e-5)
    return batch


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hw=st.lists(sizes, min_size=2, max_size=2), seed=st.integers(0, 100))
def test_layout_and_vision_features_match_hf(tiny_adapter, family, hw, seed):
    check_layout(tiny_adapter(family), hw, seed)


@pytest.mark.parametrize("family", FAMILIES)
def test_extreme_sizes(tiny_adapter, family):
    check_layout(tiny_adapter(family), [(20, 300), (300, 20)])


# ---------------------------------------------------------------------- pixel geometry
def _ramp(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    return np.round(np.stack([x / w, y / h, (x + y) / (w + h)], -1) * 255).astype(np.uint8)


def _crops(ad, batch) -> torch.Tensor:
    """The processed crops [n, 3, S, S] in the order of the vision tower's rows."""
    pv = batch.inputs["pixel_values"]
    crops = pv.reshape(-1, *pv.shape[-3:])
    if ad.family == "idefics3":  # all-zero padding crops are dropped by the model
        crops = crops[(crops != 0).flatten(1).any(1)]
    return crops


# families whose processor gives square crops, patch p of crop c at rows c * seq + prefix + p
GEOMETRY = ("vipllava", "gemma3", "paligemma", "idefics3", "internvl", "aya_vision", "deepseek_vl", "janus", "ovis2")


@pytest.mark.parametrize("family", [f for f in GEOMETRY if f in FAMILIES])
@pytest.mark.parametrize("hw", [(150, 300), (300, 150), (220, 230), (160, 290)])
def test_pixel_boxes_see_what_the_tokens_see(tiny_adapter, family, hw):
    """A token's box on the original image has the mean colour of the processed pixels of its patches.

    A colour ramp (255 levels across the image) makes position visible: a box off by one token moves
    its mean by 255 * token / side levels (> 100 here); resampling filters and 8-bit rounding move it by
    0.13 levels at most (measured over these sizes and families); the bound is 1 level.
    """
    from PIL import Image

    from sightline.models.layout import _box_integral

    ad = tiny_adapter(family)
    h, w = hw
    rgb = _ramp(h, w)
    batch = ad.prepare([Image.fromarray(rgb)], [ad.render_prompt("hi")])
    crops = _crops(ad, batch).numpy()
    ip = ad.processor.image_processor
    mean, std = np.asarray(ip.image_mean)[:, None, None], np.asarray(ip.image_std)[:, None, None]
    crops = (crops * std + mean) * 255  # back to 0..255 levels
    ps = ad.config.vision_config.patch_size
    ps = ps[0] if isinstance(ps, (list, tuple)) else ps
    p = crops.shape[-1] // ps
    prefix = getattr(ad, "vision_prefix", 1 if family == "vipllava" else 0)
    seq = p * p + prefix
    lay = batch.layouts[0]
    worst, shifted = 0.0, []
    for g in lay.grids:
        idx = g.vision_index.reshape(g.rows * g.cols, -1)
        token = np.zeros((len(idx), 3))
        for t, rows in enumerate(idx):
            crop, j = np.divmod(rows, seq)
            pr, pc = np.divmod(j - prefix, p)
            token[t] = np.mean([crops[c, :, r * ps:(r + 1) * ps, q * ps:(q + 1) * ps].mean((1, 2))
                                for c, r, q in zip(crop, pr, pc)], 0)
        boxes = g.boxes().reshape(-1, 4).astype(np.float64)
        xs, ys = g.spans()
        raw = np.stack(np.broadcast_arrays(xs[None, :, 0], ys[:, None, 0], xs[None, :, 1], ys[:, None, 1]), -1)
        inside = np.all(np.abs(raw.reshape(-1, 4) - boxes) < 1e-3, 1)  # boxes not clipped (not over padding)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        box = np.stack([_box_integral(rgb[..., ch].astype(np.float64), boxes) for ch in range(3)], -1)
        box = box / np.maximum(area, 1e-9)[:, None]
        if not inside.any():
            continue
        worst = max(worst, float(np.abs(token - box)[inside].max()))
        if g.rows * g.cols > 1:
            shifted.append(float(np.abs(np.roll(token, 1, 0) - box)[inside].max()))
    assert worst < 1.0, f"{family} {hw}: token colour differs from its box by {worst:.2f} levels"
    assert shifted and max(shifted) > 10  # ... while one token off is far outside the bound

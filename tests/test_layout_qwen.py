"""Qwen2.5-VL / Qwen2-VL adapters: token layout, pixel geometry, vision-feature mapping, padding.

Tiny random checkpoints built from config (sightline.models.testing); nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from sightline.models import load_model
from sightline.models.layout import _box_integral
from sightline.models.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter, window_order
from sightline.models.testing import build_tiny

QWEN_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    return load_model(str(build_tiny("qwen2_5_vl", tmp_path_factory.mktemp("qwen2_5_vl"))))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return load_model(str(build_tiny("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl"))))


def noise_image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def ramp_image(h: int, w: int) -> np.ndarray:
    """A smooth colour ramp, uint8 [h, w, 3]: red along x, green along y, blue along the diagonal."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    rgb = np.stack([x / w, y / h, (x + y) / (w + h)], axis=-1) * 255
    return np.round(rgb).astype(np.uint8)


def run_with_vision_hooks(adapter, batch):
    """Forward with hidden states, capturing the input of vision block 0 and the output of the last."""
    seen = {}
    blocks = adapter.vision_layers
    pre = blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.__setitem__("first_in", args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True,
    )
    post = blocks[-1].register_forward_hook(lambda m, args, out: seen.__setitem__("last_out", out))
    try:
        with torch.no_grad():
            out = adapter.model(**batch.inputs, output_hidden_states=True)
    finally:
        pre.remove()
        post.remove()
    return out, seen


def check_vision_mapping(adapter, images):
    """Every assertion of the layout / vision-feature contract for one batch of images."""
    text = adapter.render_prompt("What is shown?")
    batch = adapter.prepare(images, [text] * len(images))
    thw = batch.inputs["image_grid_thw"].numpy()
    ids = batch.inputs["input_ids"].numpy()
    assert "mm_token_type_ids" in batch.inputs
    for i, layout in enumerate(batch.layouts):
        (g,) = layout.grids
        assert (g.rows, g.cols) == (thw[i, 1] // 2, thw[i, 2] // 2)
        assert (g.image, g.view, g.newline, g.interpolated) == (0, 0, False, False)
        assert len(layout.image_positions) == (ids[i] == adapter.image_token_id).sum() == g.rows * g.cols
        # the grid tiles the whole original image
        b = g.boxes()
        assert np.allclose(b[0, 0, :2], 0) and np.allclose(b[-1, -1, 2:], (images[i].width, images[i].height))

    out, seen = run_with_vision_hooks(adapter, batch)
    n_patches = int(thw.prod(-1).sum())
    assert seen["last_out"].shape == (n_patches, adapter.vision_hidden_size)

    # every position: image tokens own 4 distinct patch rows, together each patch exactly once
    everything = adapter.vision_gather_index(batch, [np.arange(len(l)) for l in batch.layouts])
    assert everything.shape == (sum(len(l) for l in batch.layouts), 4)
    is_image = np.concatenate([l.modality for l in batch.layouts]) == 1
    assert (everything[~is_image] == -1).all()
    assert np.array_equal(np.sort(everything[is_image].reshape(-1)), np.arange(n_patches))

    positions = [l.image_positions for l in batch.layouts]
    idx = torch.as_tensor(adapter.vision_gather_index(batch, positions))
    assert idx.shape == (len(np.concatenate(positions)), 4)
    assert adapter.vision_site_shape() == (4, adapter.vision_hidden_size)

    # block 0 input at a token = the patch embeddings of its 2x2 patches, in the processor's order
    first = seen["first_in"][idx]
    embedded = adapter.vision_tower.patch_embed(batch.inputs["pixel_values"])
    torch.testing.assert_close(first.reshape(-1, first.shape[-1]), embedded, rtol=1e-5, atol=1e-6)

    # last block output at a token, merged by the model's own merger = what enters the LM there
    last = seen["last_out"][idx]  # [n_tok, 4, d_v]
    with torch.no_grad():
        merged = adapter.vision_tower.merger(last.reshape(-1, last.shape[-1]))
    entering = torch.cat([out.hidden_states[0][i, p] for i, p in enumerate(positions)])
    torch.testing.assert_close(merged, entering, rtol=1e-5, atol=1e-5 * entering.abs().max().item())
    return batch, seen, idx, entering


sizes = st.one_of(
    st.tuples(st.integers(28, 400), st.integers(28, 400)),
    st.tuples(st.integers(28, 60), st.integers(300, 400)),  # extreme aspect ratios
    st.tuples(st.integers(300, 400), st.integers(28, 60)),
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hw=st.lists(sizes, min_size=1, max_size=2), seed=st.integers(0, 2**16))
@example(hw=[(28, 400), (400, 28)], seed=0)
@example(hw=[(224, 224), (28, 28)], seed=1)
@example(hw=[(400, 400)], seed=2)
def test_qwen25_layout_and_vision_features(qwen25, hw, seed):
    images = [noise_image(h, w, seed + k) for k, (h, w) in enumerate(hw)]
    check_vision_mapping(qwen25, images)


def test_qwen25_window_order_matters(qwen25):
    """The window permutation is real: gathering in processor order gives the wrong features."""
    assert qwen25.window_tokens == 2 and list(qwen25.config.vision_config.fullatt_block_indexes) == [1]
    batch, seen, idx, entering = check_vision_mapping(qwen25, [noise_image(224, 224)])  # 8x8 tokens
    naive = torch.arange(idx.numel()).reshape(idx.shape)
    assert not torch.equal(naive, idx)
    with torch.no_grad():
        wrong = qwen25.vision_tower.merger(seen["last_out"][naive].reshape(-1, seen["last_out"].shape[-1]))
    assert (wrong - entering).abs().max() > 0.1 * entering.abs().max()


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 20), cols=st.integers(1, 20), window=st.integers(1, 5))
def test_window_order_matches_transformers(rows, cols, window):
    from transformers.vision_utils import get_vision_window_index

    hf, _ = get_vision_window_index(torch.tensor([[1, 2 * rows, 2 * cols]]), 2, window * 28, 14)
    assert np.array_equal(hf.numpy(), window_order(rows, cols, window))


def test_qwen2_layout_and_vision_features(qwen2):
    assert type(qwen2) is Qwen2VLAdapter and qwen2.family == "qwen2_vl"
    assert qwen2.vision_hidden_size == qwen2.config.vision_config.embed_dim
    check_vision_mapping(qwen2, [noise_image(200, 300), noise_image(57, 333, 1)])


@pytest.mark.parametrize("hw", [(28, 400), (400, 28), (200, 300), (57, 333), (30, 31), (350, 120), (399, 401)])
def test_pixel_geometry(qwen25, hw):
    """A token's pixel box in the original image has the mean colour of its 2x2 processed patches.

    Bound: 1 level of 255. Bicubic resampling reproduces a linear ramp exactly away from the
    borders; what remains is 8-bit rounding of the resized pixels (<= 0.5 level, averaging out
    over a box) and PIL's filter renormalisation in the outermost resized pixels. A geometry error
    of one original pixel moves a box mean by 255 / W levels (> 1 for any image under 255 px),
    and a wrong step or a transposed grid by far more (checked below with a one-token shift).
    """
    h, w = hw
    rgb = ramp_image(h, w)
    batch = qwen25.prepare([Image.fromarray(rgb)], [qwen25.render_prompt("")])
    (g,) = batch.layouts[0].grids
    ip = qwen25.processor.image_processor
    # pixel_values rows: merged token j's patches are rows 4j..4j+3, each [C, temporal, 14, 14]
    patches = batch.inputs["pixel_values"].numpy().reshape(g.rows * g.cols, 4, 3, 2, 14, 14)
    token_rgb = patches.mean(axis=(1, 3, 4, 5)) * np.array(ip.image_std) + np.array(ip.image_mean)
    boxes = g.boxes().reshape(-1, 4).astype(np.float64)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    box_rgb = np.stack([_box_integral(rgb[..., c].astype(np.float64), boxes) for c in range(3)], -1)
    box_rgb = box_rgb / area[:, None] / 255
    err = np.abs(token_rgb - box_rgb).max() * 255
    assert err < 1.0, f"{hw}: token colour differs from its box by {err:.2f} levels"
    if g.rows * g.cols > 1:  # the bound is tight enough to see a one-token shift
        assert np.abs(np.roll(token_rgb, 1, axis=0) - box_rgb).max() * 255 > 5


def test_right_padding_equals_alone(qwen25):
    """Two different-size images in one right-padded batch give each one's unpadded results."""
    images = [noise_image(200, 300), noise_image(90, 400, 1)]
    text = qwen25.render_prompt("What is shown?")
    batch = qwen25.prepare(images, [text, text])
    assert batch.lengths[0] != batch.lengths[1]
    assert batch.inputs["mm_token_type_ids"].shape == batch.inputs["input_ids"].shape
    with torch.no_grad():
        together = qwen25.model(**batch.inputs, output_hidden_states=True)
    for i, image in enumerate(images):
        alone_batch = qwen25.prepare([image], [text])
        n = batch.lengths[i]
        assert alone_batch.lengths == [n]
        assert np.array_equal(alone_batch.layouts[0].image_positions, batch.layouts[i].image_positions)
        with torch.no_grad():
            alone = qwen25.model(**alone_batch.inputs, output_hidden_states=True)
        for layer, (a, b) in enumerate(zip(together.hidden_states, alone.hidden_states)):
            torch.testing.assert_close(a[i, :n], b[0], rtol=1e-5, atol=1e-5, msg=f"example {i} layer {layer}")
        torch.testing.assert_close(together.logits[i, :n], alone.logits[0], rtol=1e-5, atol=1e-5)
    # mm_token_type_ids is what gives image tokens their 2-D positions: without it the answer changes
    plain = {k: v for k, v in batch.inputs.items() if k != "mm_token_type_ids"}
    qwen25.model.model.rope_deltas = None
    with torch.no_grad():
        without = qwen25.model(**plain)
    n = batch.lengths[0]
    assert (without.logits[0, :n] - together.logits[0, :n]).abs().max() > 1e-4


def test_load_model_processor_and_prompt(qwen25):
    assert type(qwen25) is Qwen2_5_VLAdapter and qwen25.family == "qwen2_5_vl"
    proc = qwen25.processor
    assert type(proc).__name__ == "Qwen2_5_VLProcessor" and type(proc).__module__ == "sightline.models.processors"
    assert not hasattr(proc, "video_processor")  # images only: loads with or without torchvision
    assert qwen25.vision_tower is qwen25.model.model.visual
    assert qwen25.n_vision_layers == 2 and qwen25.vision_hidden_size == 32
    assert qwen25.image_token == "<|image_pad|>" and qwen25.image_token_id == qwen25.config.image_token_id
    assert qwen25.n_layers == 2 and qwen25.n_kv_heads == 2 and qwen25.head_dim == 16
    assert qwen25.render_prompt("What is shown?") == QWEN_TEXT
    assert qwen25.render_prompt("hi", raw=True) == "<|vision_start|><|image_pad|><|vision_end|>\nhi"
    # chat markers are special, the image placeholder is not
    specials = qwen25.special_ids
    tok = qwen25.tokenizer
    assert {tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|vision_start|>", "<|vision_end|>")} <= specials
    assert qwen25.image_token_id not in specials

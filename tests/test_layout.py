"""TokenLayout: token <-> patch <-> pixel arithmetic, and the LLaVA-1.5 layout against the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import gradient_image
from sightline.models.layout import (
    _box_integral,
    IMAGE,
    TokenLayout,
    ViewGrid,
    mask_to_tokens,
    point_to_token,
    tokens_to_pixels,
)

IMG = 7


def _layout(h, w, rows, cols, origin, step, newline=False, before=3, after=2):
    g = ViewGrid(0, 0, rows, cols, (h, w), origin, step, newline=newline)
    ids = np.array([1] * before + [IMG] * g.n_tokens + [1] * after)
    return TokenLayout.build(ids, IMG, [[g]])


grids = st.tuples(
    st.integers(8, 120), st.integers(8, 120),  # image h, w
    st.integers(1, 9), st.integers(1, 9),  # rows, cols
    st.booleans(),
)


@given(grids)
@settings(max_examples=60, deadline=None)
def test_grid_covering_image_partitions_it(args):
    """A grid stretched over the whole image: boxes tile it, mask fractions and paint-back agree."""
    h, w, rows, cols, newline = args
    lay = _layout(h, w, rows, cols, (0.0, 0.0), (w / cols, h / rows), newline=newline)
    boxes = lay.grid().boxes()
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).sum()
    assert np.isclose(area, h * w, rtol=1e-4)
    # a full mask covers every token fully; an empty one covers none
    assert np.allclose(mask_to_tokens(lay, np.ones((h, w))), 1.0)
    assert np.allclose(mask_to_tokens(lay, np.zeros((h, w))), 0.0)
    # the mask's total area is conserved by the per-token fractions
    rng = np.random.default_rng(h * 1000 + w)
    m = rng.random((h, w)) > 0.5
    frac = mask_to_tokens(lay, m)
    token_area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    assert np.isclose((frac * token_area).sum(), m.sum(), rtol=1e-4, atol=1e-3)
    # painting token ids back gives each pixel the token whose box holds its centre
    ids = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    painted = tokens_to_pixels(lay, ids)
    assert not np.isnan(painted).any()
    y, x = rng.integers(0, h), rng.integers(0, w)
    pos = point_to_token(lay, (x + 0.5, y + 0.5))
    assert lay.row[pos] * cols + lay.col[pos] == painted[y, x]
    # newline tokens sit at the end of each row
    nl = np.flatnonzero(lay.modality == 2)
    assert len(nl) == (rows if newline else 0)
    if newline:
        assert np.all(lay.col[nl] == -1) and np.all(np.diff(nl) == cols + 1)


@given(st.integers(4, 60), st.integers(4, 60), st.integers(0, 59), st.integers(0, 59))
@settings(max_examples=60, deadline=None)
def test_point_and_mask_agree_on_single_pixel(h, w, y, x):
    """A one-pixel mask lands entirely in the token that point_to_token names."""
    y, x = y % h, x % w
    lay = _layout(h, w, 4, 5, (0.0, 0.0), (w / 5, h / 4))
    m = np.zeros((h, w))
    m[y, x] = 1
    frac = mask_to_tokens(lay, m)
    boxes = lay.grid().boxes()
    token_area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    pos = point_to_token(lay, (x + 0.5, y + 0.5))
    r, c = lay.row[pos], lay.col[pos]
    assert frac[r, c] * token_area[r, c] > 0
    # a pixel straddling token edges splits its area, but never lands outside the neighbours
    assert np.isclose((frac * token_area).sum(), 1.0)


def test_padding_tokens_have_empty_boxes():
    """A grid over a padded square: tokens over the padding have no pixels, NaN coverage."""
    lay = _layout(40, 100, 5, 5, (0.0, -30.0), (20.0, 20.0))  # 100x100 padded, image rows 30..70
    frac = mask_to_tokens(lay, np.ones((40, 100)))
    assert np.isnan(frac[0]).all() and np.isnan(frac[-1]).all()
    assert np.allclose(frac[2], 1.0)
    assert point_to_token(lay, (50, -1)) == -1
    painted = tokens_to_pixels(lay, np.arange(25.0).reshape(5, 5))
    assert not np.isnan(painted).any() and painted[0, 0] == 5  # row 0 of the image is token row 1


def test_layout_mismatch_is_detected():
    g = ViewGrid(0, 0, 2, 2, (10, 10), (0, 0), (5, 5))
    with pytest.raises(ValueError, match="layout mismatch"):
        TokenLayout.build(np.array([1, IMG, IMG, IMG, 1]), IMG, [[g]])


def test_index_rows_columns():
    lay = _layout(10, 10, 2, 2, (0, 0), (5, 5), before=2, after=1)
    rows = lay.index_rows(lay.positions("all"), example=9)
    assert rows.shape == (7, 7)
    assert (rows[:, 0] == 9).all()
    assert rows[2].tolist() == [9, 2, IMAGE, 0, 0, 0, 0]
    assert rows[5].tolist() == [9, 5, IMAGE, 0, 0, 1, 1]
    assert rows[0].tolist() == [9, 0, 0, -1, -1, -1, -1]


@pytest.mark.parametrize("do_pad", [False, True])
@given(hw=st.tuples(st.integers(20, 300), st.integers(20, 300)))
@settings(max_examples=12, deadline=None)
def test_llava_boxes_match_processed_pixels(tiny_checkpoint, do_pad, hw):
    """Each token's box in the original image has the mean colour of its processed patch."""
    from sightline.models import load_model
    from sightline.models.testing import build_tiny

    key = f"_llava_pad{do_pad}"
    cache = test_llava_boxes_match_processed_pixels.__dict__.setdefault("cache", {})
    if key not in cache:
        import tempfile

        cache[key] = load_model(str(build_tiny("llava", tempfile.mkdtemp(), do_pad=do_pad)))
    ad = cache[key]
    h, w = hw
    img = gradient_image(h, w)
    batch = ad.prepare([img], [ad.render_prompt("hi")])
    lay = batch.layouts[0]
    g = lay.grid()
    ip = ad.processor.image_processor
    px = batch.inputs["pixel_values"][0].numpy()  # [3, S, S] normalised
    mean = np.array(ip.image_mean)[:, None, None]
    std = np.array(ip.image_std)[:, None, None]
    px = (px * std + mean) * 255
    p = ad.config.vision_config.patch_size
    arr = np.asarray(img, dtype=np.float64)
    boxes = g.boxes().astype(np.float64)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    full = area >= 0.98 * g.step_xy[0] * g.step_xy[1]  # tokens partly over padding mix in the pad colour
    region = np.stack([_box_integral(arr[..., ch], boxes) for ch in range(3)], -1) / np.maximum(area, 1e-9)[..., None]
    patch = px.reshape(3, g.rows, p, g.cols, p).mean((2, 4)).transpose(1, 2, 0)
    errs = np.abs(patch - region)[..., :2][full]  # red/green encode x/y linearly
    # resampling blurs by under a pixel; a one-token misplacement shifts by 255/rows levels or more
    assert full.any() or do_pad  # without padding every token lies on the image
    assert errs.size == 0 or errs.max() < 0.25 * 255 / max(g.rows, g.cols), errs.max()
    assert torch.equal(torch.as_tensor(lay.image_positions), torch.nonzero(batch.inputs["input_ids"][0] == ad.image_token_id)[:, 0])

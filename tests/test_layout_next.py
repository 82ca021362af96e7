"""LLaVA-NeXT and LLaVA-OneVision layouts against Hugging Face: token counts, newlines, the vision
feature at every image position, pixel geometry, anyres_max interpolation, and loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from sightline.models import load_model
from sightline.models.layout import IMAGE, IMAGE_NEWLINE
from sightline.models.testing import build_tiny

FAMILIES = ("llava_next", "llava_onevision", "llava_next_video")
SIDES = st.integers(20, 300)
# LLaVA-NeXT's CLIP-336 crops are 24 whole patches of 14 px; OneVision's SigLIP-384 crops are not
# (27 patches = 378 px, the last 6 px of every crop unseen). The tiny models keep both: 56 = 4 x 14
# for NeXT, 60 px crops of 4 patches (56 px seen) for OneVision.
BUILD = {"llava_next": {}, "llava_onevision": {"image_size": 60}, "llava_next_video": {}}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Each family's tiny checkpoint, saved and loaded back through `load_model` (fp32)."""
    out = {}
    for fam in FAMILIES:
        folder = build_tiny(fam, tmp_path_factory.mktemp(fam), **BUILD[fam])
        out[fam] = load_model(str(folder))
    return out


def gradient_image(h: int, w: int) -> Image.Image:
    """R rises linearly with x, G with y (pixel i holds the value at its centre), B constant."""
    x = 255.0 * (np.arange(w) + 0.5) / w
    y = 255.0 * (np.arange(h) + 0.5) / h
    arr = np.empty((h, w, 3), np.uint8)
    arr[..., 0] = np.round(x)[None, :]
    arr[..., 1] = np.round(y)[:, None]
    arr[..., 2] = 128
    return Image.fromarray(arr)


def noise_image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def tower_features(adapter, batch) -> torch.Tensor:
    """The vision tower's hidden states at `vision_feature_layer` for the batch's real crops,
    flattened to [crops * seq, d], computed as HF's `get_image_features` does before the
    strategy's CLS drop (the adapter's vision index points into this, CLS included)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = adapter.config
    pv, sizes = batch.inputs["pixel_values"], batch.inputs["image_sizes"]
    n_crops = [
        image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes
    ]
    crops = torch.cat([pv[i, :k] for i, k in enumerate(n_crops)])
    with torch.no_grad():
        hs = adapter.vision_tower(crops, output_hidden_states=True).hidden_states
    layer = cfg.vision_feature_layer
    feats = hs[layer] if isinstance(layer, int) else torch.cat([hs[i] for i in layer], -1)
    return feats.reshape(-1, feats.shape[-1])


def run_batch(adapter, images):
    text = adapter.render_prompt("What is shown?")
    batch = adapter.prepare(images, [text] * len(images))
    with torch.no_grad():
        out = adapter.model(**batch.inputs, output_hidden_states=True)
    return batch, out.hidden_states[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row relative error ||a - b|| / ||b||."""
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


# ---------------------------------------------------------------------- 1. features at every position
def check_features(adapter, sizes, seed=0):
    images = [noise_image(h, w, seed + i) for i, (h, w) in enumerate(sizes)]
    batch, emb = run_batch(adapter, images)
    ids = batch.inputs["input_ids"].numpy()
    feats = tower_features(adapter, batch)
    # vision_rows counts exactly the tower rows of each example (batch padding crops excluded)
    assert feats.shape[0] == sum(adapter.vision_rows(batch, lay) for lay in batch.layouts)
    positions = [lay.image_positions for lay in batch.layouts]
    rows = adapter.vision_gather_index(batch, positions)
    newline = adapter.model.model.image_newline.detach()
    projector = adapter.model.model.multi_modal_projector
    k = 0
    for i, lay in enumerate(batch.layouts):
        pos = positions[i]
        # the layout's image positions are exactly HF's placeholders (TokenLayout.build checked the count)
        np.testing.assert_array_equal(pos, np.flatnonzero(ids[i] == adapter.image_token_id))
        r = rows[k : k + len(pos)]
        k += len(pos)
        mod, interp = lay.modality[pos], lay.interpolated[pos]
        e = emb[i, pos]
        # newlines: exactly the positions where HF put image_newline, and only there
        hf_newline = rel_err(e, newline.expand_as(e)) < 1e-6
        np.testing.assert_array_equal(hf_newline.numpy(), mod == IMAGE_NEWLINE)
        assert (r[mod == IMAGE_NEWLINE] == -1).all() and (r[interp] == -1).all()
        direct = (mod == IMAGE) & ~interp
        assert (r[direct] >= 0).all()
        with torch.no_grad():
            proj = projector(feats[torch.from_numpy(r[direct])])
        err = rel_err(proj, e[torch.from_numpy(direct)])
        assert err.max().item() < 1e-5, f"sizes {sizes}: vision feature mismatch, max rel err {err.max().item():.2e}"
        # per image: base g x g, then the map with one newline per row
        base, hires = lay.grid(0, 0), lay.grid(0, 1)
        assert not base.newline and hires.newline and (base.rows, base.cols) == (adapter.grid_side,) * 2
    return batch


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h1=SIDES, w1=SIDES, h2=SIDES, w2=SIDES)
@example(20, 300, 300, 20)
@example(300, 300, 20, 20)
def test_features_and_newlines_match_hf(adapters, family, h1, w1, h2, w2):
    check_features(adapters[family], [(h1, w1), (h2, w2)])


# ---------------------------------------------------------------------- 2. pixel geometry
def unclipped_boxes(g):
    xs, ys = g.spans()
    return xs[:, 0], xs[:, 1], ys[:, 0], ys[:, 1]


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=SIDES, w=SIDES)
@example(20, 300)
@example(300, 20)
@example(33, 257)
def test_pixel_geometry(adapters, family, h, w):
    """The pixels a token's patch holds are the pixels of its box in the original image.

    With R = 255 (x + 0.5) / w, a patch's mean R tells where (in original x) its pixels came from:
    x = R w / 255. Tolerance: 1 grey level of quantisation (uint8 input and uint8 resize output,
    half a level each) plus 0.05 token for resampling at image borders, where PIL renormalises
    its kernel (measured: at most 0.02 token over 120 random sizes). A token off by one in the
    grid, a wrong tile order, a wrong pad or unpad offset is off by 0.1 token or (much) more.
    """
    adapter = adapters[family]
    batch = adapter.prepare([gradient_image(h, w)], [adapter.render_prompt("x")])
    lay = batch.layouts[0]
    ip = adapter.processor.image_processor
    mean = torch.tensor(ip.image_mean).view(3, 1, 1)
    std = torch.tensor(ip.image_std).view(3, 1, 1)
    crops = batch.inputs["pixel_values"][0] * std[None] + mean[None]  # [crops, 3, S, S] in 0..1
    vc = adapter.config.vision_config
    ps, g, seq, pre = vc.patch_size, adapter.grid_side, adapter.vision_seq_len, adapter.vision_prefix
    seen = g * ps / vc.image_size  # fraction of each crop that patches cover
    checked = 0
    for grid in lay.grids:
        if grid.interpolated:
            # interpolated tokens blend patches: check the 1:1 map they were resized from, and
            # that they cover the same window of the image
            src = adapter.source_map_grid(0, adapter.plan((h, w)))
            for a, b in zip(grid.spans(), src.spans()):
                np.testing.assert_allclose([a[0, 0], a[-1, 1]], [b[0, 0], b[-1, 1]], atol=1e-9)
            grid = src
        x0, x1, y0, y1 = unclipped_boxes(grid)
        # clipped boxes lie inside the image
        b = grid.boxes()
        assert (b[..., 0] >= 0).all() and (b[..., 2] <= w).all() and (b[..., 1] >= 0).all() and (b[..., 3] <= h).all()
        if grid.rows == 0 or grid.cols == 0:
            # HF truncates the content size on the token grid (`int(round(., 7))`): an image less
            # than one token thick on its tiles (e.g. 20 x 300 on 1 x 3 tiles) keeps no map tokens,
            # only the newlines of its rows (300 x 20: 12 rows of 0 columns, 12 newlines)
            assert grid.view == 1 and grid.n_tokens == grid.rows
            nph, npw = adapter.plan((h, w)).tiles_hw
            assert min(h * npw * g / w, w * nph * g / h) < 1  # the image is under one token thick
            continue
        # every token is one patch wide; between tokens there is no gap, or exactly a tile's unseen strip
        sx, sy = x1[0] - x0[0], y1[0] - y0[0]
        gap_x, gap_y = sx * (1 / seen - 1) * g, sy * (1 / seen - 1) * g
        for lo, hi, gap in ((x0, x1, gap_x), (y0, y1, gap_y)):
            np.testing.assert_allclose(hi - lo, hi[0] - lo[0], atol=1e-6)
            d = lo[1:] - hi[:-1]
            assert (np.isclose(d, 0, atol=1e-6) | np.isclose(d, gap, atol=1e-6)).all()
        # coverage: the base view is the whole image (less the crop's unseen strip) exactly; the
        # unpadded map covers it up to HF's rounding of the content size on the token grid (at most
        # half a token per side) and the unseen strip of the last tile; no row or column of the map
        # lies wholly in padding
        if grid.view == 0:
            np.testing.assert_allclose([x0[0], y0[0], x1[-1], y1[-1]], [0, 0, w * seen, h * seen], atol=1e-6)
        else:
            assert x0[0] <= 0.5 * sx + 1e-6 and y0[0] <= 0.5 * sy + 1e-6
            assert x1[-1] >= w - 0.5 * sx - gap_x - 1e-6 and y1[-1] >= h - 0.5 * sy - gap_y - 1e-6
            assert x1[0] > 0 and y1[0] > 0 and x0[-1] < w and y0[-1] < h
        vi = grid.vision_index
        crop, patch = np.divmod(vi, seq)
        pr, pc = np.divmod(patch - pre, g)
        for r in range(grid.rows):
            for c in range(grid.cols):
                eps = 1e-6  # float error at the far edge
                if x0[c] < -eps or y0[r] < -eps or x1[c] > w + eps or y1[r] > h + eps:
                    continue  # the patch holds padding too
                px = crops[crop[r, c], :, pr[r, c] * ps : (pr[r, c] + 1) * ps, pc[r, c] * ps : (pc[r, c] + 1) * ps]
                red, green = (px[:2].mean(dim=(1, 2)) * 255).tolist()
                tol_x = w / 255 + 0.05 * sx
                tol_y = h / 255 + 0.05 * sy
                assert abs(red * w / 255 - (x0[c] + x1[c]) / 2) <= tol_x, (grid.view, r, c, red * w / 255, x0[c], x1[c])
                assert abs(green * h / 255 - (y0[r] + y1[r]) / 2) <= tol_y, (grid.view, r, c, green * h / 255, y0[r], y1[r])
                checked += 1
    assert checked >= g * g  # at least the base view was compared


# ---------------------------------------------------------------------- 3. anyres_max interpolation
@pytest.mark.parametrize("size", [(300, 300), (280, 190), (250, 299)])
def test_onevision_interpolated_map(adapters, size):
    """anyres_max_4 with 3 x 3 tiles: the map is resized; tokens are flagged and carry no patch,
    counts still match HF, and the values are HF's bilinear resize of the un-interpolated map."""
    adapter = adapters["llava_onevision"]
    batch = check_features(adapter, [size])  # counts, newlines, vision index -1 on interpolated tokens
    lay = batch.layouts[0]
    grid = lay.grid(0, 1)
    assert grid.interpolated and (grid.vision_index == -1).all()
    pos = lay.grid_positions(0, 1).reshape(-1)
    assert lay.interpolated[pos].all() and not lay.interpolated[lay.grid_positions(0, 0)].any()
    # the interpolated grid spans the same window of the image as the map it was resized from,
    # cut into fewer cells, each wider than a patch
    src = adapter.source_map_grid(0, adapter.plan(size))
    assert grid.rows < src.rows and grid.cols < src.cols
    for a, b in zip(grid.spans(), src.spans()):
        np.testing.assert_allclose([a[0, 0], a[-1, 1]], [b[0, 0], b[-1, 1]], atol=1e-9)
        assert (np.diff(a[:, 0]) > 0).all() and (a[:, 1] - a[:, 0] > (b[:, 1] - b[:, 0]).max()).all()
    # values: bilinear resize (as HF) of the projected source map, read through its vision index
    _, emb = run_batch(adapter, [noise_image(*size, 0)])
    feats = tower_features(adapter, batch)
    with torch.no_grad():
        m = adapter.model.model.multi_modal_projector(feats[torch.from_numpy(src.vision_index.reshape(-1))])
        m = m.T.reshape(1, -1, src.rows, src.cols)
        want = torch.nn.functional.interpolate(m, [grid.rows, grid.cols], mode="bilinear")[0].flatten(1).T
    err = rel_err(emb[0, torch.from_numpy(pos)], want)
    assert err.max().item() < 1e-5


def test_onevision_small_maps_not_interpolated(adapters):
    """Maps of at most ~4.8 tiles of tokens (anyres_max_4) stay 1:1 with patches."""
    adapter = adapters["llava_onevision"]
    for size in [(100, 100), (40, 290), (290, 40)]:
        grid = adapter.plan(size)
        g = adapter.source_map_grid(0, grid)
        layout = adapter.prepare([noise_image(*size, 1)], [adapter.render_prompt("x")]).layouts[0]
        hires = layout.grid(0, 1)
        assert not hires.interpolated and (hires.rows, hires.cols) == (g.rows, g.cols)
        assert (hires.vision_index >= 0).all()


def test_inconsistent_strategy_is_refused(adapters, monkeypatch):
    """SigLIP has no CLS: "default" would drop a patch and HF cannot reshape the rest."""
    adapter = adapters["llava_onevision"]
    monkeypatch.setattr(adapter.config, "vision_feature_select_strategy", "default")
    with pytest.raises(ValueError, match="inconsistent"):
        adapter.image_grids({}, 0, [(100, 100)])


# ---------------------------------------------------------------------- 4. loading and prompts
def test_load_model_picks_family_adapters(adapters, tmp_path):
    from transformers.utils import is_torchvision_available

    from sightline.models.llava_next import LlavaNextAdapter
    from sightline.models.llava_onevision import LlavaOnevisionAdapter

    nxt, ov = adapters["llava_next"], adapters["llava_onevision"]
    assert type(nxt) is LlavaNextAdapter and nxt.family == "llava_next"
    assert type(ov) is LlavaOnevisionAdapter and ov.family == "llava_onevision"
    assert type(nxt.model).__name__ == "LlavaNextForConditionalGeneration"
    assert type(ov.model).__name__ == "LlavaOnevisionForConditionalGeneration"
    for a in (nxt, ov):
        assert hasattr(a.processor, "image_processor") and hasattr(a.processor, "tokenizer")
        text = a.render_prompt("What is shown?", prefix="Look.")
        assert text == "<|user|>Look.<image>What is shown?<|end|><|assistant|>"
    if not is_torchvision_available():
        assert not hasattr(ov.processor, "video_processor")
    # a folder saved through the image-only processor names HF's class, so it loads as usual elsewhere
    ov.processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "LlavaOnevisionProcessor"
    assert saved["vision_aspect_ratio"] == "anyres_max_4"


def test_onevision_processor_works_whether_or_not_torchvision_is_reported(adapters, monkeypatch):
    """`load_processor` returns a working images-only processor where torchvision is reported present too."""
    import transformers.utils

    from sightline.models.llava_onevision import LlavaOnevisionAdapter

    ov = adapters["llava_onevision"]
    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: True)
    proc = LlavaOnevisionAdapter.load_processor(ov.name)
    assert hasattr(proc, "image_processor")
    out = proc(images=[noise_image(90, 200, 3)], text=[ov.render_prompt("x")], return_tensors="pt")
    assert (out["input_ids"] == ov.image_token_id).sum().item() == sum(
        g.n_tokens for g in ov.image_grids(out, 0, [(90, 200)])[0]
    )


def test_onevision_tile_strips_are_seen_by_no_token(adapters):
    """SigLIP-style crops that are not whole patches leave a strip of every tile unseen: the map's
    grid carries exact spans, and the layout helpers treat the strips as covered by no token."""
    from sightline.models.layout import mask_to_tokens, point_to_token, tokens_to_pixels

    a = adapters["llava_onevision"]
    h = w = 100  # 2 x 2 tiles of 60 px, 4 x 4 patches of 14 px each: 4 px per tile unseen
    lay = a.prepare([noise_image(h, w, 0)], [a.render_prompt("x")]).layouts[0]
    g = lay.grid(0, 1)
    assert not g.interpolated and g.col_spans is not None and g.row_spans is not None
    xs, ys = g.spans()
    k = int(np.flatnonzero(xs[1:, 0] - xs[:-1, 1] > 1e-9)[0])  # the tile boundary
    gap = (xs[k, 1], xs[k + 1, 0])
    assert gap[1] - gap[0] == pytest.approx(4 * w / 120)  # 4 canvas px, canvas 120 px for 100 px
    y_mid = float(ys[0].mean())
    assert point_to_token(lay, ((gap[0] + gap[1]) / 2, y_mid), 0, 1) == -1
    assert point_to_token(lay, (float(xs[k + 1].mean()), y_mid), 0, 1) == lay.grid_positions(0, 1)[0, k + 1]
    scores = np.arange(g.rows * g.cols, dtype=np.float64).reshape(g.rows, g.cols)
    painted = tokens_to_pixels(lay, scores, 0, 1)
    cx, cy = np.arange(w) + 0.5, np.arange(h) + 0.5
    in_gap = (cx >= gap[0]) & (cx < gap[1])
    assert in_gap.any() and np.isnan(painted[:, in_gap]).all()
    # every painted pixel's centre lies in the box of the token whose score it took
    b = g.boxes().reshape(-1, 4)
    yy, xx = np.nonzero(~np.isnan(painted))
    t = painted[yy, xx].astype(int)
    assert ((b[t, 0] <= cx[xx]) & (cx[xx] < b[t, 2]) & (b[t, 1] <= cy[yy]) & (cy[yy] < b[t, 3])).all()
    # a full mask covers every token that lies inside the image
    cover = mask_to_tokens(lay, np.ones((h, w), bool), 0, 1)
    inside = (xs[:, 0] >= 0)[None, :] & (xs[:, 1] <= w)[None, :] & (ys[:, 0] >= 0)[:, None] & (ys[:, 1] <= h)[:, None]
    np.testing.assert_allclose(cover[inside], 1.0)

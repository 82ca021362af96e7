"""The external vision encoder: features equal HF's own hidden states, grids map patches onto the original
image's pixels exactly as the processors resize and crop, and the organism's stage-1 tower ships as one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sightline.errors import UserError
from sightline.models.layout import mask_to_tokens, point_to_token, tokens_to_pixels
from sightline.perception.encoder import Encoder, grid_layout

SIDE, PATCH = 28, 7  # a 4 x 4 patch grid


def _vision_kwargs():
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
            "image_size": SIDE, "patch_size": PATCH}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    d = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**_vision_kwargs())).save_pretrained(d)
    CLIPImageProcessorPil(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    from transformers import (
        SiglipImageProcessorPil,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    d = tmp_path_factory.mktemp("siglip")
    torch.manual_seed(1)
    SiglipVisionModel(SiglipVisionConfig(**_vision_kwargs())).save_pretrained(d)
    SiglipImageProcessorPil(size={"height": SIDE, "width": SIDE}).save_pretrained(d)
    return d


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 60), (50, 30), (28, 28))]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("layer", [-1, -2, 0])
def test_features_equal_hf_hidden_states(kind, layer, clip_dir, siglip_dir):
    from transformers import AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

    d, cls, first = (clip_dir, CLIPVisionModel, 1) if kind == "clip" else (siglip_dir, SiglipVisionModel, 0)
    enc = Encoder.load(d, device="cpu", layer=layer)
    images = _images()
    got = enc.features(images, batch_size=2)
    ref_model = cls.from_pretrained(d).eval()
    pixels = AutoImageProcessor.from_pretrained(d)(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = ref_model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer][:, first:]
    assert len(got) == 3 and ref.shape[1] == 16
    for (f, grid), r, im in zip(got, ref, images):
        assert f.shape == (16, 32) and (grid.rows, grid.cols) == (4, 4)
        assert grid.image_size_hw == (im.height, im.width)
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)


def test_full_clip_and_siglip_folders_load_their_vision_part(tmp_path):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        SiglipConfig,
        SiglipImageProcessorPil,
        SiglipModel,
    )

    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 99}
    images = _images()[:1]
    for name, model, proc in (
        ("clip", CLIPModel(CLIPConfig(text_config=text, vision_config=_vision_kwargs())),
         CLIPImageProcessorPil(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})),
        ("siglip", SiglipModel(SiglipConfig(text_config=text, vision_config=_vision_kwargs())),
         SiglipImageProcessorPil(size={"height": SIDE, "width": SIDE})),
    ):
        model.save_pretrained(tmp_path / name)
        proc.save_pretrained(tmp_path / name)
        enc = Encoder.load(tmp_path / name, device="cpu", layer=-2)
        (f, _), = enc.features(images)
        with torch.no_grad():
            out = model.vision_model(pixel_values=proc(images, return_tensors="pt")["pixel_values"],
                                     output_hidden_states=True)
        first = 1 if name == "clip" else 0
        torch.testing.assert_close(f, out.hidden_states[-2][0, first:], rtol=1e-5, atol=1e-5)


def _patch_colours(n: int) -> np.ndarray:
    return np.array([[(37 * k) % 256, (91 * k + 40) % 256, (151 * k + 80) % 256] for k in range(n)], np.float64)


@pytest.mark.parametrize("kind,hw", [("clip", (40, 60)), ("clip", (66, 35)), ("siglip", (30, 50)), ("siglip", (45, 20))])
def test_grid_boxes_follow_the_processor(kind, hw, clip_dir, siglip_dir):
    """Paint each token's box on the original image in its own colour: after the real processor, each
    processed patch's centre shows that colour; a mask inside a box lands on that token."""
    enc = Encoder.load(clip_dir if kind == "clip" else siglip_dir, device="cpu")
    h, w = hw
    grid = enc.grid(hw)
    boxes = grid.boxes()
    # independent expectation of the geometry
    if kind == "clip":  # shortest side to 28, centre crop 28 x 28
        rh, rw = (SIDE, int(SIDE * w / h)) if h <= w else (int(SIDE * h / w), SIDE)  # HF truncates the long side
        x0, y0 = int((rw - SIDE) / 2) / (rw / w), int((rh - SIDE) / 2) / (rh / h)
        np.testing.assert_allclose(boxes[0, 0, :2], [x0, y0], atol=1e-4)
        np.testing.assert_allclose(boxes[0, 0, 2] - boxes[0, 0, 0], PATCH * w / rw, atol=1e-4)
    else:  # squashed to 28 x 28: the grid tiles the whole image
        np.testing.assert_allclose(boxes[-1, -1, 2:], [w, h], atol=1e-4)
        np.testing.assert_allclose(boxes[0, 0, 2:], [w / 4, h / 4], atol=1e-4)
    colours = _patch_colours(16)
    img = np.zeros((h, w, 3), np.uint8)
    for r in range(4):
        for c in range(4):
            bx0, by0, bx1, by1 = boxes[r, c]
            img[int(np.ceil(by0 - 1e-6)):int(np.ceil(by1 - 1e-6)), int(np.ceil(bx0 - 1e-6)):int(np.ceil(bx1 - 1e-6))] = \
                colours[r * 4 + c]
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(clip_dir if kind == "clip" else siglip_dir, do_normalize=False)
    px = proc([Image.fromarray(img)], return_tensors="pt")["pixel_values"][0].numpy() * 255  # [3, 28, 28]
    centres = px[:, PATCH // 2::PATCH, PATCH // 2::PATCH].transpose(1, 2, 0).reshape(16, 3)
    nearest = np.argmin(((centres[:, None] - colours[None]) ** 2).sum(-1), axis=1)
    assert nearest.tolist() == list(range(16))
    # a mask drawn inside token (2, 1)'s box lands on that token only
    layout = grid_layout(grid)
    bx0, by0, bx1, by1 = boxes[2, 1]
    mask = np.zeros(hw, bool)
    mask[int(np.ceil(by0)):int(np.floor(by1)), int(np.ceil(bx0)):int(np.floor(bx1))] = True
    cover = mask_to_tokens(layout, mask)
    assert cover.shape == (4, 4) and np.argmax(cover) == 2 * 4 + 1 and cover[2, 1] > 0.5
    assert np.nansum(cover) == pytest.approx(cover[2, 1])
    # and back: painting token indices gives each pixel the token whose box holds its centre
    painted = tokens_to_pixels(layout, np.arange(16, dtype=np.float32).reshape(4, 4))
    yy, xx = int((by0 + by1) / 2), int((bx0 + bx1) / 2)
    assert painted[yy, xx] == 9
    assert point_to_token(layout, ((bx0 + bx1) / 2, (by0 + by1) / 2)) == 9


def test_feature_rows_are_grid_tokens_row_major(clip_dir):
    """Feature row r*cols + c is patch (r, c): changing one original-image patch changes that row most."""
    enc = Encoder.load(clip_dir, device="cpu", layer=0)  # embeddings: no mixing between patches
    img = np.full((40, 60, 3), 128, np.uint8)
    (f0, grid), = enc.features([Image.fromarray(img)])
    x0, y0, x1, y1 = grid.boxes()[1, 3]
    img[int(np.ceil(y0)):int(np.floor(y1)), int(np.ceil(x0)):int(np.floor(x1))] = 255
    (f1, _), = enc.features([Image.fromarray(img)])
    change = (f1 - f0).norm(dim=1)
    assert int(change.argmax()) == 1 * 4 + 3  # neighbours change a little: bicubic resampling spreads the edit
    assert sorted(change.tolist())[-2] < 0.5 * float(change.max())


def test_user_errors(tmp_path, clip_dir):
    import shutil

    def one_line(fn):
        with pytest.raises(UserError) as e:
            fn()
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "no config.json" in one_line(lambda: Encoder.load(tmp_path / "nowhere"))
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "not a CLIP or SigLIP" in one_line(lambda: Encoder.load(tmp_path / "llama"))
    bare = tmp_path / "bare"
    shutil.copytree(clip_dir, bare)
    (bare / "preprocessor_config.json").unlink()
    assert "preprocessor_config.json" in one_line(lambda: Encoder.load(bare))
    assert "layer 4 out of range" in one_line(lambda: Encoder.load(clip_dir, layer=4))
    assert "layer -5 out of range" in one_line(lambda: Encoder.load(clip_dir, layer=-5))
    Encoder.load(clip_dir, layer=-4)  # the embeddings: in range


def test_training_saves_the_stage1_tower(tmp_path):
    """The tower saved at the end of stage 1 is the one the step-3 checkpoint (the last of stage 1) holds,
    loads as an Encoder, and stage 2 then changes the model's own tower."""
    from safetensors.torch import load_file

    from sightline.organism.model import OrganismArch
    from sightline.organism.train import TrainConfig, train

    tiny = OrganismArch(vision_hidden=32, vision_layers=1, vision_heads=2, lm_hidden=32, lm_layers=1, lm_heads=2,
                        lm_kv_heads=1, lm_intermediate=64, vocab_size=300)
    cfg = TrainConfig(out=str(tmp_path), n_scenes=16, vision_steps=3, vision_batch_size=4, steps=2, batch_size=4,
                      turns=1, warmup=1, curriculum_steps=1, checkpoint_every=3, arch=tiny)
    final = train(cfg, progress=False)
    for d in (tmp_path / "vision_stage1", final / "vision_stage1"):
        assert json.loads((d / "config.json").read_text())["architectures"] == ["CLIPVisionModel"]
        assert {f.stat().st_mode & 0o777 for f in d.iterdir()} == {0o644}
    stage1 = {k.removeprefix("vision_model."): v
              for k, v in load_file(str(final / "vision_stage1" / "model.safetensors")).items()}
    ckpt = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))  # written after step 3
    at_step3 = {k.removeprefix("model.model.vision_tower."): v for k, v in ckpt.items()
                if k.startswith("model.model.vision_tower.")}
    trained = _tower(load_file(str(final / "model.safetensors")))
    assert stage1.keys() == at_step3.keys() == trained.keys()
    assert all(torch.equal(stage1[k], at_step3[k]) for k in stage1)
    assert not all(torch.equal(stage1[k], trained[k]) for k in stage1)
    enc = Encoder.load(final / "vision_stage1", device="cpu")
    (f, grid), = enc.features([Image.new("RGB", (112, 112))])
    assert f.shape == (64, 32) and (grid.rows, grid.cols) == (8, 8)


def _tower(weights: dict) -> dict:
    """The vision tower's weights of a saved organism, named as in a CLIPVisionModel's vision_model."""
    return {k.removeprefix("vision_tower.").removeprefix("model.vision_tower.").removeprefix("vision_model."): v
            for k, v in weights.items() if "vision_tower." in k}


def test_shipped_stage1_tower_is_the_organisms_tower_before_stage2():
    from safetensors.torch import load_file

    from sightline.organism import checkpoint_path, organism_encoder_path

    path = organism_encoder_path()
    enc = Encoder.load(path, device="cpu")
    org = json.loads((checkpoint_path() / "config.json").read_text())["vision_config"]
    cfg = enc.model.config
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
              "image_size", "hidden_act"):
        assert getattr(cfg, k) == org[k], k
    ours = json.loads((path / "preprocessor_config.json").read_text())
    theirs = json.loads((checkpoint_path() / "processor_config.json").read_text())["image_processor"]
    for k in ("size", "crop_size", "image_mean", "image_std", "resample", "do_center_crop"):
        assert ours[k] == theirs[k], k
    stage1 = {k.removeprefix("vision_model."): v for k, v in load_file(str(path / "model.safetensors")).items()}
    trained = _tower(load_file(str(checkpoint_path() / "model.safetensors")))
    assert stage1.keys() == trained.keys()
    # stage 2 (the patch loss and the language model's answers) moved every layer's weights
    moved = [k for k in stage1 if not torch.allclose(stage1[k], trained[k], atol=1e-6)]
    assert len(moved) > 0.9 * len(stage1)
    (f, grid), = enc.features([Image.new("RGB", (112, 112), "white")])
    assert f.shape == (64, 128) and (grid.rows, grid.cols) == (8, 8)

"""The model organism's training: the sequences it learns from, and exact resumption."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from sightline.organism.model import OrganismArch, build_organism
from sightline.organism.train import Encoder, TrainConfig, train

TINY = OrganismArch(vision_hidden=32, vision_layers=1, vision_heads=2, lm_hidden=32, lm_layers=1, lm_heads=2,
                    lm_kv_heads=1, lm_intermediate=64, vocab_size=300)


@pytest.fixture(scope="module", autouse=True)
def _corpus_rendered_once():
    """build_organism trains its BPE on `tokenizer_corpus()`, 400 rendered scenes (~4 s), on every call; the
    corpus is a pure function of its arguments, so this module renders it once and hands each call a copy."""
    import functools

    import sightline.organism.model as organism_model

    once = functools.lru_cache(organism_model.tokenizer_corpus)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(organism_model, "tokenizer_corpus", lambda *a, **k: list(once(*a, **k)))
        yield


@pytest.fixture(scope="module")
def tiny_organism():
    from sightline.models.llava import LlavaAdapter

    model, processor = build_organism(TINY)
    return LlavaAdapter(model.eval(), processor, name="tiny-organism")


def test_organism_is_an_ordinary_llava_with_an_8x8_grid(tiny_organism, tmp_path):
    from sightline.data.synthetic import render_scene
    from sightline.models import load_model
    from sightline.organism.model import save_organism

    save_organism(tiny_organism.model, tiny_organism.processor, tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ad = load_model(str(tmp_path))
    assert ad.family == "llava"
    batch = ad.prepare([render_scene(5).to_pil()], [ad.render_prompt("What shape is shown?")])
    g = batch.layouts[0].grid()
    assert (g.rows, g.cols) == (8, 8)


def test_training_sequences_are_what_the_chat_template_renders(tiny_organism):
    """The trainer's token ids equal processor(chat template) ids, and its pixels equal the processor's."""
    from sightline.data.synthetic import questions, render_scene

    scene = render_scene(11)
    img = scene.to_pil()
    qs = [(q.question, q.answer) for q in questions(scene)[:3]]
    enc = Encoder(tiny_organism.processor, 64)
    messages = []
    for k, (q, a) in enumerate(qs):
        content = ([{"type": "image"}] if k == 0 else []) + [{"type": "text", "text": q}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    text = tiny_organism.processor.apply_chat_template(messages, tokenize=False)
    ref = tiny_organism.processor(images=[img], text=[text], return_tensors="pt")
    ids, labels = enc.sequence(qs)
    assert ref["input_ids"][0].tolist() == ids
    end = tiny_organism.tokenizer.convert_tokens_to_ids("<|end|>")
    answer_ids = [i for i, lab in zip(ids, labels) if lab != -100 and i != end]
    assert tiny_organism.tokenizer.decode(answer_ids).replace(" ", "") == "".join(a for _, a in qs).replace(" ", "")
    assert torch.equal(ref["pixel_values"], enc.pixel_values(np.asarray(img)[None]))


def test_training_resumes_exactly(tmp_path):
    """A run interrupted after a checkpoint and resumed ends with the same weights as an uninterrupted one."""
    from safetensors.torch import load_file

    cfg = TrainConfig(out=str(tmp_path / "a"), n_scenes=24, vision_steps=4, vision_batch_size=4, steps=6,
                      batch_size=4, turns=2, warmup=2, checkpoint_every=3, curriculum_steps=2, arch=TINY)
    train(cfg, progress=False)
    b = replace(cfg, out=str(tmp_path / "b"))
    train(b, progress=False, stop_after=3)  # killed after the step-3 checkpoint, inside stage 1
    assert (tmp_path / "b" / "checkpoint" / "state.json").exists()
    assert not (tmp_path / "b" / "model").exists()
    train(b, progress=False, stop_after=7)  # resumed across the stage boundary, killed in stage 2 (step 6)
    train(b, progress=False)
    wa = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_patch_labels_match_the_masks():
    """Stage 1's per-patch labels: the majority shape/colour of each 14-px patch, 0 where background wins."""
    from sightline.data.synthetic import COLOURS, SHAPES, WorldConfig, render_scene
    from sightline.organism.train import patch_labels

    scene = render_scene(3, WorldConfig(image_size=112, n_objects=1))
    shape_p, colour_p = patch_labels(scene, 14)
    assert shape_p.shape == colour_p.shape == (64,)
    obj = scene.objects[0]
    cover = scene.instance_mask.reshape(8, 14, 8, 14).transpose(0, 2, 1, 3).reshape(64, -1).astype(bool).mean(1)
    assert np.array_equal(shape_p > 0, cover > 0.5)
    assert set(shape_p[shape_p > 0]) == {1 + SHAPES.index(obj.shape)}
    assert set(colour_p[colour_p > 0]) == {1 + COLOURS.index(obj.colour)}


def test_training_refuses_another_config_in_the_same_folder(tmp_path):
    from sightline.errors import UserError

    cfg = TrainConfig(out=str(tmp_path / "a"), n_scenes=8, vision_steps=1, vision_batch_size=2, steps=1, batch_size=2,
                      turns=1, warmup=1, arch=TINY)
    train(cfg, progress=False)
    with pytest.raises(UserError, match="another config"):
        train(replace(cfg, lr=1.0), progress=False)


def test_shipped_organism_answers_the_fixed_held_out_batch_as_its_card_states(organism):
    """The shipped checkpoint loads offline through the adapter and scores the card's test batch."""
    import json

    from sightline.organism import CHECKPOINT
    from sightline.organism.evaluate import evaluate

    card = json.loads((CHECKPOINT / "eval.json").read_text())
    batch = card["test_batch"]
    got = evaluate(organism, seed=batch["seed"], n=batch["n"], progress=False)
    assert organism.family == "llava" and organism.n_layers == 4
    assert got["count"] == batch["count"]
    for qtype, acc in batch["accuracy"].items():
        assert abs(got["accuracy"][qtype] - acc) <= 0.02, (qtype, got["accuracy"][qtype], acc)
    # the bound, which the card states: single-object shape and colour >= 95%
    assert got["accuracy"]["single_colour"] >= 0.95 and got["accuracy"]["single_shape"] >= 0.95

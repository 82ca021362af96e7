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


@pytest.fixture(scope="module")
def organism():
    from sightline.models.llava import LlavaAdapter

    model, processor = build_organism(TINY)
    return LlavaAdapter(model.eval(), processor, name="tiny-organism")


def test_organism_is_an_ordinary_llava_with_an_8x8_grid(organism, tmp_path):
    from sightline.data.synthetic import render_scene
    from sightline.models import load_model
    from sightline.organism.model import save_organism

    save_organism(organism.model, organism.processor, tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ad = load_model(str(tmp_path))
    assert ad.family == "llava"
    batch = ad.prepare([render_scene(5).to_pil()], [ad.render_prompt("What shape is shown?")])
    g = batch.layouts[0].grid()
    assert (g.rows, g.cols) == (8, 8)


def test_training_sequences_are_what_the_chat_template_renders(organism):
    """The trainer's token ids equal processor(chat template) ids, and its pixels equal the processor's."""
    from sightline.data.synthetic import questions, render_scene

    scene = render_scene(11)
    img = scene.to_pil()
    qs = [(q.question, q.answer) for q in questions(scene)[:3]]
    enc = Encoder(organism.processor, 64)
    messages = []
    for k, (q, a) in enumerate(qs):
        content = ([{"type": "image"}] if k == 0 else []) + [{"type": "text", "text": q}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    text = organism.processor.apply_chat_template(messages, tokenize=False)
    ref = organism.processor(images=[img], text=[text], return_tensors="pt")
    ids, labels = enc.sequence(qs)
    assert ref["input_ids"][0].tolist() == ids
    end = organism.tokenizer.convert_tokens_to_ids("<|end|>")
    answer_ids = [i for i, lab in zip(ids, labels) if lab != -100 and i != end]
    assert organism.tokenizer.decode(answer_ids).replace(" ", "") == "".join(a for _, a in qs).replace(" ", "")
    assert torch.equal(ref["pixel_values"], enc.pixel_values(np.asarray(img)[None]))


def test_training_resumes_exactly(tmp_path):
    """A run interrupted after a checkpoint and resumed ends with the same weights as an uninterrupted one."""
    from safetensors.torch import load_file

    cfg = TrainConfig(out=str(tmp_path / "a"), n_scenes=24, steps=6, batch_size=4, turns=2, warmup=2,
                      checkpoint_every=3, curriculum_steps=2, arch=TINY)
    train(cfg, progress=False)
    b = replace(cfg, out=str(tmp_path / "b"))
    train(b, progress=False, stop_after=3)  # as if killed after the step-3 checkpoint
    assert (tmp_path / "b" / "checkpoint" / "state.json").exists()
    assert not (tmp_path / "b" / "model").exists()
    train(b, progress=False)
    wa = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_training_refuses_another_config_in_the_same_folder(tmp_path):
    from sightline.errors import UserError

    cfg = TrainConfig(out=str(tmp_path / "a"), n_scenes=8, steps=1, batch_size=2, turns=1, warmup=1, arch=TINY)
    train(cfg, progress=False)
    with pytest.raises(UserError, match="another config"):
        train(replace(cfg, lr=1.0), progress=False)

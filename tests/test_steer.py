"""Steering: edits land on each example's image tokens under left padding, k = 0 is clean, the two modes
match reference decoders, efficacy and caption loss match hand/HF computations, the job writes its
files, and on the organism a shape edit flips the answer while colour answers survive."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

from conftest import FAMILIES as ALL_FAMILIES
from conftest import gradient_image
from sightline.capture.edit import Edit, add_vector, apply_edits
from sightline.errors import UserError
from sightline.steer import (SteerConfig, answer_logprobs, caption_nll, class_means, efficacy_from_logprobs,
                             first_answer_token, headline, left_pad, load_directions, mentions, normalize, run_steering,
                             steer_edit, steering_vector)
from sightline.steer.generate import generate_ids, steer_positions

FAMILIES = ("llava", "qwen2_5_vl")  # plain RoPE and M-RoPE
PROMPTS = ["What is shown?", "Describe this image in detail, with every shape and colour you can see."]


def _images():
    return [gradient_image(60, 80), gradient_image(48, 48, seed=1)]


def _vec(ad, seed=0):
    return torch.randn(ad.hidden_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_left_pad_equals_the_processors_left_padding(tiny_adapter, family):
    ad = tiny_adapter(family)
    texts = [ad.render_prompt(p) for p in PROMPTS]
    ims = [gradient_image(60, 80), gradient_image(60, 80, seed=2)]  # same size: the prompts set the padding
    inputs, pads, _ = left_pad(ad, ims, texts)
    tok = ad.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        ref = ad.processor(images=ad.processor_images(ims), text=texts, return_tensors="pt", padding=True,
                           **ad.processor_kwargs())
    finally:
        tok.padding_side = side
    assert max(pads) > 0 and min(pads) == 0  # one row is padded
    assert "labels" not in inputs  # PaliGemma's processor adds training labels; prepare drops them
    for k, v in ref.items():
        if k != "labels":
            assert torch.equal(inputs[k], v), k


@pytest.mark.parametrize("family,where", [(f, "image") for f in ALL_FAMILIES] + [("llava", "text"), ("llava", "last")])
def test_edit_reaches_exactly_the_chosen_tokens_of_each_left_padded_example(tiny_adapter, family, where):
    """resid.2 changes by k_row * v at the image-token (or text, or last) columns of each row, nowhere else."""
    ad = tiny_adapter(family)
    texts = [ad.render_prompt(p) for p in PROMPTS]
    inputs, pads, batch = left_pad(ad, _images(), texts)
    v = _vec(ad)
    ks = np.array([2.0, -3.0])
    seen = {}

    def record(m, a, o):
        seen["h"] = (o[0] if isinstance(o, tuple) else o).detach().clone()

    def run(edits):
        with torch.no_grad(), apply_edits(ad, edits):
            hook = ad.decoder_layers[1].register_forward_hook(record)  # after the edit's hook: sees its result
            try:
                ad.model(**inputs)
            finally:
                hook.remove()
        return seen["h"]

    clean = run([])
    cols = steer_positions(batch.layouts, pads, where)
    edited = run([steer_edit("resid.2", v, ks, cols)])
    is_image = (inputs["input_ids"] == ad.image_token_id).numpy()
    real = inputs["attention_mask"].numpy().astype(bool)
    for b in range(2):
        if where == "image":
            img = np.flatnonzero(is_image[b])
        elif where == "text":
            img = np.flatnonzero(real[b] & ~is_image[b])
        else:
            img = np.array([real.shape[1] - 1])  # left padding: every row's last prompt token is the last column
        np.testing.assert_array_equal(np.sort(cols[b]), img)  # the columns are exactly the chosen tokens
        delta = edited[b] - clean[b]
        torch.testing.assert_close(delta[img], (ks[b] * v).float().expand(len(img), -1), rtol=1e-4, atol=1e-4)
        rest = np.setdiff1d(np.arange(delta.shape[0]), img)
        assert torch.equal(edited[b, rest], clean[b, rest])


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_scale_reproduces_clean_generation_exactly(tiny_adapter, family):
    from sightline.organism.evaluate import answer

    ad = tiny_adapter(family)
    v = _vec(ad, 1)
    clean = generate_ids(ad, _images(), PROMPTS, max_new_tokens=6)
    zero = generate_ids(ad, _images(), PROMPTS, "resid.1", v, 0.0, max_new_tokens=6)
    big = generate_ids(ad, _images(), PROMPTS, "resid.1", v, 40.0, max_new_tokens=6)
    assert zero == clean
    assert big != clean  # the edit is live
    ref = answer(ad, _images(), PROMPTS, max_new_tokens=6)  # the organism's batched greedy answers
    ours = [t.strip().lower() for t in ad.tokenizer.batch_decode(clean, skip_special_tokens=True)]
    assert ours == ref


def _reference_decode(ad, image, prompt, v, k, L, n, every_step):
    """Greedy decoding by hand: prefill with k*v at the image tokens of resid.L, then one token per
    call from the KV cache, each new token also edited when every_step."""
    from transformers import DynamicCache

    batch = ad.prepare([image], [ad.render_prompt(prompt)])
    inputs = batch.inputs
    pos = batch.layouts[0].image_positions
    cache = DynamicCache(config=ad.model.config)
    # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns); 5.23 has only the old
    cache_kw = "cache" if "cache" in inspect.signature(ad.model.forward).parameters else "past_key_values"
    att = inputs["attention_mask"]
    toks = []
    with torch.no_grad():
        with apply_edits(ad, [Edit(f"resid.{L}", [pos], add_vector(v, k))]):
            out = ad.model(**inputs, **{cache_kw: cache}, use_cache=True, return_dict=True)
        for _ in range(n):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(int(nxt))
            att = torch.cat([att, torch.ones_like(nxt)], 1)
            kw = dict(input_ids=nxt, attention_mask=att, **{cache_kw: cache}, use_cache=True,
                      cache_position=torch.tensor([att.shape[1] - 1]), return_dict=True)
            edits = [Edit(f"resid.{L}", None, add_vector(v, k), prefill_only=False)] if every_step else []
            with apply_edits(ad, edits):
                out = ad.model(**kw)
    return toks


def _until_stop(ad, toks):
    from sightline.capture.edit import stop_ids

    stop = stop_ids(ad)
    out = []
    for t in toks:
        if t in stop:
            break
        out.append(t)
    return out


def test_prefill_and_every_step_modes_match_their_reference_decoders(tiny_adapter):
    ad = tiny_adapter("llava")
    v = _vec(ad, 2)
    n, k, L = 6, 30.0, 2
    image, prompt = _images()[0], PROMPTS[0]
    pre = generate_ids(ad, [image], [prompt], f"resid.{L}", v, k, mode="prefill", max_new_tokens=n)[0]
    every = generate_ids(ad, [image], [prompt], f"resid.{L}", v, k, mode="every_step", max_new_tokens=n)[0]
    assert pre == _until_stop(ad, _reference_decode(ad, image, prompt, v, k, L, n, every_step=False))
    assert every == _until_stop(ad, _reference_decode(ad, image, prompt, v, k, L, n, every_step=True))
    assert pre != every  # steering the generated tokens too changes the continuation


def test_efficacy_equals_a_hand_computation_from_logits(tiny_adapter):
    ad = tiny_adapter("llava")
    v = _vec(ad, 3)
    prompt = 'Reply either "circle" or "star" in lowercase depending on what is shown in the image.'
    ids = [first_answer_token(ad, prompt, w) for w in ("circle", "star")]
    for w, i in zip(("circle", "star"), ids):
        assert w.startswith(ad.tokenizer.decode([i]).strip())  # the word's first piece
    ims = _images()
    lp = answer_logprobs(ad, ims, [prompt] * 2, ids, "resid.1", v, [0.0, 5.0])
    eff = efficacy_from_logprobs(lp)
    for b, k in enumerate([0.0, 5.0]):  # by hand: one unpadded example, the plain Edit, full softmax
        batch = ad.prepare([ims[b]], [ad.render_prompt(prompt)])
        with torch.no_grad(), apply_edits(ad, [Edit("resid.1", [batch.layouts[0].image_positions], add_vector(v, k))]):
            logits = ad.model(**batch.inputs).logits[0, -1].double()
        p = torch.softmax(logits, -1)
        assert eff["prob"][b] == pytest.approx(float(p[ids[1]]), rel=1e-4)
        assert eff["share"][b] == pytest.approx(float(p[ids[1]] / (p[ids[0]] + p[ids[1]])), rel=1e-4)


def test_caption_nll_equals_hf_loss_with_and_without_the_edit(tiny_adapter):
    ad = tiny_adapter("llava")
    v = _vec(ad, 4)
    ims = _images()
    prompts = ["Describe this image.", "What is shown?"]
    caps = ["a red circle on the left", "two shapes"]
    got = caption_nll(ad, ims, prompts, caps, "resid.2", v, [0.0, 6.0])
    for b, k in enumerate([0.0, 6.0]):
        text = ad.render_prompt(prompts[b])
        batch = ad.prepare([ims[b]], [text + caps[b]])
        ids = batch.inputs["input_ids"]
        n_cap = len(ad.tokenizer(text + caps[b], add_special_tokens=False)["input_ids"]) - len(
            ad.tokenizer(text, add_special_tokens=False)["input_ids"])
        labels = torch.full_like(ids, -100)
        labels[0, -n_cap:] = ids[0, -n_cap:]
        with torch.no_grad(), apply_edits(ad, [Edit("resid.2", [batch.layouts[0].image_positions], add_vector(v, k))]):
            loss = ad.model(**batch.inputs, labels=labels).loss
        assert got[b] == pytest.approx(float(loss), rel=1e-4)
    assert caption_nll(ad, ims[1:], prompts[1:], caps[1:], "resid.2", v, 6.0)[0] == pytest.approx(got[1], rel=1e-5)


def test_judge_options_are_seeded_balanced_and_hold_source_target_and_two_others():
    from sightline.steer.measure import judge_options

    classes = ["circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart"]
    opts = judge_options(classes, "circle", "star", 400, seed=3)
    assert opts == judge_options(classes, "circle", "star", 400, seed=3)  # the same on every run
    assert opts != judge_options(classes, "circle", "star", 400, seed=4)
    for o in opts:
        assert len(o) == 4 and len(set(o)) == 4 and {"circle", "star"} <= set(o) and set(o) <= set(classes)
    where = np.bincount([o.index("star") for o in opts], minlength=4)
    assert where.min() >= 70, where  # no position owns the target (100 each on average)
    assert len({tuple(sorted(o)) for o in opts}) > 10  # the distractors vary across items
    assert [sorted(o) for o in judge_options(["a", "b", "c"], "a", "b", 2)] == [["a", "b", "c"]] * 2  # one other


def test_judge_reads_the_letter_with_the_highest_next_token_probability(tiny_adapter):
    """The judge's choice and probabilities equal a hand computation: the prompt with the answer and the lettered
    options, rendered, one unpadded forward beside a blank image, softmax over the letters' tokens."""
    from PIL import Image

    from sightline.steer.measure import JUDGE_PROMPT, judge_answers, judge_text

    ad = tiny_adapter("llava")
    answers = ["a star", "a red circle on the left", ""]
    options = [["star", "circle", "cross", "heart"], ["heart", "circle", "star", "cross"], ["a", "b", "c", "d"]]
    images = [gradient_image(60, 80), gradient_image(48, 48, seed=1), gradient_image(48, 48)]
    choice, probs = judge_answers(ad, images, answers, ["What is shown?"] * 3, options, JUDGE_PROMPT, batch_size=2)
    assert choice[2] == -1 and np.isnan(probs[2]).all()  # an empty answer is not judged
    for r in range(2):
        text, letters = judge_text(JUDGE_PROMPT, answers[r], "What is shown?", options[r])
        assert letters == ["A", "B", "C", "D"] and f"B. {options[r][1]}" in text and answers[r] in text
        ids = [first_answer_token(ad, text, x) for x in letters]
        blank = Image.new("RGB", images[r].size, (128, 128, 128))
        batch = ad.prepare([blank], [ad.render_prompt(text)])
        with torch.no_grad():
            logits = ad.model(**batch.inputs).logits[0, -1].double()
        p = torch.softmax(logits, -1)[ids]
        np.testing.assert_allclose(probs[r], (p / p.sum()).numpy(), rtol=1e-4)
        assert choice[r] == int(p.argmax())


def test_mentions_whole_words_only():
    assert mentions("A Star.", "star") and mentions("two stars", "star") and mentions("crosses", "cross")
    assert not mentions("starfish", "star") and not mentions("mustard", "star")
    assert mentions("a hot dog stand", "hot dog")


def test_vectors_class_means_explicit_keys_and_normalisation(tmp_path, tiny_checkpoint):
    from safetensors.torch import save_file

    from sightline.data.synthetic import WorldConfig, export_imagefolder
    from sightline.extract import ExtractConfig, extract
    from sightline.store import ActivationStore

    data = export_imagefolder(tmp_path / "data", seed=3, n=12, config=WorldConfig(image_size=56, n_objects=1))
    store_dir = extract(ExtractConfig(model=tiny_checkpoint("llava"), data=str(data), out=str(tmp_path / "store"),
                                      sites="resid", layers="1", dtype="float32", progress=False))
    store = ActivationStore.open(store_dir)
    means = class_means(store, ["resid.1"])
    acts, idx = store.tensor("resid.1").double().numpy(), store.index
    labels = {e["example"]: e["label"] for e in store.examples}
    for c in sorted(set(labels.values())):  # by hand: mean over examples of each example's image-token mean
        per_ex = [acts[(idx["example"] == i) & (idx["modality"] == 1)].mean(0) for i, lab in labels.items() if lab == c]
        np.testing.assert_allclose(means[f"resid.1/{c}"].numpy(), np.mean(per_ex, 0), rtol=1e-5, atol=1e-6)
    assert load_directions(store_dir).keys() == means.keys()
    a, b = sorted(set(labels.values()))[:2]
    torch.testing.assert_close(steering_vector(means, "resid.1", a, b), means[f"resid.1/{b}"] - means[f"resid.1/{a}"])
    explicit = torch.arange(4.0)
    save_file({"resid.1/x": torch.zeros(4), "resid.1/y": torch.ones(4), "resid.1/x:y": explicit},
              str(tmp_path / "d.safetensors"))
    d = load_directions(tmp_path / "d.safetensors")
    assert torch.equal(steering_vector(d, "resid.1", "x", "y"), explicit)  # explicit wins
    assert torch.equal(steering_vector(d, "resid.1", "y", "x"), -torch.ones(4))
    with pytest.raises(UserError, match="no direction for class 'z'"):
        steering_vector(d, "resid.1", "x", "z")
    assert float(normalize(explicit, "unit").norm()) == pytest.approx(1.0)
    assert float(normalize(explicit, "resid", 7.5).norm()) == pytest.approx(7.5)
    torch.testing.assert_close(normalize(explicit, "none"), explicit)


def test_run_steering_writes_results_generations_and_figures(tmp_path, tiny_checkpoint, monkeypatch):
    from sightline.data.synthetic import WorldConfig, export_imagefolder
    from sightline.extract import ExtractConfig, extract

    model = tiny_checkpoint("llava")
    world = WorldConfig(image_size=56, n_objects=1, shapes=("circle", "star"))
    train = export_imagefolder(tmp_path / "train", seed=1, n=8, config=world)
    test = export_imagefolder(tmp_path / "test", seed=2, n=8, config=world)
    store = extract(ExtractConfig(model=model, data=str(train), out=str(tmp_path / "store"), sites="resid",
                                  layers="1,2", dtype="float32", progress=False))
    cfg = SteerConfig(model=model, directions=str(store), data=str(test), out=str(tmp_path / "out"),
                      pairs=("circle:star",), scales=(0.0, 8.0), normalize="resid", images_per_class=3,
                      max_new_tokens=4, progress=False)
    res = run_steering(cfg)
    out = tmp_path / "out"
    assert res.path == out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "figures", "generations.jsonl", "index.html",
                                                     "results.json"]
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "steer_judged.png", "steer_overview.png", "steer_resid.1.png", "steer_resid.2.png"]
    assert SteerConfig.from_dict(json.loads((out / "config.json").read_text())) == cfg
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == res.summary and saved["prompts"]["damage_qtypes"] == ["colour"]
    assert res["best_site"] == res["best"]["site"] and headline(res) == headline(saved)  # headline in the summary
    assert "figures/steer_overview.png" in (out / "index.html").read_text()
    lay = saved["pairs"][0]["layers"]["resid.1"]
    n = saved["pairs"][0]["n_images"]
    assert lay["scales"] == [0.0, 8.0] and lay["caption_nll_increase"][0] == 0.0  # k = 0 is the clean run
    assert lay["efficacy"][0] == pytest.approx(saved["pairs"][0]["clean"]["efficacy"], abs=1e-6)
    assert lay["vector_norm"] == pytest.approx(saved["ref_norms"]["resid.1"], rel=1e-5)
    # judged swaps: k = 0 answers are the clean ones, so their judgement and coherence are the clean answers'
    for key in ("judged_target_rate", "judged_source_rate", "coherence"):
        assert lay[key][0] == pytest.approx(saved["pairs"][0]["clean"][key], abs=1e-6), key
    assert all(t + s <= 1 + 1e-9 for t, s in zip(lay["judged_target_rate"], lay["judged_source_rate"]))
    options = saved["pairs"][0]["judge_options"]
    assert len(options) == n and all(sorted(o) == ["circle", "star"] for o in options)  # 2 classes: no distractor
    lines = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    opens = [g for g in lines if g["kind"] == "open"]
    assert all("judged" in g and (g["judged"] is None or g["judged"] in ("circle", "star")) for g in opens)
    n_q = saved["pairs"][0]["n_damage_questions"]
    assert len(lines) == (n + n_q) * (1 + 2 * 2)  # (open + damage) x (clean + 2 layers x 2 scales)
    with pytest.raises(UserError, match="exists and is not empty"):
        run_steering(cfg)
    with pytest.raises(UserError, match="class 'heart'"):
        run_steering(SteerConfig(model=model, directions=str(store), data=str(test), out=str(tmp_path / "o2"),
                                 pairs=("circle:heart",)))
    assert not (tmp_path / "o2").exists()
    # an error mid-run (here: drawing a figure) leaves no output folder, not even a partial one
    import sightline.report.steer as figs

    def broken(*a, **k):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(figs, "plot_overview", broken)
    with pytest.raises(RuntimeError, match="figure failed"):
        run_steering(SteerConfig(**{**cfg.to_dict(), "out": str(tmp_path / "o3")}))
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o3.partial").exists()


def test_run_steering_reads_classes_from_a_jsonl_manifest_by_dotted_path(tmp_path, tiny_checkpoint):
    """The demo's layout: a synthetic JSONL manifest (one question per scene), classes at facts.objects.0.shape."""
    from sightline.data.synthetic import WorldConfig, export_jsonl
    from sightline.extract import ExtractConfig, extract
    from sightline.store import ActivationStore

    model = tiny_checkpoint("llava")
    world = WorldConfig(image_size=56, n_objects=1, shapes=("circle", "star"))
    manifest = export_jsonl(tmp_path / "data", seed=4, n=8, config=world, qtypes=("size", "colour"), per_image=1)
    store = extract(ExtractConfig(model=model, data=str(manifest), out=str(tmp_path / "store"), sites="resid",
                                  layers="1", positions="all", dtype="float32", progress=False))
    label = "facts.objects.0.shape"
    means = class_means(ActivationStore.open(store), ["resid.1"], label)
    assert sorted(means) == ["resid.1/circle", "resid.1/star"]
    with pytest.raises(UserError, match="no example in the store has a label|has no example with a label"):
        class_means(ActivationStore.open(store), ["resid.1"], "facts.objects.0.nothing")
    res = run_steering(SteerConfig(model=model, directions=str(store), label=label, data=str(manifest),
                                   data_label=label, out=str(tmp_path / "out"), pairs=("star:circle",),
                                   scales=(0.0, 4.0), images_per_class=2, max_new_tokens=3, progress=False))
    pair = res.results["pairs"][0]
    assert list(pair["layers"]) == ["resid.1"] and pair["n_images"] == 2
    assert pair["n_damage_questions"] == 2  # the world's colour question of each steered scene
    assert any("not held out" in w for w in res.results["warnings"])  # steered on the directions' own images


# ------------------------------------------------------------------------------ the model organism
def _organism_run(tmp_path, layers: str, scales, extract_layers: str = "all") -> dict:
    """Directions from a store of one synthetic world (seed 11), steering circle -> star on held-out
    scenes of another (seed 12)."""
    from sightline.data.synthetic import WorldConfig, export_imagefolder
    from sightline.extract import ExtractConfig, extract
    from sightline.organism import checkpoint_path

    ckpt = checkpoint_path()
    world = WorldConfig(n_objects=1)
    train = export_imagefolder(tmp_path / "train", seed=11, n=160, config=world)
    held_out = export_imagefolder(tmp_path / "held_out", seed=12, n=200, config=world)
    store = extract(ExtractConfig(model=str(ckpt), data=str(train), out=str(tmp_path / "store"), sites="resid",
                                  layers=extract_layers, dtype="float32", batch_size=40, progress=False))
    res = run_steering(SteerConfig(model=str(ckpt), directions=str(store), data=str(held_out),
                                   out=str(tmp_path / "out"), pairs=("circle:star",), layers=layers, scales=scales,
                                   images_per_class=20, batch_size=64, max_new_tokens=8, progress=False))
    return {**res.results, "out": res.path}


def _check_organism_validation(res: dict) -> dict:
    pair = res["pairs"][0]
    assert pair["n_images"] == 20
    assert pair["clean"]["source_rate"] >= 0.7 and pair["clean"]["flip_rate"] == 0.0  # it sees circles
    assert pair["clean"]["damage_accuracy"] >= 0.9
    best = res["summary"]["best"]  # the highest flip rate whose colour accuracy keeps 90% of the clean one
    assert best["flip_rate"] >= 0.8 and best["damage_accuracy"] >= 0.9, best
    lay = pair["layers"][best["site"]]
    j = lay["scales"].index(best["scale"])
    assert lay["efficacy"][j] > 0.5 > lay["efficacy"][0]  # the target's share of the two words crosses over
    return best


@pytest.fixture(scope="module")
def organism_steer(tmp_path_factory) -> dict:
    """circle -> star on the organism at resid.0 and resid.1, k in (0, 3, 4, 6, 8): one run for the tests below."""
    return _organism_run(tmp_path_factory.mktemp("organism_steer"), "0,1", (0.0, 3.0, 4.0, 6.0, 8.0),
                         extract_layers="0,1")


def test_organism_shape_steering_flips_answers_and_spares_colour(organism_steer):
    """At the best layer some k flips >= 80% of 20 held-out circles to "star" while >= 90% of the colour
    answers stay right. (Measured on the shipped organism: resid.0, k = 6 with unit vectors flips 100% with
    every colour answer right; image
    tokens at resid.1 and later no longer carry the shape the answer reads, see the slow test.)"""
    best = _check_organism_validation(organism_steer)
    assert best["site"] == "resid.0"


def test_organism_judged_swaps_rank_k_as_the_flip_rate(organism_steer, organism):
    """The model's own four-way judgement of its steered answers (source, target, two distractor shapes, read
    beside a blank image) ranks k as the flip rate does at resid.0, and the coherence of the k = 0 answers is
    the NLL of the clean answers computed directly.

    Measured (resid.0, 20 circles, k = 0, 3, 4, 6, 8; train/held-out scene seeds 21/22, 31/32, 41/42, 51/52):
    Spearman rho 1.0 on all four, judged-target rate equal to the flip rate at every k; with k = 0, 2, 3, 4, 5,
    6, 8 and seeds 11/12, rho 0.972, the largest gap 0.05 (one answer at k = 8). Bounds: rho >= 0.9, gap <= 0.15."""
    from scipy.stats import spearmanr

    from sightline.steer.measure import caption_nll

    pair = organism_steer["pairs"][0]
    lay = pair["layers"]["resid.0"]
    flips, judged = lay["flip_rate"], lay["judged_target_rate"]
    assert flips[0] == judged[0] == 0.0 and max(flips) >= 0.8  # the sweep does cross over
    assert spearmanr(flips, judged).statistic >= 0.9, (flips, judged)
    assert max(abs(a - b) for a, b in zip(flips, judged)) <= 0.15, (flips, judged)
    assert lay["judged_source_rate"][0] >= 0.7 > lay["judged_source_rate"][-1]  # the circle is judged gone
    # every item's options: source, target and two other shapes, each once
    assert all(len(set(o)) == 4 and {"circle", "star"} <= set(o) for o in pair["judge_options"])
    # coherence at k = 0 = the clean answers' NLL under the unsteered model, computed here directly
    out = organism_steer["out"]
    clean = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    clean = [g for g in clean if g["kind"] == "open" and g["site"] is None]
    from sightline.data import load_image

    nll = caption_nll(organism, [load_image(g["path"]) for g in clean], [g["prompt"] for g in clean],
                      [g["answer"] for g in clean])
    assert lay["coherence"][0] == pytest.approx(float(np.mean(nll)), abs=1e-5)
    assert pair["clean"]["coherence"] == pytest.approx(lay["coherence"][0], abs=1e-9)
    assert lay["coherence"][-1] > lay["coherence"][0] + 1.0  # naming a star on a circle costs nats


@pytest.mark.slow
def test_organism_steering_sweep_over_every_layer(tmp_path):
    """The whole sweep (every layer, the paper's k grid) finds resid.0 as the best layer. (On the shipped
    organism no k flips the shape from resid.1 on: zeroing the image tokens at resid.1 leaves the shape
    answers as they were, so the shape has left the image tokens after block 0.)"""
    scales = tuple(round(float(k), 3) for k in np.linspace(0, 30, 16))
    best = _check_organism_validation(_organism_run(tmp_path, "all", scales))
    assert best["site"] == "resid.0"


def test_best_point_weighs_damage():
    """The best (layer, k) is the highest flip rate among points whose damage is acceptable: with damage
    questions, a point that costs 0.3 of their accuracy does not qualify; without them, a point that flips
    everything at caption NLL +3.4 nats/token does not either."""
    from sightline.steer.run import summarize

    def pair(flip, eff, dmg, nll):
        clean_dmg = None if dmg[0] is None else 1.0
        return {"clean": {"efficacy": 0.1, "flip_rate": 0.0, "source_rate": 1.0, "damage_accuracy": clean_dmg,
                          "caption_nll": 0.1},
                "layers": {"resid.0": {"efficacy": eff, "efficacy_prob": eff, "efficacy_share": eff, "flip_rate": flip,
                                       "source_rate": [1 - f for f in flip], "damage_accuracy": dmg,
                                       "caption_nll_increase": nll}}}

    scales = [0.0, 2.0, 4.0, 8.0]
    # damage questions asked: their accuracy is the damage (k = 8 loses 0.3 of it); the short caption's NLL,
    # which moves with any swap of the object it names, does not bar k = 4
    p = pair([0.0, 0.6, 1.0, 1.0], [0.1, 0.5, 0.9, 0.99], [1.0, 0.95, 1.0, 0.7], [0.0, 0.2, 3.4, 0.3])
    s = summarize([p], ["resid.0"], scales)
    assert s["best"]["scale"] == 4.0 and s["best"]["flip_rate"] == 1.0 and "2 of 3 steered points" in s["best_note"]
    # no damage questions: the caption NLL bounds the damage (k = 4 at +3.4 and k = 8 at +1.5 do not qualify)
    u = pair([0.0, 0.6, 1.0, 1.0], [0.1, 0.5, 0.9, 0.99], [None] * 4, [0.0, 0.2, 3.4, 1.5])
    s = summarize([u], ["resid.0"], scales)
    assert s["best"]["scale"] == 2.0 and s["best"]["flip_rate"] == 0.6 and "1 of 3 steered points" in s["best_note"]
    none = summarize([u], ["resid.0"], scales, max_caption_nll_increase=0.1)
    assert none["best"] is None and "no steered (layer, k) keeps the damage acceptable" in none["best_note"]
    none = summarize([p], ["resid.0"], scales, max_damage_drop=-0.5)
    assert none["best"] is None and "no steered (layer, k) keeps the damage acceptable" in none["best_note"]
    # nothing flips: the highest efficacy wins, never the clean k = 0
    q = pair([0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.4, 0.3], [None] * 4, [0.0, 0.1, 0.2, 0.3])
    assert summarize([q], ["resid.0"], scales)["best"]["scale"] == 4.0


def test_plain_folder_on_a_random_model_warns_that_flips_measure_nothing(tmp_path, tiny_checkpoint):
    """A random model answers the paper's open prompt with no class word: the run says so, and with bounds no
    point meets, the summary says that no (layer, k) qualifies."""
    from safetensors.torch import save_file

    from sightline.data.synthetic import WorldConfig, export_imagefolder

    model = tiny_checkpoint("llava")
    data = export_imagefolder(tmp_path / "data", seed=2, n=6, config=WorldConfig(image_size=56, n_objects=1,
                                                                                shapes=("circle", "star")))
    (data / "world.json").unlink()  # a plain image folder
    from sightline.models import load_model

    d = load_model(model).hidden_size
    g = torch.Generator().manual_seed(0)
    save_file({"resid.1/circle": torch.randn(d, generator=g), "resid.1/star": torch.randn(d, generator=g)},
              str(tmp_path / "d.safetensors"))
    res = run_steering(SteerConfig(model=model, directions=str(tmp_path / "d.safetensors"), data=str(data),
                                   out=str(tmp_path / "out"), pairs=("circle:star",), scales=(0.0, 4.0),
                                   images_per_class=2, max_new_tokens=3, max_caption_nll_increase=-1.0,
                                   progress=False))
    assert res.results["prompts"]["open"] == "What is shown in this image?"  # not the world's: not its model
    assert res.results["prompts"]["world_language"] is None
    assert any("names 'circle' or 'star'" in w and "measures nothing" in w for w in res["warnings"])
    assert res["best_site"] is None and "no steered (layer, k)" in res["best_note"]
    assert "measures nothing" in res.html.read_text()


def test_organism_on_a_plain_folder_is_asked_the_worlds_question(tmp_path):
    """The shipped organism steered on a plain folder of synthetic images (no world.json): the defaults become
    the world's question ("What shape is shown?", efficacy as the share of the two words), which it answers
    with the shape, so no warning, and k = 6 swaps it; the best point keeps the caption NLL within its bound."""
    from sightline.data.synthetic import WorldConfig, export_imagefolder
    from sightline.extract import ExtractConfig, extract
    from sightline.organism import checkpoint_path

    ckpt = str(checkpoint_path())
    world = WorldConfig(n_objects=1, shapes=("circle", "star"))
    train = export_imagefolder(tmp_path / "train", seed=11, n=40, config=world)
    plain = export_imagefolder(tmp_path / "plain", seed=12, n=24, config=world)
    (plain / "world.json").unlink()
    store = extract(ExtractConfig(model=ckpt, data=str(train), out=str(tmp_path / "store"), sites="resid",
                                  layers="0", dtype="float32", batch_size=40, progress=False))
    res = run_steering(SteerConfig(model=ckpt, directions=str(store), data=str(plain), out=str(tmp_path / "out"),
                                   pairs=("circle:star",), layers="0", scales=(0.0, 6.0), images_per_class=6,
                                   batch_size=32, max_new_tokens=6, progress=False))
    r = res.results
    assert r["prompts"]["world_language"] == "the model is the shipped organism"
    assert r["efficacy_metric"] == "share" and r["prompts"]["caption"] == "Describe the image."
    opens = [json.loads(x) for x in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    assert {g["prompt"] for g in opens if g["kind"] == "open"} == {"What shape is shown?"}
    assert r["pairs"][0]["clean"]["source_rate"] >= 0.8  # it names the circle
    assert not any("measures nothing" in w for w in res["warnings"])
    assert res["chance"]["efficacy"] == 0.5
    # the organism's own captions name the shape, so a swap alone raises their NLL (~1.5 nats/token at k = 6
    # here): the best point respects the bound, whatever it costs the flip rate
    assert res["best_site"] is None or res["caption_nll_increase"] <= 1.0
    big = r["pairs"][0]["layers"]["resid.0"]
    assert big["flip_rate"][-1] >= 0.5 and big["efficacy"][-1] > 0.5 > big["efficacy"][0]  # k = 6 does swap


def test_judge_prompt_must_show_the_answer_and_use_only_known_fields(tmp_path):
    base = dict(model=str(tmp_path / "m"), directions=str(tmp_path / "d"), data=str(tmp_path / "x"),
                out=str(tmp_path / "out"))
    with pytest.raises(UserError, match=r"must show the answer it judges: put \{answer\} in it"):
        run_steering(SteerConfig(**base, judge_prompt="Which shape? {options}"))
    with pytest.raises(UserError, match=r"may use only \{answer\}, \{question\} and \{options\}"):
        run_steering(SteerConfig(**base, judge_prompt="{answer} {src}"))
    assert not (tmp_path / "out").exists()

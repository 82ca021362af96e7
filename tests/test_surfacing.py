"""Surfacing: the BLINK loader and fixture, choice parsing, the scoring, and the organism's presence that the
answer never says (a probe on pooled values.0 reads it, the generated answer is at chance)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sightline.errors import UserError

pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    from sightline.data.blink import write_style_fixture

    return write_style_fixture(tmp_path_factory.mktemp("blink"), seed=3, n=8)


def test_fixture_round_trip(fixture_dir):
    """The fixture reads back as BLINK: three images, two choices, the answer letters and pixels as written."""
    from sightline.data.blink import load_blink, style_triples

    qs = load_blink(fixture_dir)
    assert list(qs) == ["Art_Style"]
    triples = style_triples(3, 8)
    assert len(qs["Art_Style"]) == 8
    for q, t in zip(qs["Art_Style"], triples):
        assert q.n_images == 3 and q.choices == ["the second image", "the third image"]
        assert q.answer == t["answer"]
        for got, want in zip(q.images(), t["images"]):
            assert np.array_equal(np.asarray(got), np.asarray(want))  # PNG: lossless
        assert t["styles"][0] == t["styles"][1 + t["answer"]] != t["styles"][2 - t["answer"]]
        assert q.prompt.endswith("(A) the second image\n(B) the third image")
    assert len(load_blink(fixture_dir, limit=3)["Art_Style"]) == 3


def test_loader_errors(tmp_path, fixture_dir):
    """A missing folder, a missing subtask, a damaged file and a file without BLINK's columns: one UserError line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sightline.data.blink import load_blink

    with pytest.raises(UserError, match="does not exist"):
        load_blink(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no BLINK parquet files for split 'val'"):
        load_blink(tmp_path)
    with pytest.raises(UserError, match="no BLINK subtask 'Counting'"):
        load_blink(fixture_dir, ["Counting"])
    (tmp_path / "Jigsaw").mkdir()
    pq.write_table(pa.table({"question": ["q"], "answer": ["(A)"]}), tmp_path / "Jigsaw" / "val-00000-of-00001.parquet")
    with pytest.raises(UserError, match="malformed BLINK parquet .*no column choices"):
        load_blink(tmp_path)
    (tmp_path / "Jigsaw" / "val-00000-of-00001.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="cannot read BLINK parquet"):
        load_blink(tmp_path)


@pytest.mark.parametrize("text,want", [
    ("(B)", 1), ("The answer is (A).", 0), ("B", 1), ("a. the second image", 0), ("B) third", 1),
    ("the third image", 1), ("I think the second image", 0), ("(C)", None), ("cross", None), ("", None),
    ("the second image or the third image", None), ("Both", None), ("a star", None)])
def test_parse_choice(text, want):
    """Letters in parentheses, a leading capital letter, else the one choice text contained; nothing else."""
    from sightline.data.blink import parse_choice

    assert parse_choice(text, ["the second image", "the third image"]) == want
    assert parse_choice("the red circle", ["circle", "red circle", "square"]) == 1  # the longer choice holds the shorter


def test_answer_index():
    """BLINK's answers "(A)".."(D)"; the test split's hidden answer is None."""
    from sightline.data.blink import answer_index

    assert [answer_index(a, 4) for a in ("(A)", "(d)", "B", "hidden", "", None, "(E)")] == [0, 3, 1, None, None, None, None]


def test_surface_and_similarity_brute_force():
    """`surface` against counting by hand; `similarity_choice` against sklearn's cosine similarity."""
    from sklearn.metrics.pairwise import cosine_similarity

    from sightline.kv.surfacing import similarity_choice, surface

    rng = np.random.default_rng(0)
    r, a = rng.random(500) < 0.7, rng.random(500) < 0.4
    s = surface(r, a)
    assert s["n"] == 500
    assert s["present_not_surfaced"] == sum(1 for x, y in zip(r, a) if x and not y) / 500
    assert s["surfaced_not_present"] == sum(1 for x, y in zip(r, a) if y and not x) / 500
    assert s["readout_accuracy"] == r.mean() and s["answer_accuracy"] == a.mean()
    for _ in range(50):
        x = rng.normal(size=(4, 7)) * rng.uniform(0.1, 10, size=(4, 1))
        assert similarity_choice(x[0], x[1:]) == int(np.argmax(cosine_similarity(x[:1], x[1:])[0]))


def test_question_labels_match_world_truth():
    """Every presence / count question of the world maps to a probe label whose truth is the question's answer."""
    from sightline.data.synthetic import WorldConfig, questions, render_scene
    from sightline.kv.surfacing import _answer_word, question_label, scene_labels

    n = 0
    for seed in range(40):
        scene = render_scene(seed, WorldConfig(image_size=112))
        labels = scene_labels(scene)
        for q in questions(scene, ("presence", "count")):
            kind, t = question_label(q.question)
            assert _answer_word(kind, int(labels[kind][t])) == q.answer, q.question
            n += 1
    assert n > 300
    with pytest.raises(ValueError):
        question_label("What shape is shown?")


class _StyleFeaturizer:
    """A stand-in for Featurizer whose feature is a texture statistic that tells the world's styles apart."""

    def __call__(self, images):
        import torch

        from sightline.perception.represent import ImageFeatures

        out = []
        for im in images:
            x = np.asarray(im, np.float32).mean(-1)
            dx, dy = np.abs(np.diff(x, axis=1)), np.abs(np.diff(x, axis=0))
            f = np.array([(dx > 0).mean(), (dy > 0).mean(), (dx > 20).mean(), (dy > 20).mean()], np.float32)
            out.append(ImageFeatures({"texture": torch.from_numpy(f)[None] - 0.3}, None, None))
        return out


def test_score_blink_on_fixture(organism, fixture_dir):
    """The organism answers the fixture's multiple-image prompt (its answers name no choice: all wrong and
    unparsed), a style-aware readout is right, so what it gets right is present and not surfaced."""
    from sightline.data.blink import load_blink
    from sightline.kv.surfacing import score_blink

    res = score_blink(organism, _StyleFeaturizer(), load_blink(fixture_dir), max_new_tokens=4)["Art_Style"]
    items = res["items"]
    assert res["n"] == 8 and res["chance"] == 0.5
    assert res["unparsed"] == sum(it["parsed"] is None for it in items)
    assert res["answer_accuracy"] == np.mean([it["parsed"] == it["answer"] for it in items])
    acc = np.mean([it["readout"]["texture"] == it["answer"] for it in items])
    assert acc >= 0.75  # the texture statistic is 8 of 8 on this fixture (seed 3)
    s = res["readout"]["texture"]
    assert s["readout_accuracy"] == acc
    assert s["present_not_surfaced"] == np.mean([it["readout"]["texture"] == it["answer"] and not it["answer_correct"]
                                                 for it in items])


def test_organism_presence_not_surfaced(organism):
    """The issue's validation: a probe on pooled values.0 answers "is there a <shape>?" on held-out scenes at
    >= 0.85 while the organism's own answer is at chance, so present-not-surfaced is large. Measured (train
    300, test 100 scenes, 200 questions), seeds 0-5: probe 0.915, 0.885, 0.925, 0.895, 0.875, 0.875; answer
    0.50-0.505; present-not-surfaced 0.425-0.48. Seed 0 is tested."""
    from sightline.kv.surfacing import organism_study
    from sightline.perception.represent import Featurizer, Rep

    fz = Featurizer(organism, [Rep("values", 0)], batch_size=32)
    r = organism_study(organism, fz, seed=0, train_scenes=300, test_scenes=100, kinds=("presence_shape",))
    k = r["kinds"]["presence_shape"]
    v = k["reps"]["values.0"]
    assert k["n"] == 200 and k["majority"] == 0.5  # yes/no pairs: balanced
    assert v["readout_accuracy"] >= 0.85
    assert abs(k["answer_accuracy"] - 0.5) <= 0.1
    assert v["present_not_surfaced"] >= 0.35
    star = r["concepts"]["presence_shape:star"]
    assert star["reps"]["values.0"] > star["majority"] + 0.1  # above always answering the majority
    json.dumps(r)  # results are JSON as they are


def test_run_surfacing_writes_run_folder(organism, tmp_path, fixture_dir):
    """The command's run folder: config, results, figures and page; --blink on a folder; errors as one line."""
    from sightline.kv.surfacing import SurfacingConfig, run_surfacing

    cfg = SurfacingConfig(blink=str(fixture_dir), reps=("values.0",), n=3, organism_questions=False,
                          out=str(tmp_path / "run"), progress=False)
    res = run_surfacing(cfg, adapter=organism)
    for f in ("config.json", "results.json", "index.html", "figures/blink_Art_Style.png"):
        assert (res.path / f).is_file(), f
    assert res["subtasks"]["Art_Style"]["n"] == 3 and res["subtasks"]["Art_Style"]["paper_not_surfaced"] == 0.333
    assert SurfacingConfig.from_dict(json.loads((res.path / "config.json").read_text())) == cfg
    with pytest.raises(UserError, match="not empty"):
        run_surfacing(cfg, adapter=organism)
    with pytest.raises(UserError, match="surfacing reads the language model"):
        run_surfacing(SurfacingConfig(reps=("vision",), out=str(tmp_path / "x")), adapter=organism)

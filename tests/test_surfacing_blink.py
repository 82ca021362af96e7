"""Surfacing on BLINK's other subtasks: the drawn points read back from the pixels, the matched readouts
(correspondence, multi-view) and the cross-fitted probe, on synthetic subtasks whose answers are known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sightline.errors import UserError

pytest.importorskip("pyarrow")


def test_markers_read_back_exactly():
    """Every ring of the correspondence fixture is found within 1.5 px of where it was drawn, with its label;
    red that is not a ring (a filled square, a red object) is no marker."""
    from PIL import Image, ImageDraw

    from sightline.data.blink import draw_marker, find_markers, marker_points
    from sightline.data.blink_fixture import correspondence_pairs

    for r in correspondence_pairs(seed=5, n=10):
        pts, why = marker_points(r["images"], 4)
        assert pts is not None, why
        assert np.hypot(*np.subtract(pts["ref"], r["points"]["ref"])) <= 1.5
        for got, want in zip(pts["choices"], r["points"]["choices"]):
            assert np.hypot(*np.subtract(got, want)) <= 1.5
    for size in range(10, 21, 2):  # the letters' topology holds at every label size
        im = Image.new("RGB", (200, 60), (90, 90, 90))
        for k, label in enumerate(("A", "B", "C", "D", "REF")):
            draw_marker(im, (12 + 38 * k, 40), label, font_size=size)
        assert [m.label for m in find_markers(im)] == ["A", "B", "C", "D", "REF"]
    im = Image.new("RGB", (100, 100), (200, 200, 200))
    ImageDraw.Draw(im).rectangle([10, 10, 30, 30], fill=(230, 20, 20))
    draw_marker(im, (60, 60), "B")
    assert [(m.label, m.xy) for m in find_markers(im)] == [("B", (60.0, 60.0))]
    assert marker_points([im], 4)[0] is None
    assert marker_points([im, im], 4) == (None, "no ring labelled A on image_2")


def test_points_sidecar(tmp_path):
    """Explicit points come from <split>-points.json beside the parquet; a malformed one is one error line."""
    from sightline.data.blink import load_blink
    from sightline.data.blink_fixture import correspondence_pairs, write_blink_fixture

    root = write_blink_fixture(tmp_path, seed=2, n=3, subtasks=("Visual_Correspondence",), points=True)
    qs = load_blink(root)["Visual_Correspondence"]
    for q, r in zip(qs, correspondence_pairs(seed=2, n=3, image_size=224)):
        assert q.points["ref"] == pytest.approx(r["points"]["ref"])
        assert np.allclose(q.points["choices"], r["points"]["choices"])
    side = root / "Visual_Correspondence" / "val-points.json"
    side.write_text(json.dumps({qs[0].id: {"ref": [1, 2], "choices": [[1, 2]]}}))
    with pytest.raises(UserError, match="1 choice points for 4 choices"):
        load_blink(root)
    side.write_text(json.dumps({qs[0].id: {"ref": "here"}}))
    with pytest.raises(UserError, match="is not"):
        load_blink(root)


def test_direction_rule():
    """Choices name a direction (clockwise = left); content moving left picks "left"; no motion abstains."""
    from sightline.kv.surfacing import direction, direction_choice

    assert [direction(c) for c in ("left", "Right", "clockwise", "counter-clockwise", "anticlockwise", "up")] == [
        "left", "right", "left", "right", "right", None]
    assert direction_choice(-0.1, ["left", "right"]) == 0 and direction_choice(0.2, ["left", "right"]) == 1
    assert direction_choice(0.2, ["right", "left"]) == 0
    assert direction_choice(0.0, ["left", "right"]) is None and direction_choice(-1, ["up", "down"]) is None


def test_cross_fit_never_scores_a_question_with_a_probe_that_saw_it(monkeypatch):
    """Folds are stratified and cover every question once; each question's score comes from a probe whose
    training rows do not include it; text labels when answers recur, else indices."""
    from sightline.data.blink import BlinkQuestion
    from sightline.kv import surfacing
    from sightline.probes.linear import LogisticProbe

    labels = np.array([0] * 13 + [1] * 9 + [2] * 4)
    folds = surfacing.cross_fit_folds(labels, 5, seed=1)
    assert sorted(np.bincount(folds)) == [5, 5, 5, 5, 6]
    for c in range(3):
        per = np.bincount(folds[labels == c], minlength=5)
        assert per.max() - per.min() <= 1
    seen: list[set] = []
    fit, proba = LogisticProbe.fit, LogisticProbe.predict_proba

    def spy_fit(self, X, y, *a, **k):
        self._ids = set(np.asarray(X)[0, :, 0].astype(int).tolist())
        seen.append(self._ids)
        return fit(self, X, y, *a, **k)

    def spy_proba(self, X):
        ids = set(np.asarray(X)[0, :, 0].astype(int).tolist())
        assert not ids & self._ids, "a question scored by a probe fitted on it"
        return proba(self, X)

    monkeypatch.setattr(LogisticProbe, "fit", spy_fit)
    monkeypatch.setattr(LogisticProbe, "predict_proba", spy_proba)
    rng = np.random.default_rng(0)
    x = np.concatenate([np.arange(26)[:, None], rng.normal(size=(26, 3)) + labels[:, None]], 1).astype(np.float32)
    choice, f = surfacing.probe_readout({"a": x}, labels, [[0, 1, 2]] * 26, k=5)
    assert len(seen) == 5 and all(len(s) == 26 - np.sum(f == i) for i, s in enumerate(seen))
    assert all(c in (0, 1, 2) for c in choice["a"])

    def q(choices, answer):
        return BlinkQuestion("q", "Counting", "How many?", choices, answer, "")

    mode, y, classes = surfacing.probe_labels([q(["1", "2"], 0), q(["2", "3", "1"], 2), q(["2", "1"], 0),
                                               q(["3", "2"], 1)])
    assert mode == "text" and y.tolist() == [0, 0, 1, 1] and classes[1] == [1, -1, 0]
    mode, y, _ = surfacing.probe_labels([q(["a", "b"], 0), q(["c", "d"], 1), q(["e", "f"], 1)])
    assert mode == "index" and y.tolist() == [0, 1, 1]
    entry: dict = {}  # 19 questions: too few for a probe, said instead of a number
    qs = [q(["1", "2"], i % 2) for i in range(19)]
    items = [{} for _ in qs]
    surfacing._probe_subtask(qs, items, [{"a": np.zeros((1, 3), np.float32)}] * 19, entry, 5, 0)
    assert entry["note"].startswith("too few questions for a probe: 19") and not any(items)


@pytest.fixture(scope="module")
def values0(organism):
    from sightline.perception.represent import Featurizer, Rep

    return Featurizer(organism, [Rep("values", 0)], batch_size=32)


def test_matched_readouts_on_organism(values0):
    """The organism's values.0 find the corresponding point (chance 0.25) and the direction the view moved
    (chance 0.5). Measured on 40 questions, seeds 0-3: correspondence 0.825, 0.775, 0.775, 0.8 (values.1-3
    0.85-0.975), multi-view 0.95, 0.875, 0.875, 0.9. Tested: 12 questions of each on seeds 0-2, pooled,
    correspondence >= 0.55, multi-view >= 0.7."""
    from sightline.data.blink_fixture import correspondence_pairs, view_pairs
    from sightline.kv.surfacing import (
        correspondence_choice,
        direction_choice,
        view_shift,
    )

    corr, view = [], []
    for seed in range(3):
        for r in correspondence_pairs(seed, 12):
            f = values0(r["images"])
            corr.append(correspondence_choice(f[0], r["points"]["ref"], f[1], r["points"]["choices"], "values.0")
                        == r["answer"])
        for r in view_pairs(seed, 12):
            f = values0(r["images"])
            view.append(direction_choice(view_shift(f[0], f[1], "values.0")[0], r["choices"]) == r["answer"])
    assert np.mean(corr) >= 0.55, np.mean(corr)
    assert np.mean(view) >= 0.7, np.mean(view)


def test_run_surfacing_every_subtask(organism, tmp_path):
    """`sightline surfacing --blink DIR` on the synthetic subtasks: every subtask found has results with its
    readout kind; the counting probe beats chance (values.0 on 24 questions, seeds 0-4: 0.625, 0.542, 0.542,
    0.625, 0.5; on 40: 0.55-0.675; tested: seed 0, >= 0.4 against chance 0.25); every probe item has its fold."""
    from sightline.data.blink_fixture import write_blink_fixture
    from sightline.kv.surfacing import SurfacingConfig, run_surfacing

    root = write_blink_fixture(tmp_path / "blink", seed=0, n=24)
    cfg = SurfacingConfig(blink=str(root), reps=("values.0",), organism_questions=False, max_new_tokens=3,
                          out=str(tmp_path / "run"), progress=False)
    res = run_surfacing(cfg, adapter=organism)
    want = {"Art_Style": "similarity", "Visual_Correspondence": "matched", "Multi-view_Reasoning": "matched",
            "Counting": "probe"}
    assert {k: v["readout_kind"] for k, v in res["subtasks"].items()} == want
    saved = json.loads((res.path / "results.json").read_text())
    for subtask, kind in want.items():
        e = saved["blink"][subtask]
        assert e["readout_kind"] == kind and len(e["items"]) == 24 and e["n_readout"] == 24, subtask
        assert (res.path / "figures" / f"blink_{subtask}.png").is_file()
        assert res["subtasks"][subtask]["chance"] == (0.25 if kind != "similarity" and subtask != "Multi-view_Reasoning"
                                                      else 0.5)
    count = saved["blink"]["Counting"]
    assert count["labels"] == "text" and {it["fold"] for it in count["items"]} == set(range(5))
    assert count["readout"]["values.0"]["readout_accuracy"] >= 0.4
    corr = saved["blink"]["Visual_Correspondence"]
    assert all(it["points"]["source"] == "markers" for it in corr["items"])
    page = (res.path / "index.html").read_text()
    assert "probe" in page and "matched" in page

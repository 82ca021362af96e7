"""The text-prefix study: per-image prefixes in the Featurizer (an empty prefix is no prefix, bit for bit), the paired
bootstrap against a brute-force reference, and a small run on the organism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sightline.errors import UserError


def _scene_images(n: int):
    from sightline.data.perception import load_task

    data = load_task("textseg", "synthetic", "", seed=0, limit=n, synthetic={"n": n})
    from sightline.perception.tasks import load_image

    return [load_image(u.image) for u in list(data.units)[:n]], [u.text for u in list(data.units)[:n]]


def test_empty_prefix_is_no_prefix_bit_for_bit(organism):
    """A call's per-image prefixes: "" and None give the no-prefix features exactly (image tokens and the text query);
    a real prefix changes later layers' values, and read in a mixed batch it gives what a featurizer with that prefix
    gives."""
    from sightline.perception.represent import Featurizer, Rep

    reps = [Rep("values", 0), Rep("values", 2), Rep("resid", 3)]
    images, texts = _scene_images(2)
    plain = Featurizer(organism, reps)(images, texts)
    empty = Featurizer(organism, reps)(images, texts, prefixes=["", None])
    for a, b in zip(plain, empty):
        for rep in a.feats:
            assert torch.equal(a.feats[rep], b.feats[rep])
            assert torch.equal(a.query[rep], b.query[rep])
    red = "A red square."
    alone = Featurizer(organism, reps, prefix=red, batch_size=1)(images[1:], texts[1:])[0]
    mixed = Featurizer(organism, reps, batch_size=1)(images, texts, prefixes=["", red])
    assert torch.equal(mixed[0].feats["values.2"], plain[0].feats["values.2"])
    assert torch.equal(mixed[1].feats["values.2"], alone.feats["values.2"])
    assert not torch.allclose(mixed[1].feats["values.2"], plain[1].feats["values.2"], atol=1e-4)
    with pytest.raises(ValueError):
        Featurizer(organism, reps)(images, texts, prefixes=[""])


def _brute_stat(records, counts) -> float:
    """Mean over groups of sum num / sum den, each unit's records repeated `counts[unit]` times (plain Python)."""
    num, den = {}, {}
    for unit, group, n, d in records:
        for _ in range(int(counts[unit])):
            num[group] = num.get(group, 0.0) + n
            den[group] = den.get(group, 0.0) + d
    return float(np.mean([num[g] / den[g] if den[g] > 0 else 1.0 for g in num]))


def test_paired_difference_matches_brute_force():
    """The paired interval is the percentile interval of (stat a - stat b) over resamples of the units, both read on
    the same resample: checked against a loop that repeats records; a constant per-unit shift gives a zero-width
    interval at the shift (unpaired it would not)."""
    from sightline.kv.prefix import paired_difference
    from sightline.perception.run import bootstrap_weights

    rng = np.random.default_rng(5)
    n = 9
    groups = ["cat", "dog", "cat", "owl", "dog", "cat", "owl", "owl", "dog"]
    den = rng.integers(20, 60, n).astype(float)
    a = [(u, groups[u], float(rng.integers(0, den[u])), den[u]) for u in range(n)]
    b = [(u, groups[u], float(rng.integers(0, den[u])), den[u]) for u in range(n)]
    diff, lo, hi = paired_difference(a, b, n, 300, seed=7)
    ones = np.ones(n)
    assert diff == pytest.approx(_brute_stat(a, ones) - _brute_stat(b, ones), abs=1e-12)
    ref = [_brute_stat(a, w) - _brute_stat(b, w) for chunk in bootstrap_weights(n, 300, 7) for w in chunk]
    assert len(ref) == 300
    assert (lo, hi) == pytest.approx(tuple(np.percentile(ref, [2.5, 97.5])), abs=1e-12)
    assert lo < diff < hi
    # a per-unit mean shifted by exactly 0.1 on every unit: the paired interval is [0.1, 0.1]
    x = rng.random(n)
    pa = [(u, "", x[u] + 0.1, 1.0) for u in range(n)]
    pb = [(u, "", x[u], 1.0) for u in range(n)]
    d, lo, hi = paired_difference(pa, pb, n, 200, seed=0)
    assert d == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    assert paired_difference(pa, pb, n, 0, seed=0)[1:] == (None, None)


def test_prefix_texts_and_errors():
    """Each kind's text for a unit; a kind the unit cannot give is None; bad kinds and templates are one-line errors."""
    from sightline.data.tasks import CoSegSet, SegSample
    from sightline.kv.prefix import TASK_PREFIX, PrefixConfig, parse_kinds, prefix_text

    cfg = PrefixConfig(template="a photo of {text}")
    ref = SegSample(id="r", image="x.png", mask="x.png", category="star", text="the red star")
    assert prefix_text("refseg", "none", ref, cfg) == ""
    assert prefix_text("refseg", "task", ref, cfg) == TASK_PREFIX["refseg"]
    assert prefix_text("refseg", "class", ref, cfg) == "a photo of star"
    assert prefix_text("refseg", "expression", ref, cfg) == "a photo of the red star"
    assert prefix_text("textseg", "expression", ref, cfg) is None
    cs = CoSegSet(name="set-1", samples=(SegSample(id="s", image="x.png", mask="x.png", category="circle"),))
    assert prefix_text("coseg", "class", cs, cfg) == "a photo of circle"
    assert parse_kinds(["class,neutral"]) == ("none", "neutral", "class")
    with pytest.raises(UserError, match="unknown prefix kind"):
        parse_kinds(["colour"])
    with pytest.raises(UserError, match="beside none"):
        parse_kinds(["none"])


def test_organism_prefix_run(organism, tmp_path):
    """Two tasks, a few units: the run folder and its keys; textseg skips the expression kind, refseg reads it; the
    layer-0 values of image tokens depend on their own token only, so no prefix changes their readout (exactly 0,
    interval [0, 0]), while later layers do change."""
    from sightline.kv.prefix import PrefixConfig, run_prefix

    out = tmp_path / "prefix"
    res = run_prefix(PrefixConfig(out=str(out), task="textseg,refseg", synthetic_units=5, layers="0,1,2",
                                  bootstrap=100, progress=False), adapter=organism)
    assert {p.name for p in out.iterdir()} == {"config.json", "results.json", "figures", "index.html"}
    assert {p.name for p in (out / "figures").iterdir()} == {"prefix_textseg.png", "prefix_refseg.png"}
    d = json.loads((out / "results.json").read_text())
    s = d["summary"]
    assert set(s["tasks"]) == {"textseg", "refseg"} and s["reps"] == ["values.0", "values.1", "values.2"]
    assert set(s["tasks"]["textseg"]["kinds"]) == {"neutral", "task", "class"}
    assert "expression" in s["tasks"]["textseg"]["skipped_kinds"]
    assert set(s["tasks"]["refseg"]["kinds"]) == {"neutral", "task", "class", "expression"}
    assert s["tasks"]["refseg"]["kinds"]["neutral"]["prefix_example"] == "Here is a picture."
    rows = d["rows"]
    assert set(rows[0]) == {"task", "kind", "rep", "rep_kind", "layer", "head", "metric", "primary", "value",
                            "none_value", "change", "ci_low", "ci_high", "excludes_zero"}
    primary = [r for r in rows if r["primary"]]
    assert len(primary) == 3 * 3 + 4 * 3  # kinds x reps per task
    for r in primary:
        assert r["value"] - r["none_value"] == pytest.approx(r["change"], abs=1e-12)
        assert r["ci_low"] <= r["change"] + 1e-12 and r["change"] <= r["ci_high"] + 1e-12
        if r["rep"] == "values.0":
            assert r["change"] == 0 and r["ci_low"] == 0 and r["ci_high"] == 0
    assert any(r["change"] != 0 for r in primary if r["layer"] > 0)
    assert res.summary["tasks"]["textseg"]["n_units"] == 5
    page = (out / "index.html").read_text()
    assert "prefix minus none" in page and "prefix_refseg.png" in page
    with pytest.raises(UserError, match="no prefix can change"):
        run_prefix(PrefixConfig(out=str(tmp_path / "v"), reps=("vision",), progress=False), adapter=organism)
    with pytest.raises(UserError, match="--template"):
        run_prefix(PrefixConfig(out=str(tmp_path / "t"), template="a photo", progress=False), adapter=organism)
    assert not (tmp_path / "v").exists() and not (tmp_path / "t").exists()

"""The perceive job on the model organism: rows for every rep x layer x KV head, the token-grid oracle above
every readout, one-line errors, text queries read at the right token, and features freed as units stream."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sightline.cli import main
from sightline.errors import UserError
from sightline.perception.represent import Featurizer, Rep, parse_reps
from sightline.perception.run import (METRICS, PRIMARY, PerceiveConfig, bootstrap_interval, primary_metric,
                                      run_perceive)
from sightline.perception.tasks import TASKS

TEXT = ("textseg", "refseg")


@pytest.fixture(scope="module")
def every_task(tmp_path_factory):
    """One small run of every task on the organism, control on (units too few to mean much: rows only)."""
    out = tmp_path_factory.mktemp("perceive") / "run"
    cfg = PerceiveConfig(out=str(out), synthetic_units=2, synthetic_frames=4, synthetic_set_size=3, layers="1,3",
                         vision_layers="3", control=True, bootstrap=50, progress=False)
    res = run_perceive(cfg)
    return res, json.loads((out / "results.json").read_text())


def test_rows_for_every_rep_layer_head(every_task, organism):
    res, results = every_task
    reps = parse_reps(("values", "keys", "resid", "projector", "vision", "encoder"), "1,3", "all",
                      n_layers=organism.n_layers, n_kv_heads=organism.n_kv_heads,
                      n_vision_layers=organism.n_vision_layers, vision_layers="3", encoder=True)
    # 2 layers x (concat + 2 KV heads) x {values, keys} + resid 1, 3 + projector + vision 3 + the organism's
    # stage-1 tower as the encoder
    assert len(reps) == 2 * 3 * 2 + 2 + 1 + 1 + 1
    assert res.summary["reps"] == [r.name for r in reps]
    rows = results["rows"]
    for task in TASKS:
        want = [r for r in reps if r.has_text_query] if task in TEXT else reps
        for kind in ("model", "control"):
            got = {(r["rep"], r["layer"], r["head"]) for r in rows
                   if r["task"] == task and r["kind"] == kind and r["metric"] == res.summary["tasks"][task]["primary_metric"]}
            # the control is the VLM with random weights: it has no external encoder
            expect = {(r.name, r.layer, r.head) for r in want if not (kind == "control" and r.kind == "encoder")}
            assert got == expect, (task, kind)
        for metric in METRICS[task]:
            assert any(r["task"] == task and r["metric"] == metric and r["kind"] == "model" for r in rows)
        s = res.summary["tasks"][task]
        assert s["n_units"] == 2 and s["too_small"]
        assert s["oracle"] is not None and s["chance"]
        if task in TEXT:
            assert "vision.3" in s["skipped_reps"]
        if task not in ("semcorr", "tempcorr"):
            assert s["per_rep"]["oracle"]["tokens"] >= s["per_rep"]["oracle"]["tokens_majority"] - 1e-9
    assert res.path.joinpath("index.html").is_file() and res.path.joinpath("config.json").is_file()
    assert not res.path.with_name(res.path.name + ".partial").exists()
    assert any("too" in w or "fewer" in w for w in res.summary["warnings"])


def test_oracle_at_least_every_rep(every_task):
    _, results = every_task
    rows = results["rows"]
    for task in TASKS:
        primary = results["summary"]["tasks"][task]["primary_metric"]
        oracle = next(r["value"] for r in rows if r["task"] == task and r["kind"] == "oracle" and r["rep"] == "tokens"
                      and r["metric"] == primary)
        for r in rows:
            if r["task"] == task and r["kind"] in ("model", "control") and r["metric"] == primary:
                assert r["value"] <= oracle + 1e-9, (task, r["rep"], r["value"], oracle)


def test_primary_metric_of_semcorr_depends_on_the_data():
    assert primary_metric("semcorr", "spair") == PRIMARY["semcorr"] == "pck_bbox"
    assert primary_metric("semcorr", "synthetic") == "pck_img"
    assert all(primary_metric(t, f) == PRIMARY[t] for t in TASKS if t != "semcorr" for f in ("synthetic", None))


def test_bootstrap_interval_brackets_and_is_seeded():
    rng = np.random.default_rng(0)
    ious = rng.uniform(0, 1, 40)
    records = [(i, "", v, 1.0) for i, v in enumerate(ious)]
    lo, hi = bootstrap_interval(records, 40, 500, seed=3)
    assert lo < ious.mean() < hi
    assert (lo, hi) == bootstrap_interval(records, 40, 500, seed=3)
    # a grouped ratio (mIoU): per category sum of intersections / sum of unions, the mean over categories
    recs = [(0, "a", 1, 2), (1, "a", 3, 4), (2, "b", 0, 5)]
    from sightline.perception.run import _stat

    assert _stat(recs) == pytest.approx(((1 + 3) / (2 + 4) + 0) / 2)


def test_parse_reps_errors_and_names():
    kw = dict(n_layers=4, n_kv_heads=2, n_vision_layers=3)
    assert [r.name for r in parse_reps(["values.2.h1", "projector"], "all", "all", **kw)] == ["values.2.h1", "projector"]
    assert [r.name for r in parse_reps(["keys"], "1", "concat", **kw)] == ["keys.1"]
    assert [r.name for r in parse_reps(["values"], "0", "each", **kw)] == ["values.0.h0", "values.0.h1"]
    assert Rep.parse("resid.4").layer == 4 and Rep.parse("values.3.h1").head == 1
    for bad, kws in ((["valuez"], {}), (["values"], {"layers": "9"}), (["values.2.h5"], {}), (["vision.9"], {}),
                     (["resid.2.h0"], {}), (["encoder"], {})):
        with pytest.raises(UserError) as e:
            parse_reps(bad, kws.get("layers", "all"), "all", **kw)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("args, needle", [
    (["--reps", "valuez"], "valuez"),
    (["--layers", "9"], "out of range"),
    (["--heads", "7"], "KV head"),
    (["--task", "fgseg", "--format", "davis", "--data", "."], "does not serve"),
    (["--task", "segment"], "segment"),
    (["--format", "spair", "--task", "semcorr"], "--data"),
])
def test_cli_one_line_errors(tmp_path, capsys, args, needle):
    code = main(["perceive", "--out", str(tmp_path / "o"), "--no-progress", "--synthetic-units", "1", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


def test_query_is_the_texts_last_token(organism):
    """resid.0 / projector at the query is the input embedding of the text's last token ("star")."""
    from PIL import Image

    reps = [Rep("resid", 0), Rep("projector"), Rep("values", 1, 0)]
    image = Image.fromarray(np.full((112, 112, 3), 90, np.uint8))
    f = Featurizer(organism, reps)(
        [image], ["red star"])[0]
    star = organism.tokenizer("red star", add_special_tokens=False)["input_ids"][-1]
    emb = organism.model.get_input_embeddings().weight[star].float()
    torch.testing.assert_close(f.query["resid.0"], emb)
    torch.testing.assert_close(f.query["projector"], emb)
    assert f.feats["values.1.h0"].shape == (64, organism.head_dim) and f.query["values.1.h0"].shape == (32,)
    alone = Featurizer(organism, reps, query_alone=True)([image], ["red star"])[0]
    torch.testing.assert_close(alone.query["resid.0"], emb)  # same token, no image before it
    assert not torch.allclose(alone.query["values.1.h0"], f.query["values.1.h0"])  # the image changes the value


def test_features_are_freed_as_units_stream(tmp_path, monkeypatch):
    """At most one unit's images hold features at any time, however many units run."""
    from sightline.perception import represent

    seen = []
    real = Featurizer.__call__

    def spy(self, images, texts=None):
        seen.append(len(represent.LIVE))  # features alive when the next images are read
        out = real(self, images, texts)
        seen.append(len(represent.LIVE))
        return out

    monkeypatch.setattr(Featurizer, "__call__", spy)
    cfg = PerceiveConfig(task="fgseg", out=str(tmp_path / "o"), synthetic_units=5, control=False,
                         reps=("values",), layers="1", heads="concat", bootstrap=0, progress=False)
    run_perceive(cfg)
    assert len(seen) == 2 * 5
    assert max(seen[0::2]) == 0  # nothing left over from the previous episode
    assert max(seen[1::2]) == 6  # 5 supports + the query

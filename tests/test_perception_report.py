"""The perception report: Figure 2, head heatmaps and qualitative overlays written from plain dicts, the page's
findings and per-task sections, the example collector, and perceive-compare's correlations (against scipy) and
its one-line errors."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from sightline.cli import main
from sightline.errors import UserError
from sightline.perception.compare import PerceiveCompareConfig, compare_perception, permutation_p, rankdata
from sightline.perception.examples import ExampleCollector, default_example_rep
from sightline.report.perception import findings, head_grid, layer_series, write_perceive_page

N_LAYERS, N_HEADS = 4, 2
PEAK = 2  # the layer where the hand-made values peak


def _row(task, rep, kind, layer, head, metric, value, ci=None):
    return {"task": task, "rep": rep, "kind": kind, "layer": layer, "head": head, "metric": metric, "value": value,
            "ci_low": None if ci is None else value - ci, "ci_high": None if ci is None else value + ci}


def _task(task: str, metric: str, n_units: int, projector: float, offset: float = 0.0):
    """Rows and summary of one task: values peak at layer PEAK (head h0 there the best of all)."""
    rows = []
    vals = {}
    for layer in range(N_LAYERS):
        base = 0.3 + 0.1 * (PEAK - abs(layer - PEAK)) + offset
        vals[layer] = base
        rows.append(_row(task, f"values.{layer}", "model", layer, None, metric, base, 0.05))
        rows.append(_row(task, f"keys.{layer}", "model", layer, None, metric, base - 0.1, 0.05))
        for h in range(N_HEADS):
            rows.append(_row(task, f"values.{layer}.h{h}", "model", layer, h, metric, base - 0.02 * (h + 1)))
            rows.append(_row(task, f"keys.{layer}.h{h}", "model", layer, h, metric, base - 0.1 - 0.01 * h))
        rows.append(_row(task, f"values.{layer}", "control", layer, None, metric, 0.15, 0.03))
    for layer in range(N_LAYERS + 1):
        rows.append(_row(task, f"resid.{layer}", "model", layer, None, metric, 0.25 + 0.02 * layer, 0.04))
    for layer in range(3):
        rows.append(_row(task, f"vision.{layer}", "model", layer, None, metric, 0.2 + 0.05 * layer, 0.04))
    rows += [_row(task, "projector", "model", None, None, metric, projector, 0.04),
             _row(task, "tokens", "oracle", None, None, metric, 0.9), _row(task, "all_foreground", "chance", None, None,
                                                                            metric, 0.1, 0.02)]
    best = vals[PEAK]
    summary = {"primary_metric": metric, "metrics": [metric], "n_units": n_units, "too_small": n_units < 20,
               "best": {"rep": f"values.{PEAK}", "value": best, "ci": [best - 0.05, best + 0.05]},
               "best_values": {"rep": f"values.{PEAK}", "value": best, "ci": [best - 0.05, best + 0.05]},
               "projector": projector, "encoder": None, "lm_gain": best - projector, "oracle": 0.9,
               "control_best_values": {"rep": "values.0", "value": 0.15, "ci": [0.12, 0.18]},
               "chance": {"all_foreground": 0.1}, "read": "a readout", "source": "hand-made", "skipped_reps": {}}
    return rows, summary


def _examples(rng):
    def img():
        return rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)

    gt = np.zeros((40, 48), np.uint8)
    gt[10:30, 10:30] = 1
    seg = {"rep": "values.2", "units": [{"caption": "the red square on the left", "images": [img()], "gt": [gt],
                                         "preds": {"values.2": [gt.astype(bool)], "oracle": [gt.astype(bool)]},
                                         "iou": {"values.2": [1.0], "oracle": [1.0]}}]}
    corr = {"rep": "values.2", "units": [{"caption": "heart", "source": img(), "target": img(),
                                          "source_xy": [[5, 5], [20, 20]], "target_xy": [[6, 6], [30, 30]],
                                          "preds": {"values.2": np.array([[6, 6], [np.nan, np.nan]])},
                                          "correct": {"values.2": [True, False]}}]}
    clip = {"rep": "values.2", "units": [{"caption": "clip0000", "frames": {"t": [0, 1, 2], "images": [img()] * 3},
                                          "first_labels": gt, "gt": [gt, gt], "preds": {"values.2": [gt, gt],
                                                                                        "oracle": [gt, gt]}}]}
    return {"fgseg": seg, "semcorr": corr, "tempcorr": clip}


@pytest.fixture(scope="module")
def hand_made():
    rows, tasks = [], {}
    for task, metric, n, proj in (("fgseg", "miou", 30, 0.2), ("semcorr", "pck_bbox", 5, 0.6),
                                  ("tempcorr", "J&F-Mean", 30, 0.3)):
        r, s = _task(task, metric, n, proj)
        rows += r
        tasks[task] = s
    summary = {"model": {"name": "tiny", "n_layers": N_LAYERS}, "tasks": tasks, "control": True,
               "skipped_reps": {"encoder": "no encoder"}, "warnings": ["semcorr: only 5 units"]}
    return summary, rows


def test_figures_and_page_from_plain_dicts(hand_made, tmp_path):
    summary, rows = hand_made
    (tmp_path / "figures").mkdir()
    page = write_perceive_page(tmp_path, summary, rows, _examples(np.random.default_rng(0))).read_text()
    for task in summary["tasks"]:
        for kind in ("layers", "heads", "examples"):
            png = tmp_path / "figures" / f"{task}_{kind}.png"
            with Image.open(png) as im:
                assert im.width > 300 and im.height > 150, png
            assert f"figures/{task}_{kind}.png" in page
        assert f"id='{task}'" in page
    # the findings come first, then warnings, then the tasks in order
    pos = [page.index(f"id='{a}'") for a in ("findings", "warnings", "fgseg", "semcorr", "tempcorr")]
    assert pos == sorted(pos)
    assert f"peaks at layer {PEAK} on every task" in page
    # the gain is positive on fgseg and tempcorr, negative on semcorr (projector 0.6 above the best values 0.5)
    assert "improves on its input (best values layer minus projector) on 2 of 3 tasks" in page
    assert "semcorr (PCK@α (target box), 5 units)" in page and "too few units to mean much" in page
    assert "No external encoder was read (no encoder)" in page


def test_findings_follow_the_numbers(hand_made):
    summary, rows = hand_made
    para, per_task = findings(summary, rows)
    assert "stays below the model's on 3 of 3 tasks" in para
    assert "semcorr had too few units" in para
    assert per_task[0].startswith("fgseg (mIoU, 30 units): best values values.2 0.500 [0.450, 0.550]; projector 0.200 "
                                  "(language-model gain +0.300)")


def test_layer_series_and_head_grid_read_the_rows(hand_made):
    _, rows = hand_made
    fg = [r for r in rows if r["task"] == "fgseg"]
    x, y, lo, hi = layer_series(fg, "model", "values")
    assert list(x) == list(range(N_LAYERS)) and int(x[np.argmax(y)]) == PEAK
    np.testing.assert_allclose(hi - lo, 0.1)
    layers, heads, grid = head_grid(fg, "values")
    assert layers == list(range(N_LAYERS)) and heads == [0, 1] and grid.shape == (N_LAYERS, N_HEADS + 1)
    want = {(r["layer"], N_HEADS if r["head"] is None else r["head"]): r["value"] for r in fg
            if r["kind"] == "model" and r["rep"].startswith("values.")}
    for (i, j), v in want.items():
        assert grid[i, j] == v


def test_example_collector_keeps_only_its_units_and_reps():
    rng = np.random.default_rng(1)
    c = ExampleCollector("fgseg", "values.2", n=2, max_side=32)
    gt = np.zeros((64, 80), np.uint8)
    gt[8:40, 8:40] = 1
    gt[0, :] = 255
    pred = np.zeros((64, 80), bool)
    pred[16:48, 16:48] = True
    for unit in range(3):
        c.images(unit, [Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))], "cat")
        for kind, rep in (("model", "values.2"), ("model", "keys.2"), ("control", "values.2"), ("oracle", "tokens"),
                          ("oracle", "tokens_majority")):
            c.seg(kind, rep, unit, pred, gt)
    d = c.to_dict()
    assert len(d["units"]) == 2
    u = d["units"][0]
    assert set(u["preds"]) == {"values.2", "oracle"}
    assert u["images"][0].shape == (26, 32, 3) and u["preds"]["oracle"][0].shape == (26, 32)
    valid = gt != 255
    inter = np.count_nonzero(pred & (gt == 1) & valid)
    assert u["iou"]["values.2"][0] == pytest.approx(inter / np.count_nonzero((pred | (gt == 1)) & valid))
    # correspondences: correct = within the threshold of the true point, in original pixels
    c = ExampleCollector("semcorr", "values.2", n=1, max_side=40)
    im = Image.new("RGB", (80, 60))
    c.pair(0, im, im, np.array([[10.0, 10.0], [20, 20]]), np.array([[30.0, 30.0], [50, 40]]), threshold=8.0)
    c.points("model", "values.2", 0, np.array([[35.0, 34.0], [np.nan, np.nan]]))
    u = c.to_dict()["units"][0]
    assert u["correct"]["values.2"] == [True, False]
    np.testing.assert_allclose(u["preds"]["values.2"][0], [17.5, 17.0])
    assert ExampleCollector("tempcorr", None, 1, max_frames=4).frames_shown(20) == [0, 1, 7, 13, 19]
    assert default_example_rep(["values.1", "values.1.h0", "values.3", "keys.2"], n_layers=6) == "values.3"
    assert default_example_rep(["values.0", "values.1"], n_layers=8) == "values.1"


def test_run_draws_the_examples_and_checks_example_rep(tmp_path):
    from sightline.perception.run import PerceiveConfig, run_perceive

    kw = dict(task="fgseg", synthetic_units=1, shots=2, layers="1,2", heads="concat", reps=("values", "projector"),
              control=False, bootstrap=0, progress=False)
    res = run_perceive(PerceiveConfig(out=str(tmp_path / "a"), **kw))
    page = res.html.read_text()
    assert (res.path / "figures" / "fgseg_examples.png").is_file()
    assert (res.path / "figures" / "fgseg_layers.png").is_file()
    assert not (res.path / "figures" / "fgseg_heads.png").exists()  # no single heads read
    assert "read from values.2 beside the token-grid oracle" in page  # the middle of the organism's 4 layers
    with pytest.raises(UserError, match=r"--example-rep values.3 is not among"):
        run_perceive(PerceiveConfig(out=str(tmp_path / "b"), example_rep="values.3", **kw))
    assert not (tmp_path / "b").exists()


# ============================================================================= perceive-compare
GAINS = {"fgseg": [0.10, 0.25, 0.05, 0.30], "semcorr": [0.02, -0.01, 0.04, 0.08]}
SCORES = [55.0, 61.5, 52.0, 61.5]  # a tie, for Spearman's average ranks


def _fake_runs(root, gains=GAINS, n=4):
    paths = []
    for i in range(n):
        tasks = {t: {"primary_metric": "miou", "lm_gain": g[i], "projector": 0.5, "n_units": 50, "too_small": False,
                     "best_values": {"rep": "values.3", "value": None if g[i] is None else 0.5 + g[i]},
                     "source": "hand-made"}
                 for t, g in gains.items()}
        p = root / f"run{i}"
        p.mkdir()
        (p / "results.json").write_text(json.dumps({"summary": {"model": {"name": f"org/model-{i}"}, "tasks": tasks},
                                                    "rows": []}))
        paths.append(str(p))
    return paths


def test_compare_correlations_equal_scipy(tmp_path):
    from scipy import stats

    runs = _fake_runs(tmp_path)
    res = compare_perception(PerceiveCompareConfig(runs=tuple(runs), scores=tuple(SCORES), out=str(tmp_path / "cmp"),
                                                   score_name="benchmark average"))
    out = res.path
    for name in ("config.json", "results.json", "index.html", "figures/gain_vs_score_fgseg.png",
                 "figures/gain_vs_score_semcorr.png", "figures/gain_vs_score_mean.png"):
        assert (out / name).is_file(), name
    assert res["models"] == [f"model-{i}" for i in range(4)]
    for task, gains in [*GAINS.items(), ("mean", list(np.mean([GAINS["fgseg"], GAINS["semcorr"]], axis=0)))]:
        c = res["tasks"][task]
        assert c["n"] == 4
        assert c["pearson_r"] == pytest.approx(stats.pearsonr(SCORES, gains)[0], abs=1e-12)
        assert c["spearman_rho"] == pytest.approx(stats.spearmanr(SCORES, gains)[0], abs=1e-12)
        for rank, key in ((False, "pearson_p"), (True, "spearman_p")):
            x0, y0 = (stats.rankdata(SCORES), stats.rankdata(gains)) if rank else (np.asarray(SCORES), np.asarray(gains))
            ref = stats.permutation_test((x0,), lambda x, y0=y0: abs(stats.pearsonr(x, y0)[0]),
                                         permutation_type="pairings", alternative="greater", n_resamples=np.inf)
            assert c[key] == pytest.approx(ref.pvalue, abs=1e-12)
    assert any("only 4 models" in w for w in res["warnings"])
    assert "only 4 models" in (out / "index.html").read_text()
    full = json.loads((out / "results.json").read_text())
    assert full["models"][1]["tasks"]["fgseg"]["lm_gain"] == GAINS["fgseg"][1]


def test_rank_and_permutation_p_edge_cases():
    from scipy import stats

    x = np.array([3.0, 1.0, 3.0, 2.0, 3.0])
    np.testing.assert_array_equal(rankdata(x), stats.rankdata(x))
    p, why = permutation_p([1.0, 2.0], [3.0, 4.0])
    assert p is None and "2 models" in why
    p, _ = permutation_p([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert p == pytest.approx(2 / 6)  # the two orderings with |r| = 1 of the 3! orderings
    # above 8 models: random orderings, seeded, agreeing with the exact value within Monte Carlo error
    rng = np.random.default_rng(0)
    xs, ys = rng.normal(size=9), rng.normal(size=9)
    p1, how = permutation_p(xs, ys, n_perm=4000, seed=1)
    assert "4000 random" in how and p1 == permutation_p(xs, ys, n_perm=4000, seed=1)[0]
    perms = np.array(list(itertools.permutations(range(9))))  # all 9! orderings, brute force
    xc, yc = xs[perms] - xs.mean(), ys - ys.mean()
    r = xc @ yc / np.sqrt((xc[0] ** 2).sum() * (yc ** 2).sum())
    ref = np.mean(np.abs(r) >= abs(np.corrcoef(xs, ys)[0, 1]) - 1e-12)
    assert abs(p1 - ref) < 0.03


def test_compare_leaves_out_a_model_without_a_gain(tmp_path):
    gains = {"fgseg": [0.1, 0.2, None, 0.4]}
    runs = _fake_runs(tmp_path, gains)
    res = compare_perception(PerceiveCompareConfig(runs=tuple(runs), scores=(1.0, 2.0, 3.0, 5.0),
                                                   out=str(tmp_path / "cmp")))
    c = res["tasks"]["fgseg"]
    assert c["n"] == 3 and "left out model-2" in c["note"]
    assert c["pearson_r"] == pytest.approx(np.corrcoef([1.0, 2.0, 5.0], [0.1, 0.2, 0.4])[0, 1])


@pytest.mark.parametrize("case, message", [
    ("count", r"--scores gives 3 numbers for 4 --runs"),
    ("one", r"--runs needs two or more run folders"),
    ("no_results", r"has no results.json"),
    ("not_perceive", r"is not a perceive run's results"),
    ("missing", r"does not exist"),
    ("task", r"task coseg was not scored by run model-0"),
    ("names", r"--names gives 2 labels for 4 --runs"),
])
def test_compare_errors_are_one_line(tmp_path, capsys, case, message):
    runs = _fake_runs(tmp_path)
    scores = ",".join(str(s) for s in SCORES)
    extra: list[str] = []
    if case == "count":
        scores = "1,2,3"
    elif case == "one":
        runs, scores = runs[:1], "1"
    elif case == "no_results":
        (tmp_path / "run2" / "results.json").unlink()
    elif case == "not_perceive":
        (tmp_path / "run2" / "results.json").write_text(json.dumps({"summary": {"best_site": 1}}))
    elif case == "missing":
        runs[3] = str(tmp_path / "nowhere")
    elif case == "task":
        extra = ["--task", "fgseg,coseg"]
    elif case == "names":
        extra = ["--names", "a,b"]
    out = tmp_path / "cmp"
    rc = main(["perceive-compare", "--runs", ",".join(runs), "--scores", scores, "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("sightline: error:")
    assert re.search(message, err), err
    assert not out.exists() and not out.with_name("cmp.partial").exists()


def test_compare_cli_prints_the_correlations(tmp_path, capsys):
    runs = _fake_runs(tmp_path)
    rc = main(["perceive-compare", "--runs", ",".join(runs), "--scores", ",".join(map(str, SCORES)), "--out",
               str(tmp_path / "cmp")])
    text = capsys.readouterr()
    assert rc == 0 and "fgseg r=" in text.out and "(n=4" in text.out
    assert "sightline: warning: only 4 models" in text.err
    assert math.isfinite(json.loads((tmp_path / "cmp" / "results.json").read_text())["summary"]["tasks"]["fgseg"]
                         ["pearson_r"])

"""`sightline keys` / run_keys on the organism: the run folder, the unblocked answers equal the organism's own eval,
the block set and its random control, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sightline.cli import main
from sightline.errors import UserError
from sightline.kv.run import KeysConfig, run_keys


@pytest.fixture(scope="module")
def run(organism, tmp_path_factory):
    out = tmp_path_factory.mktemp("keys") / "run"
    cfg = KeysConfig(out=str(out), n_images=12, block_top_k=3, block_layers="2-3", eval_scenes=3, readout_scenes=8,
                     progress=False)
    return cfg, run_keys(cfg, adapter=organism)


def test_run_folder_and_summary(run):
    cfg, res = run
    for f in ("config.json", "results.json", "index.html", "figures/flagged_share.png", "figures/key_pca.png",
              "figures/var_ratio_grid_keys.png", "figures/var_ratio_grid_keys_prerope.png",
              "figures/accuracy_blocked.png", "figures/readout_blocked.png"):
        assert (res.path / f).exists(), f
    assert KeysConfig.from_dict(json.loads((res.path / "config.json").read_text())) == cfg
    s = res.summary
    assert s["n_keys"] == 4 * 2 * 64 and s["n_blocked"] == 2 * 2 * 3 and s["block_layers"] == [2, 3]
    r = res.results
    assert set(r["block"]) == set(r["control"]) == {"2.0", "2.1", "3.0", "3.1"}
    vr = np.asarray(r["stats"]["keys"]["var_ratio"])
    for lh, idx in r["block"].items():  # the k lowest var_ratio keys, and the control avoids them
        L, h = map(int, lh.split("."))
        assert set(idx) == set(np.argsort(vr[L, h])[:3])
        assert len(r["control"][lh]) == 3 and not set(idx) & set(r["control"][lh])
    assert set(s["foreground_iou"]) == {"none", "agnostic", "random"}
    # keys blocked at layer 2 cannot reach values.0-2: the readout there is the unblocked one
    for L in ("0", "1", "2"):
        assert s["foreground_iou"]["agnostic"][L] == s["foreground_iou"]["none"][L]


def test_unblocked_answers_equal_the_organism_eval(run, organism):
    from sightline.organism.evaluate import evaluate

    cfg, res = run
    ref = evaluate(organism, seed=cfg.eval_seed, n=cfg.eval_scenes, progress=False)["accuracy"]
    got = res.summary["accuracy"]["none"]
    assert {t: round(v, 4) for t, v in got.items() if t != "all"} == ref


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["keys", "--out", str(tmp_path / "o"), "--n-images", "1"]) == 2
    err = capsys.readouterr().err
    assert "--n-images must be at least 2" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UserError, match="block-kind"):
        run_keys(KeysConfig(out=str(tmp_path / "o"), block_kind="values"))

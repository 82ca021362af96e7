"""The organism's perception figures mean something: seeded runs of every task on the value reps, with the
random-weight control, asserting (a) foreground segmentation from the best value layer reaches 0.7 of the token-grid
oracle, (b) each task's best value layer beats the control's best value layer by a margin, (c) the token-grid oracle
is above every rep. Bounds were fixed from runs over world seeds 0-5 (figures in the comments; `python
tests/test_perception_validation.py SEED` prints them); the runs here are seed 0. Also DINO's label decoding
against F.interpolate + norm_mask."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sightline.perception.run import PerceiveConfig, _decode_labels, run_perceive
from sightline.perception.tasks import TASKS

UNITS = 20  # per task (the default run's count; at min_units)
FGSEG_EPISODES = 100  # the oracle share: 20 episodes (4 per shape) put it anywhere in 0.65-0.83 over seeds 0-4
SEMCORR_PAIRS = 60  # ~240 keypoints: at 20 pairs the margin over the control ranged +0.04..+0.17 over seeds 0-4


def _runs(out, seed: int = 0) -> dict[str, dict]:
    """task -> summary: the organism on synthetic data, value reps (all layers, concat and every KV head); coseg,
    textseg, refseg, tempcorr at UNITS units with the control; fgseg at FGSEG_EPISODES episodes without it (the
    oracle share) and at UNITS with it (the margin, in "fgseg_control"); semcorr at SEMCORR_PAIRS with it."""
    common = dict(reps=("values",), seed=seed, bootstrap=0, progress=False, n_examples=0, overwrite=True)
    main = run_perceive(PerceiveConfig(out=str(out / "main"), task="fgseg,coseg,textseg,refseg,tempcorr",
                                       synthetic_units=UNITS, control=True, **common)).summary["tasks"]
    fg = run_perceive(PerceiveConfig(out=str(out / "fgseg"), task="fgseg", synthetic_units=FGSEG_EPISODES,
                                     control=False, **common)).summary["tasks"]["fgseg"]
    sc = run_perceive(PerceiveConfig(out=str(out / "semcorr"), task="semcorr", synthetic_units=SEMCORR_PAIRS,
                                     control=True, **common)).summary["tasks"]["semcorr"]
    return {**main, "fgseg_control": main["fgseg"], "fgseg": fg, "semcorr": sc}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return _runs(tmp_path_factory.mktemp("validation"))


def test_dino_decoding_equals_bilinear_interpolation_and_norm_mask():
    """tempcorr's decoding of soft token labels on a uniform 8 x 8 grid of 14-px tokens equals DINO's
    F.interpolate(scale_factor=14, bilinear, align_corners=False) + norm_mask + argmax, pixel for pixel."""
    from sightline.models.layout import ViewGrid
    from sightline.perception.readouts import norm_mask

    class Layout:
        def __init__(self, g):
            self.g = g

        def grid(self, image=0, view=0):
            return self.g

    layout = Layout(ViewGrid(0, 0, 8, 8, (112, 112), (0.0, 0.0), (14.0, 14.0)))
    rng = np.random.default_rng(0)
    soft = rng.random((3, 8, 8, 4))
    soft[..., 3] *= 0.1  # a faint label: norm_mask lifts it
    soft[2, ..., 1] = 0  # an absent label stays 0
    got = _decode_labels(layout, 0, soft, nearest=False)
    for t in range(3):
        x = torch.from_numpy(soft[t]).permute(2, 0, 1)[None].float()
        up = F.interpolate(x, scale_factor=14, mode="bilinear", align_corners=False, recompute_scale_factor=False)[0]
        np.testing.assert_array_equal(got[t], norm_mask(up).argmax(0).numpy())
    assert (got == 3).any()  # the faint label wins where it is relatively strongest
    near = _decode_labels(layout, 0, soft, nearest=True)
    np.testing.assert_array_equal(near[0], np.kron(soft[0].argmax(-1), np.ones((14, 14), int)))


# fgseg: best value rep's mIoU over the token-grid oracle's ("ground truth moved onto tokens and back": tokens
# foreground at >= token_fraction, painted back), 100 episodes, seeds 0..5:
#   0.743, 0.753, 0.641, 0.804, 0.769, 0.758 (mean 0.745)
# The lowest seed misses 0.7; seed 0, run here, clears it by 0.04, far beyond what a CPU's float rounding moves.
FGSEG_ORACLE_SHARE = 0.7


def test_fgseg_best_value_layer_reaches_a_share_of_the_token_grid_oracle(tasks):
    s = tasks["fgseg"]
    assert s["best_values"]["value"] >= FGSEG_ORACLE_SHARE * s["oracle_majority"], s["best_values"]
    assert s["oracle_majority"] <= s["oracle"] + 1e-9  # the best-threshold oracle is the ceiling


# best value layer minus the control's best value layer, primary metric, seeds 0 / 1 / 2 (the __main__ below):
MARGINS = {
    "fgseg_control": 0.10,  # +0.165, +0.199, +0.187 (mIoU, 20 episodes)
    "coseg": 0.08,          # +0.147, +0.195, +0.187 (Jaccard)
    "textseg": 0.12,        # +0.227, +0.213, +0.238 (mIoU)
    "refseg": 0.03,         # +0.075, +0.062, +0.061 (mean image IoU)
    "semcorr": 0.07,        # +0.136, +0.170, +0.140 (PCK@0.1 of the image, 60 pairs)
    "tempcorr": 0.0,        # +0.037, +0.018, +0.057 (J&F): random features track coloured shapes nearly as well
}


@pytest.mark.parametrize("task", sorted(MARGINS))
def test_best_value_layer_beats_the_random_weight_control(tasks, task):
    s = tasks[task]
    assert s["best_values"]["value"] > s["control_best_values"]["value"] + MARGINS[task], (
        s["best_values"], s["control_best_values"])


def test_semcorr_on_synthetic_goes_by_pck_of_the_image(tasks):
    assert tasks["semcorr"]["primary_metric"] == "pck_img"
    assert tasks["semcorr"]["oracle"] == 1.0  # the centre of the true token is always within 11 px


def test_token_grid_oracle_is_above_every_rep(tasks):
    for task in (*TASKS, "fgseg_control"):
        s = tasks[task]
        for kind in ("model", "control"):
            for rep, v in s["per_rep"].get(kind, {}).items():
                assert v <= s["oracle"] + 1e-9, (task, kind, rep, v, s["oracle"])


if __name__ == "__main__":  # the figures behind the bounds: python tests/test_perception_validation.py SEED
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        got = _runs(Path(d), int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    fg = got["fgseg"]
    print(f"fgseg oracle share {fg['best_values']['value'] / fg['oracle_majority']:.3f} "
          f"({fg['best_values']['rep']} {fg['best_values']['value']:.3f}, oracle {fg['oracle_majority']:.3f})")
    for task in ("fgseg_control", "coseg", "textseg", "refseg", "semcorr", "tempcorr"):
        s = got[task]
        print(f"{task} margin {s['best_values']['value'] - s['control_best_values']['value']:+.3f} "
              f"({s['best_values']['rep']} {s['best_values']['value']:.3f} vs control "
              f"{s['control_best_values']['rep']} {s['control_best_values']['value']:.3f}; {s['primary_metric']})")

"""The organism's perception figures mean something: one seeded run of every task on the value reps, with the
random-weight control, asserting (a) foreground segmentation from the best value layer reaches a share of the
token-grid oracle, (b) each task's best value layer beats the control's best value layer by a margin, (c) the
token-grid oracle is above every rep. Bounds were fixed from runs over world seeds 0-2 (ranges in the comments);
the run here is seed 0. Also DINO's label decoding against F.interpolate + norm_mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sightline.perception.run import PRIMARY, PerceiveConfig, _decode_labels, run_perceive
from sightline.perception.tasks import TASKS

UNITS = 20  # per task (the default run's count; at min_units)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """task -> summary of one run: organism, synthetic seed 0, value reps (all layers and KV heads), control on."""
    out = tmp_path_factory.mktemp("validation") / "run"
    cfg = PerceiveConfig(out=str(out), reps=("values",), synthetic_units=UNITS, seed=0, control=True, bootstrap=0,
                         progress=False)
    return run_perceive(cfg).summary["tasks"]


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


# Measured on world seeds 0, 1, 2 (20 units per task, all reps, control on; default readouts):
#   fgseg  best value layer / token-grid oracle mIoU: 0.75, 0.60, 0.60 (vs the majority-token oracle 0.79, 0.76, 0.65)
FGSEG_ORACLE_SHARE = 0.5


def test_fgseg_best_value_layer_reaches_a_share_of_the_token_grid_oracle(tasks):
    s = tasks["fgseg"]
    assert s["best_values"]["value"] >= FGSEG_ORACLE_SHARE * s["oracle"], s["best_values"]


# best value layer minus the control's best value layer, primary metric, seeds 0 / 1 / 2:
MARGINS = {
    "fgseg": 0.07,     # +0.246, +0.145, +0.135 (mIoU)
    "coseg": 0.08,     # +0.147, +0.195, +0.187 (Jaccard)
    "textseg": 0.12,   # +0.227, +0.213, +0.238 (mIoU)
    "refseg": 0.03,    # +0.075, +0.062, +0.061 (mean image IoU)
    "tempcorr": 0.0,   # +0.037, +0.018, +0.057 (J&F): random features track coloured shapes nearly as well
}
# semcorr is left out: PCK@0.1 of a ~27-px box is a ~3-px tolerance on 14-px tokens, so even the token-grid oracle
# scores 0.14-0.18 and the margin is -0.010..+0.026 (seeds 2..0) over ~80 keypoints: noise, not a finding.


@pytest.mark.parametrize("task", sorted(MARGINS))
def test_best_value_layer_beats_the_random_weight_control(tasks, task):
    s = tasks[task]
    assert s["best_values"]["value"] > s["control_best_values"]["value"] + MARGINS[task], (
        s["best_values"], s["control_best_values"])


def test_token_grid_oracle_is_above_every_rep(tasks):
    for task in TASKS:
        s = tasks[task]
        assert s["primary_metric"] == PRIMARY[task]
        for kind in ("model", "control"):
            for rep, v in s["per_rep"][kind].items():
                assert v <= s["oracle"] + 1e-9, (task, kind, rep, v, s["oracle"])

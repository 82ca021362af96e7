"""Control tasks (Hewitt & Liang 2019): labels that the features cannot carry, so that a probe
that merely memorises its training set shows up as high control accuracy on the training split
and chance on held-out data.

Each group (an image; or a token position of an image for per-token probes) gets a label drawn
at random from the task's own label distribution, independently of what it shows: the image is
the "type" of Hewitt & Liang's control task. Held-out accuracy on the control task is therefore
chance by construction, and selectivity = task accuracy - control accuracy.
"""

from __future__ import annotations

import numpy as np


def control_labels(labels: np.ndarray, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Random labels with the task's class frequencies, one per group (all rows of a group share it)."""
    labels = np.asarray(labels)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    uniq, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0_47_01]))
    # a permutation of the groups' own labels keeps the class frequencies exactly
    per_group = labels[first][rng.permutation(len(uniq))]
    return per_group[inverse]

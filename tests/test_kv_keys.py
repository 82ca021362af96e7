"""Input-agnostic key detection: streamed statistics against numpy, the planted case exactly, the RoPE control."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sightline.errors import UserError
from sightline.kv.keys import FLAG_THRESHOLD, KeyMoments, plant_constant_keys, scan_keys

N_IMAGES = 24


@pytest.fixture(scope="module")
def noise_images():
    """Uniform noise images: every position differs between images, so no key is image-independent by the data.
    Measured min var_ratio on the organism (24 images): 0.30 / 0.18 / 0.24 post-RoPE for seeds 0 / 1 / 2
    (pre-RoPE 0.39 / 0.25 / 0.33), against FLAG_THRESHOLD 0.02."""
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(N_IMAGES)]


@pytest.fixture(scope="module")
def clean_scan(organism, noise_images):
    return scan_keys(organism, noise_images, batch_size=8)


def _brute(x):
    """The statistics of a whole [N, L, H, P, d] array at once (numpy, float64)."""
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(0)
    var = ((x - mu) ** 2).sum(-1).mean(0)
    flat = x.transpose(1, 2, 0, 3, 4).reshape(x.shape[1], x.shape[2], -1, x.shape[-1])  # every image and position
    total = ((flat - flat.mean(2, keepdims=True)) ** 2).sum(-1).mean(2)
    norms = np.linalg.norm(x, axis=-1)
    cos = ((x * mu).sum(-1) / (norms * np.linalg.norm(mu, axis=-1))).mean(0)
    return {"var": var, "var_ratio": var / total[..., None], "image_share": var / (norms ** 2).mean(0),
            "cosine": cos, "norm": norms.mean(0), "total": total}


@pytest.mark.parametrize("batches", [(10,), (3, 4, 3), (1, 1, 8)])
def test_streamed_moments_equal_numpy_on_the_whole_array(batches):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 2, 3, 5, 4)) * rng.uniform(0.5, 3, size=(1, 2, 3, 5, 1)) + rng.normal(size=(1, 2, 3, 5, 4))
    m = KeyMoments(x.shape[1:])
    start = 0
    for b in batches:
        m.update(torch.as_tensor(x[start:start + b]))
        start += b
    got, ref = m.finish(), _brute(x)
    for k, v in ref.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-10, atol=1e-12, err_msg=k)


def test_identical_keys_give_exactly_zero_variance_whatever_the_batching():
    x = np.random.default_rng(0).normal(size=(1, 1, 1, 3, 8)).astype(np.float32).repeat(7, 0)
    m = KeyMoments(x.shape[1:])
    for s in (slice(0, 3), slice(3, 4), slice(4, 7)):
        m.update(torch.as_tensor(x[s]))
    st = m.finish()
    assert (st["var"] == 0).all() and (st["var_ratio"] == 0).all()
    np.testing.assert_allclose(st["cosine"], 1.0, atol=1e-12)


def test_unmodified_organism_flags_nothing_and_rope_leaves_per_position_stats_alone(clean_scan):
    for kind in ("keys", "keys_prerope"):
        assert not clean_scan.flags(kind).any()
        assert clean_scan.stats[kind]["var_ratio"].min() > 5 * FLAG_THRESHOLD
    post, pre = clean_scan.stats["keys"], clean_scan.stats["keys_prerope"]
    # RoPE rotates each position by a fixed angle: per position nothing but the pooled total changes
    for k in ("var", "image_share", "cosine", "norm"):
        np.testing.assert_allclose(post[k], pre[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert not np.allclose(post["total"], pre["total"], rtol=1e-3)
    assert clean_scan.grid_hw == (8, 8) and clean_scan.n_images == N_IMAGES
    assert clean_scan.examples["keys"].shape == (2, 4, 2, 64, 32)
    assert clean_scan.input_stats["var_ratio"].shape == (1, 1, 64) and clean_scan.input_stats["var_ratio"].min() > 0.1


def test_planted_keys_are_flagged_exactly(organism, noise_images, clean_scan):
    """Chosen positions' keys made image-independent by construction: flagged with precision and recall 1.0."""
    pos = clean_scan.positions
    chosen = {(1, 0): [3, 17, 40], (3, 1): [0, 20, 63], (3, 0): [9]}
    with plant_constant_keys(organism, {lh: pos[idx] for lh, idx in chosen.items()}):
        scan = scan_keys(organism, noise_images, batch_size=5)  # another batching than the clean scan
    truth = np.zeros((4, 2, 64), dtype=bool)
    for (L, h), idx in chosen.items():
        truth[L, h, idx] = True
    for kind in ("keys", "keys_prerope"):
        flags = scan.flags(kind)
        tp = (flags & truth).sum()
        assert tp / flags.sum() == 1.0 and tp / truth.sum() == 1.0, kind  # precision, recall
        st = scan.stats[kind]
        assert (st["var"][truth] == 0).all()  # exactly image-independent
        np.testing.assert_allclose(st["cosine"][truth], 1.0, atol=1e-12)
        assert {lh: list(v) for lh, v in scan.flagged_positions(kind).items()} == chosen
    # elsewhere the model is untouched below the planted layer
    np.testing.assert_allclose(scan.stats["keys"]["var"][0], clean_scan.stats["keys"]["var"][0], rtol=1e-5)


def test_rope_control_one_prerope_key_everywhere(organism, noise_images, clean_scan):
    """Pre-RoPE keys constant across images AND positions (layer 3, head 0): post-RoPE they differ by position only.

    Both kinds flag every position (zero across-image variance, cosine 1); pre-RoPE the mean keys are one vector
    (cos_to_grand 1, no positional variance: position_share 0), post-RoPE all of the head's variance is positional
    (position_share 1) and the mean keys point apart (cos_to_grand < 1), with the same norms as pre-RoPE."""
    with plant_constant_keys(organism, {(3, 0): clean_scan.positions}, shared=True):
        scan = scan_keys(organism, noise_images, batch_size=8)
    pre, post = scan.stats["keys_prerope"], scan.stats["keys"]
    for st in (pre, post):
        assert (st["var"][3, 0] == 0).all() and (st["var_ratio"][3, 0] == 0).all()
        np.testing.assert_allclose(st["cosine"][3, 0], 1.0, atol=1e-9)
    assert scan.flags("keys")[3, 0].all() and scan.flags("keys_prerope")[3, 0].all()
    np.testing.assert_allclose(pre["cos_to_grand"][3, 0], 1.0, atol=1e-9)
    assert pre["position_share"][3, 0] == 0 and pre["total"][3, 0] == 0
    np.testing.assert_allclose(post["position_share"][3, 0], 1.0, atol=1e-12)
    assert post["total"][3, 0] > 0 and post["cos_to_grand"][3, 0].max() < 0.99
    np.testing.assert_allclose(post["norm"][3, 0], pre["norm"][3, 0], rtol=1e-6)
    assert not scan.flags("keys")[3, 1].any()  # the other head keeps its image dependence


def test_scan_refuses_mixed_grids_and_too_few_images(organism, noise_images):
    with pytest.raises(UserError, match="at least 2 images"):
        scan_keys(organism, noise_images[:1])
    with pytest.raises(UserError, match="layer 9 has no keys"):
        scan_keys(organism, noise_images[:2], layers=[9])
    with pytest.raises(UserError, match="unknown key kind"):
        scan_keys(organism, noise_images[:2], kinds=("values",))

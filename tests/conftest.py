"""Shared fixtures: tiny checkpoints of every family, built once per session from config."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# The family table: one row per supported family, used by every family-parametrised test (adding a
# family = its adapter file, with `build_tiny`, plus one row here; test_models checks it is complete).
FAMILIES = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_5_vl",
    "qwen2_vl",
    "vipllava",
    "llava_next_video",
    "qwen3_vl",
    "qwen3_vl_moe",
    "glm4v",
    "gemma3",
    "paligemma",
    "idefics3",
    "internvl",
    "aya_vision",
    "deepseek_vl",
    "janus",
    "qwen3_5",
    "ovis2",
)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """family -> folder of a saved tiny checkpoint (built on first use)."""
    from sightline.models.testing import build_tiny, tiny_families

    made: dict[str, str] = {}
    buildable = set(tiny_families())

    def get(family: str) -> str:
        if family not in buildable:
            pytest.skip(f"no tiny builder for {family}")
        if family not in made:
            made[family] = str(build_tiny(family, tmp_path_factory.mktemp(family)))
        return made[family]

    return get


@pytest.fixture(scope="session")
def tiny_adapter(tiny_checkpoint):
    """family -> loaded adapter (fp32, CPU), cached per session."""
    from sightline.models import load_model

    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_model(tiny_checkpoint(family))
        return cache[family]

    return get


def gradient_image(h: int, w: int, seed: int = 0):
    """A smooth colour image: red varies with x, green with y, blue with both (for geometry tests)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255 * x / max(w - 1, 1)
    g = 255 * y / max(h - 1, 1)
    b = 127 + 120 * np.sin((x + y) / max(h, w) * 3 + seed)
    return Image.fromarray(np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def organism():
    """The shipped model organism (sightline/organism/checkpoint) as an adapter (fp32, CPU)."""
    from sightline.organism import load_organism

    return load_organism()


@pytest.fixture
def run_cli(capsys):
    """`sightline ARGS` in this process through `main`, returned as `cli` returns it (exit status, stdout, stderr):
    the same command line without paying python + torch + transformers imports again. An exception `main` does not
    turn into a one-line error propagates and fails the test, as a traceback would in a subprocess."""
    import subprocess

    from sightline.cli import main

    def run(*args) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # --help: argparse prints and exits
            rc = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["sightline", *map(str, args)], rc, out, err)

    return run

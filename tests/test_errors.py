"""User mistakes end in one line (`sightline: error: ...`), exit 2, no traceback and nothing left behind.

Most commands run in this process (`run_cli`: `sightline.cli.main`); a fresh process only where the test is about
one (what is imported before loading, a closed pipe)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import gradient_image
from test_extract import ENV, _one_line_error, make_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"), 4)


@pytest.fixture
def extract_cli(run_cli):
    """`sightline extract --model M --data D --out O --no-progress MORE` in this process."""
    return lambda model, data, out, *more: run_cli("extract", "--model", model, "--data", data, "--out", out,
                                                   "--no-progress", *more)


# ------------------------------------------------------------------ model folders, checked before loading
def _partial_checkpoint(src: str, dst: Path, keep: tuple[str, ...]) -> Path:
    dst.mkdir()
    for name in keep:
        shutil.copy(Path(src) / name, dst / name)
    return dst


@pytest.mark.parametrize("keep,needles", [
    ((), ["is empty", "checkpoint folder"]),
    (("config.json",), ["has no weights", "model.safetensors"]),
    (("config.json", "model.safetensors"), ["image processor", "preprocessor_config.json"]),
    (("config.json", "model.safetensors", "processor_config.json"), ["tokenizer"]),
])
def test_incomplete_model_folder(tiny_checkpoint, data, tmp_path, keep, needles, extract_cli):
    model = _partial_checkpoint(tiny_checkpoint("llava"), tmp_path / "ckpt", keep)
    out = tmp_path / "s"
    r = extract_cli(model, data, out)
    _one_line_error(r, str(model), *needles)
    assert not out.exists()


def test_model_config_file_instead_of_folder(tiny_checkpoint, data, tmp_path, extract_cli):
    cfg = Path(tiny_checkpoint("llava")) / "config.json"
    r = extract_cli(cfg, data, tmp_path / "s")
    _one_line_error(r, "is a file", f"pass the checkpoint folder that holds it ({cfg.parent})")
    assert "does not exist" not in r.stderr
    assert not (tmp_path / "s").exists()


def test_model_folder_checked_before_weights_load():
    """The folder check needs no torch: a mistake answers before anything heavy is imported."""
    code = ("import sys; from sightline.models.base import check_model_folder\n"
            "from sightline.errors import UserError\n"
            "try:\n    check_model_folder(sys.argv[1])\nexcept UserError as e:\n    print(e)\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code, "/"], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "has no config.json" in r.stdout, r.stderr


# ------------------------------------------------------------------ output locations
def test_extract_out_is_a_file(tiny_checkpoint, data, tmp_path, extract_cli):
    out = tmp_path / "taken"
    out.write_text("keep me")
    _one_line_error(extract_cli(tiny_checkpoint("llava"), data, out), str(out), "is a file", "--out")
    assert out.read_text() == "keep me"


def test_extract_out_read_only(tiny_checkpoint, data, tmp_path, extract_cli):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user (root) who can write to a 0555 folder")
        out = ro / "s"
        _one_line_error(extract_cli(tiny_checkpoint("llava"), data, out), str(ro), "permission denied", "--out")
        assert not out.exists()
    finally:
        ro.chmod(0o755)


def test_extract_out_not_writable_in_process(tiny_checkpoint, data, tmp_path, monkeypatch, capsys):
    """The same check where the tests run as root: the folder reports itself not writable."""
    import sightline.extract as ex
    from sightline.cli import main

    monkeypatch.setattr(ex.os, "access", lambda path, mode: Path(path) != tmp_path)
    assert main(["extract", "--model", tiny_checkpoint("llava"), "--data", str(data), "--out", str(tmp_path / "s"),
                 "--no-progress"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("sightline")]
    assert err == [f"sightline: error: cannot write to {tmp_path} (permission denied); choose another --out"]
    assert not (tmp_path / "s").exists()


def test_store_info_on_a_file(tmp_path, run_cli):
    f = tmp_path / "manifest.json"
    f.write_text("{}")
    r = run_cli("store", "info", "--path", f)
    _one_line_error(r, "is a file, not a store folder", str(tmp_path))
    assert "does not exist" not in r.stderr


# ------------------------------------------------------------------ messages that fit the command
def test_inspect_bad_image_does_not_suggest_skip_bad(tiny_checkpoint, tmp_path, run_cli):
    bad = tmp_path / "bad.png"
    gradient_image(30, 30).save(bad)
    bad.write_bytes(bad.read_bytes()[:50])
    r = run_cli("inspect", "--model", tiny_checkpoint("llava"), "--image", bad)
    _one_line_error(r, "bad.png", "fix or remove the file")
    assert "--skip-bad" not in r.stderr


def test_layer_out_of_range_names_the_kind(tiny_checkpoint, data, tmp_path, extract_cli):
    """keys has n_layers layers, resid one more: the message says which kind is out of range."""
    n = 2  # the tiny LLaVA's decoder layers
    r = extract_cli(tiny_checkpoint("llava"), data, tmp_path / "s", "--sites", "resid,keys", "--layers", str(n))
    _one_line_error(r, f"keys layer {n} out of range", f"valid keys layers are 0..{n - 1}")
    assert not (tmp_path / "s").exists()


def test_demo_bad_n_creates_nothing(tmp_path, run_cli):
    out = tmp_path / "demo"
    _one_line_error(run_cli("demo", "--n", "0", "--out", out), "--n must be at least 1")
    assert not out.exists()


def test_bad_flag_value_is_one_line(run_cli):
    r = run_cli("extract", "--batch-size", "x")
    _one_line_error(r, "argument --batch-size", "whole number", "sightline extract --help")
    assert "usage:" not in r.stderr
    r = run_cli("extract", "--bogus")
    _one_line_error(r, "unrecognized arguments: --bogus")
    h = run_cli("extract", "--help")
    assert h.returncode == 0 and h.stdout.startswith("usage: sightline extract") and "--batch-size" in h.stdout


# ------------------------------------------------------------------ a closed pipe
def test_closed_stdout_ends_quietly(tiny_checkpoint, data, tmp_path, extract_cli):
    """`sightline store info S | head` with the reader gone: no BrokenPipeError traceback."""
    out = tmp_path / "s"
    assert extract_cli(tiny_checkpoint("llava"), data, out, "--limit", "1").returncode == 0
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written
    proc = subprocess.run([sys.executable, "-m", "sightline.cli", "store", "info", "--path", str(out), "--json"], env=ENV,
                          stdout=w, stderr=subprocess.PIPE, text=True, timeout=300)
    os.close(w)
    assert proc.stderr == "" and proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------ --skip-bad, --no-progress
def test_skip_bad_says_what_it_skipped(tiny_checkpoint, tmp_path, extract_cli, run_cli):
    data = make_folder(tmp_path / "data", 4)
    bad = data / "a" / "0001.png"
    bad.write_bytes(bad.read_bytes()[:60])
    out = tmp_path / "s"
    r = extract_cli(tiny_checkpoint("llava"), data, out, "--skip-bad")
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("skipped 1 unreadable image:") and "0001.png (truncated file)" in line, r.stdout
    info = run_cli("store", "info", "--path", out)
    assert "skipped   " in info.stdout and "0001.png: truncated file" in info.stdout, info.stdout


def test_no_progress_silences_model_loading_bar(tiny_checkpoint, data, tmp_path, extract_cli):
    from transformers.utils import logging as hf_logging

    model = tiny_checkpoint("llava")
    assert hf_logging.is_progress_bar_enabled()  # as in a fresh process: nothing before this left the bars off
    shown = extract_cli(model, data, tmp_path / "a", "--limit", "1", "--progress")
    assert shown.returncode == 0, shown.stderr
    assert "Loading weights" in shown.stderr, "the bar this test silences is not shown any more"
    quiet = extract_cli(model, data, tmp_path / "b", "--limit", "1")
    assert quiet.returncode == 0 and "Loading weights" not in quiet.stderr and "it/s" not in quiet.stderr, quiet.stderr
    assert hf_logging.is_progress_bar_enabled()  # --no-progress turned them off for its own run only


# ------------------------------------------------------------------ file modes
def test_weight_files_get_the_normal_mode(tmp_path):
    """Files written through safetensors' save_file (created 0600) end up like every other file."""
    import torch

    from sightline.report.files import file_mode, save_safetensors, write_json
    from sightline.sae.models import ARCHITECTURES, SAEConfig

    mode = file_mode()
    assert mode == 0o666 & ~_umask()
    paths = [save_safetensors({"x": torch.zeros(2)}, tmp_path / "t.safetensors"), write_json(tmp_path / "j.json", {})]
    sae = ARCHITECTURES["topk"](SAEConfig(arch="topk", d_in=4, width=8, k=2))
    sae.save_pretrained(tmp_path / "sae")
    paths += [p for p in (tmp_path / "sae").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in paths[2:])
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == mode, (p, oct(p.stat().st_mode))


def test_organism_folder_gets_the_normal_mode(tiny_adapter, tmp_path):
    from sightline.organism.model import save_organism
    from sightline.report.files import file_mode

    ad = tiny_adapter("llava")
    out = save_organism(ad.model, ad.processor, tmp_path / "o")
    weights = out / "model.safetensors"
    assert stat.S_IMODE(weights.stat().st_mode) == file_mode()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------ the demo's timings
def test_demo_store_seconds_is_the_extraction_time(monkeypatch, tmp_path):
    """summary.store.seconds is the extraction's wall time, not the time to open the store."""
    import sightline.demo as demo
    import sightline.extract as ex

    real = ex.extract

    def slow_extract(cfg):
        time.sleep(1.5)
        return real(cfg)

    monkeypatch.setattr(ex, "extract", slow_extract)
    monkeypatch.setattr(demo, "SECTIONS", [s for s in demo.SECTIONS if s[0] == "store"])
    summary = demo.run_demo(out=str(tmp_path / "d"), n=2, eval_n=1, progress=False)
    assert summary["store"]["seconds"] >= 1.5

"""The extraction job end to end: CLI, exactness, kill-and-resume, two ranks, and user mistakes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import gradient_image
from sightline.capture import Capture
from sightline.cli import main
from sightline.store import ActivationStore

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}


def make_folder(root: Path, n: int, sizes=((60, 80), (90, 40), (64, 64))) -> Path:
    """An imagefolder with classes a/b of gradient images of varied sizes."""
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        gradient_image(h, w, seed=i).save(d / f"{i:04d}.png")
    return root


def cli(*args) -> subprocess.CompletedProcess:
    """`sightline ARGS` in a fresh process: for what needs one (signals, a kill, a closed pipe, import order)."""
    return subprocess.run([sys.executable, "-m", "sightline.cli", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"), 12)


def test_store_equals_direct_capture(tiny_checkpoint, tiny_adapter, data, tmp_path):
    """What extract writes is exactly what Capture gives for each example, cast to the store dtype."""
    model = tiny_checkpoint("llava")
    out = tmp_path / "s"
    assert main(["extract", "--model", model, "--data", str(data), "--sites", "resid,keys,values,projector,resid.2",
                 "--layers", "0", "--prompt", "What is it?", "--out", str(out), "--batch-size", "5",
                 "--no-progress"]) == 0
    s = ActivationStore.open(out)
    assert s.complete and len(s) == 12
    assert set(s.sites) == {"projector", "resid.0", "resid.2", "keys.0", "values.0"}
    ad = tiny_adapter("llava")
    from sightline.data import open_dataset

    ds = open_dataset(str(data))
    for ex in (0, 7, 11):
        meta = s.examples[ex]
        assert meta["path"] == ds[ex].path and meta["label"] == ds[ex].label
        text = ad.render_prompt("What is it?")
        assert meta["text"] == text
        batch = ad.prepare([ds.load_image(ex)], [text])
        ref = Capture(ad, s.sites, dtype=torch.float16).run(batch, [batch.layouts[0].image_positions])[0]
        got = s.example(ex)
        for site in s.sites:
            # batched (padded) and alone agree to fp16 rounding
            assert torch.allclose(got[site].float(), ref[site].float(), atol=2e-3, rtol=2e-3), site
        rows = got["index"]
        assert (rows["example"] == ex).all() and (rows["modality"] == 1).all()
        assert rows["row"].max() == batch.layouts[0].grid().rows - 1
    # the manifest records the model and the exact config
    assert s.manifest["model"]["family"] == "llava"
    assert s.manifest["config"]["sites"] == "resid,keys,values,projector,resid.2"


def test_positions_text_and_all(tiny_checkpoint, data, tmp_path):
    model = tiny_checkpoint("llava")
    for which in ("text", "all"):
        out = tmp_path / which
        assert main(["extract", "--model", model, "--data", str(data), "--sites", "resid.1", "--positions", which,
                     "--out", str(out), "--limit", "3", "--no-progress"]) == 0
        s = ActivationStore.open(out)
        mods = set(np.unique(s.index["modality"]).tolist())
        # no prompt: the text is the chat template's markers alone (special tokens)
        assert mods == ({3} if which == "text" else {1, 3})
        assert s.n_tokens == sum(e["n_tokens"] for e in s.examples)
        if which == "all":
            assert all(e["n_tokens"] == e["seq_len"] for e in s.examples)


def _read_all(path):
    s = ActivationStore.open(path)
    return s, {site: s.tensor(site) for site in s.sites}


def test_kill_and_resume_is_exact(tiny_checkpoint, tmp_path, run_cli):
    """SIGKILL mid-run, then --resume: every example exactly once, tensors identical to a clean run. (The killed
    run is a process of its own; the clean run and the resume need none.)"""
    model = tiny_checkpoint("llava")
    data = make_folder(tmp_path / "data", 160, sizes=((56, 56), (70, 50)))
    args = ["extract", "--model", model, "--data", data, "--sites", "resid,values", "--batch-size", "2",
            "--shard-mb", "0.002", "--no-progress"]
    clean = tmp_path / "clean"
    assert run_cli(*args, "--out", clean).returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sightline.cli", *map(str, args), "--out", str(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("shards/*/shard.json"))) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = ActivationStore.open(out)
    assert 0 < len(partial) < 160, "the kill did not land mid-run"
    r = run_cli(*args, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    s, got = _read_all(out)
    c, ref = _read_all(clean)
    assert s.complete and [e["example"] for e in s.examples] == list(range(160))
    assert np.array_equal(s.index, c.index)
    for site in ref:
        assert torch.equal(got[site], ref[site]), site
    assert not list(out.rglob("*.tmp-*")), "leftover temporary files"


N_INTERRUPT = 300


@pytest.fixture(scope="module")
def interrupt_case(tiny_checkpoint, tmp_path_factory):
    """A 300-image dataset, the extract arguments, and the store of an uninterrupted run. (60 images took
    0.5 s on an idle machine: the run could finish before the signal was sent.)"""
    root = tmp_path_factory.mktemp("interrupt")
    data = make_folder(root / "data", N_INTERRUPT, sizes=((56, 56), (70, 50)))
    args = ["extract", "--model", tiny_checkpoint("llava"), "--data", data, "--sites", "resid,values",
            "--batch-size", "2"]
    clean = root / "clean"
    assert main([*map(str, args), "--out", str(clean), "--no-progress"]) == 0  # in process: no signal here
    return args, clean


def _progress(stderr: str) -> list[tuple[int, int]]:
    """(done, total) of each update of the `extract` progress bar in captured stderr."""
    import re

    return [(int(a), int(b)) for a, b in re.findall(r"extract:[^\r\n]*?\| *(\d+)/(\d+) \[", stderr)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_keeps_finished_examples(interrupt_case, tmp_path, sig, run_cli):
    """Ctrl-C or a kill part way, with the default (large) shards: the examples done are kept, and the
    resume computes only the rest; the final store equals an uninterrupted run."""
    import threading

    args, clean = interrupt_case
    out = tmp_path / "s"
    # a job started in the background by a non-interactive shell inherits SIGINT ignored; a user's
    # extraction in a terminal has the default handler, which is what this test is about
    proc = subprocess.Popen([sys.executable, "-m", "sightline.cli", *map(str, args), "--out", str(out), "--progress"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stderr.read1(4096), b"")), daemon=True)
    reader.start()
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = _progress(b"".join(chunks).decode(errors="replace"))
        if done and done[-1][0] >= 6:
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    rc = proc.wait(timeout=120)
    reader.join(timeout=10)
    stderr = b"".join(chunks).decode(errors="replace")
    assert rc == (130 if sig == signal.SIGINT else 143), stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("sightline: interrupted:") and "--resume" in last and "Traceback" not in stderr, stderr[-2000:]
    kept = len(ActivationStore.open(out))
    assert 6 <= kept < N_INTERRUPT, f"the interrupt did not land mid-run ({kept} kept)"
    assert f"{kept} of {N_INTERRUPT} examples are kept" in last, last
    r = run_cli(*args, "--out", out, "--resume", "--progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _progress(r.stderr)[-1] == (N_INTERRUPT - kept, N_INTERRUPT - kept), "the resume did not compute only the rest"
    s, got = _read_all(out)
    c, ref = _read_all(clean)
    assert s.complete and [e["example"] for e in s.examples] == list(range(N_INTERRUPT))
    assert np.array_equal(s.index, c.index)
    for site in ref:
        assert torch.equal(got[site], ref[site]), site


def test_two_ranks_write_one_store(tiny_checkpoint, data, tmp_path):
    """torchrun with 2 gloo processes writes one store equal to a single-process run."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    model = tiny_checkpoint("llava")
    args = ["extract", "--model", model, "--data", data, "--sites", "resid.1,keys.0", "--batch-size", "1",
            "--no-progress"]
    one = tmp_path / "one"
    assert main([*map(str, args), "--out", str(one)]) == 0
    two = tmp_path / "two"
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "sightline.cli", *map(str, args),
                        "--out", str(two)], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    s2, got = _read_all(two)
    s1, ref = _read_all(one)
    assert s2.complete and len(s2) == 12
    ranks = {p.name[:4] for p in (two / "shards").iterdir()}
    assert ranks == {"r000", "r001"}, "both ranks wrote shards"
    assert np.array_equal(s1.index, s2.index)
    for site in ref:
        assert torch.equal(got[site], ref[site]), site


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("sightline: error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-1500:]
    for n in needles:
        assert n in lines[0], lines[0]


def test_corrupt_image_fails_cleanly_or_is_skipped(tiny_checkpoint, tmp_path, run_cli):
    model = tiny_checkpoint("llava")
    data = make_folder(tmp_path / "data", 6)
    bad = data / "a" / "0003.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    out = tmp_path / "s"
    r = run_cli("extract", "--model", model, "--data", data, "--out", out, "--no-progress", "--batch-size", "2")
    _one_line_error(r, "0003.png", "--skip-bad")
    assert not out.exists(), "a half-written store was left behind"
    r = run_cli("extract", "--model", model, "--data", data, "--out", out, "--no-progress", "--skip-bad")
    assert r.returncode == 0, r.stderr
    s = ActivationStore.open(out)
    assert s.complete and len(s) == 5 and len(s.skipped) == 1
    assert s.skipped[0]["path"].endswith("0003.png") and "truncated" in s.skipped[0]["reason"]


@pytest.mark.parametrize(
    "change,needles",
    [
        ({"--model": "/nonexistent/model"}, ["/nonexistent/model"]),
        ({"--data": "/nonexistent/data"}, ["/nonexistent/data"]),
        ({"--layers": "0-9"}, ["out of range"]),
        ({"--sites": "resid,bogus"}, ["bogus"]),
    ],
)
def test_user_mistakes_are_one_line(tiny_checkpoint, data, tmp_path, change, needles, run_cli):
    args = {"--model": tiny_checkpoint("llava"), "--data": str(data), "--out": str(tmp_path / "s")}
    args.update(change)
    r = run_cli("extract", *[x for kv in args.items() for x in kv], "--no-progress")
    _one_line_error(r, *needles)
    assert not (tmp_path / "s").exists()


def test_existing_store_needs_resume_and_same_config(tiny_checkpoint, data, tmp_path, run_cli):
    model = tiny_checkpoint("llava")
    out = tmp_path / "s"
    base = ["extract", "--model", model, "--data", data, "--out", out, "--no-progress", "--limit", "2"]
    assert run_cli(*base, "--sites", "resid.1").returncode == 0
    _one_line_error(run_cli(*base, "--sites", "resid.1"), "--resume")
    _one_line_error(run_cli(*base, "--sites", "resid.2", "--resume"), "sites")
    assert ActivationStore.open(out).complete  # the refused runs left the store as it was


def test_unsupported_architecture_lists_families(data, tmp_path, run_cli):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                vocab_size=50).save_pretrained(tmp_path)
    r = run_cli("inspect", "--model", tmp_path, "--image", "x.png")
    r2 = run_cli("extract", "--model", tmp_path, "--data", data, "--out", tmp_path / "o")
    for res in (r, r2):
        assert res.returncode == 2
    _one_line_error(r2, "unsupported architecture", "llava", "qwen2_5_vl")


def test_inspect_prints_layout(tiny_checkpoint, tmp_path, run_cli):
    img = tmp_path / "im.png"
    gradient_image(90, 120).save(img)
    r = run_cli("inspect", "--model", tiny_checkpoint("llava_next"), "--image", img, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["tokens"]["image"] > 0 and info["tokens"]["image_newline"] > 0
    views = {g["view"] for g in info["grids"]}
    assert views == {0, 1}
    r = run_cli("inspect", "--model", tiny_checkpoint("llava"), "--image", img)
    assert r.returncode == 0 and "grid" in r.stdout and "image at" in r.stdout


def _store_tensors(out: Path) -> tuple[ActivationStore, list[dict]]:
    s = ActivationStore.open(out)
    return s, [s.example(e["example"]) for e in s.examples]


def test_per_example_prefix_equals_separate_runs(tiny_checkpoint, tmp_path):
    """One extraction over a JSONL with per-example prefixes writes, per example, exactly the tensors of a
    separate run with that prefix as --prefix; a missing prefix takes --prefix, an empty one means none."""
    model = tiny_checkpoint("llava")
    images = [tmp_path / f"{k}.png" for k in range(2)]
    for k, path in enumerate(images):
        gradient_image(56 + 8 * k, 64, seed=k).save(path)
    own = {"red": "A red square.", "none": ""}  # "": explicitly no prefix, although --prefix is given
    rows = []
    for path in images:  # the same image repeated with different prefixes: one prefix study, one run
        rows += [{"image": path.name}, {"image": path.name, "prefix": own["red"]},
                 {"image": path.name, "prefix": own["none"]}, {"image": path.name, "prefix": None}]
    study = tmp_path / "study.jsonl"
    study.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    plain = tmp_path / "plain.jsonl"
    plain.write_text("\n".join(json.dumps({"image": p.name}) for p in images) + "\n")
    common = ["--model", model, "--sites", "resid,values", "--positions", "all", "--prompt", "What is it?",
              "--batch-size", "1", "--no-progress"]  # batch size 1: no padding, so equal means bit for bit

    def run(data: Path, name: str, *extra: str) -> tuple[ActivationStore, list[dict]]:
        assert main(["extract", "--data", str(data), "--out", str(tmp_path / name), *common, *extra]) == 0
        return _store_tensors(tmp_path / name)

    s, got = run(study, "study", "--prefix", "Count them.")
    _, ref_global = run(plain, "global", "--prefix", "Count them.")
    _, ref_red = run(plain, "red", "--prefix", own["red"])
    _, ref_none = run(plain, "none")
    s_empty, ref_empty = run(plain, "empty", "--prefix", "")
    expected_prefix = ["Count them.", own["red"], "", "Count them."]
    for k in range(len(images)):
        refs = [ref_global[k], ref_red[k], ref_none[k], ref_global[k]]
        for j, ref in enumerate(refs):
            i = 4 * k + j
            meta = s.examples[i]
            assert meta["prompt"] == "What is it?" and meta["prefix"] == expected_prefix[j], meta
            assert set(got[i]) == set(ref)
            for site in s.sites:
                assert torch.equal(got[i][site], ref[site]), (i, site)
            assert np.array_equal(got[i]["index"]["position"], ref["index"]["position"])
        # an empty --prefix is no prefix, bit for bit, and both differ from a real prefix
        for site in s.sites:
            assert torch.equal(ref_empty[k][site], ref_none[k][site]), site
        assert not torch.equal(ref_red[k]["values.1"], ref_none[k]["values.1"])
    texts = [e["text"] for e in s.examples]
    assert texts[2] == texts[0].replace("Count them.", "") != texts[0]  # the "" row renders as no prefix
    assert s_empty.examples[0]["text"] == ActivationStore.open(tmp_path / "none").examples[0]["text"]
    assert "A red square." in texts[1] and texts[1].index("A red square.") < texts[1].index("What is it?")
    assert [e["prefix"] for e in s_empty.examples] == ["", ""]
    assert [e["prefix"] for e in ActivationStore.open(tmp_path / "none").examples] == [None, None]

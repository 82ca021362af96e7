"""SAE training: streams (coverage, mixing, resume positions), learning a known sparse dictionary, exact resume,
several SAEs in one pass, DDP under torchrun (2 gloo processes) against one process, errors, and the
validation on the model organism."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sightline.errors import UserError
from sightline.sae import SAE, SAEConfig, SAETrainConfig, sae_grid, train_saes
from sightline.sae.train import Batches, TokenStream, lr_factor
from sightline.store import ActivationStore, StoreWriter

D = 32


def write_store(path: Path, n_examples: int = 80, n_img: int = 48, n_txt: int = 16, ids: bool = False,
                seed: int = 0) -> Path:
    """A store whose image tokens are sparse combinations (3 of 96 unit atoms) plus noise and an offset.

    With ids=True each token instead carries (example, position, modality, 1...) so streams can be audited.
    Small shards (about 8 examples each) so shuffling and DDP see many."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(96, D, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    manifest = {"n_examples": n_examples, "config": {"model": "synthetic"}}
    with StoreWriter(path, manifest, {"resid.1": (D,)}, dtype="float16", shard_bytes=8 * 64 * D * 2) as w:
        for i in range(n_examples):
            n = n_img + n_txt
            if ids:
                x = torch.ones(n, D)
                x[:, 0], x[:, 1] = i, torch.arange(n)
                x[:n_img, 2], x[n_img:, 2] = 1, 0
            else:
                pick = torch.rand(n, 96, generator=g).argsort(1)[:, :3]
                amp = torch.rand(n, 3, generator=g) * 3 + 0.5
                x = (amp.unsqueeze(-1) * atoms[pick]).sum(1) + 0.02 * torch.randn(n, D, generator=g) + 0.5
                x[n_img:] = torch.randn(n_txt, D, generator=g) * 0.5 - 2  # text: another distribution
                x = x * 7
            index = np.full((n, 7), -1, np.int32)
            index[:, 0], index[:, 1] = i, np.arange(n)
            index[:n_img, 2], index[n_img:, 2] = 1, 0
            w.add(i, {"label": i % 3}, index, {"resid.1": x})
    return path


@pytest.fixture(scope="module")
def sparse_store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("sae") / "store")


@pytest.fixture(scope="module")
def id_store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("sae") / "ids", n_examples=30, n_img=10, n_txt=5, ids=True)


def base_config(store: Path, out: Path, **kw) -> SAETrainConfig:
    kw.setdefault("saes", (SAEConfig(arch="topk", width=128, k=6, lr=3e-3),))
    return SAETrainConfig(store=str(store), site="resid.1", out=str(out), batch_size=256, threads=1, log_every=10,
                          **kw)


def paths_of(result) -> list[Path]:
    """The SAE folders of a finished training run."""
    return [Path(p) for p in result["paths"]]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "sae_weights.safetensors"))


def fvu_on(sae: SAE, x: torch.Tensor) -> tuple[float, float, float]:
    """FVU, mean L0 and fraction of never-active latents of an SAE on tokens x (model units)."""
    with torch.no_grad():
        x_hat, f = sae(x)
    fvu = float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    return fvu, float((f > 0).sum(1).float().mean()), float(((f > 0).sum(0) == 0).float().mean())


# ---------------------------------------------------------------------- streams
def ids_of(t: torch.Tensor) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in t[:, :2].float().tolist()]


def test_stream_epoch_covers_each_token_once(id_store):
    store = ActivationStore.open(id_store)
    idx = store.index
    image = {(int(e), int(p)) for e, p, m in zip(idx["example"], idx["position"], idx["modality"]) if m == 1}
    n = 37  # not a divisor of the 300 image tokens: chunks straddle epochs
    got = []
    for chunk, _ in TokenStream(store, "resid.1", ("image", "image_newline"), n, seed=3, tag=0, shuffle_shards=2):
        got += ids_of(chunk)
        if len(got) >= 2 * len(image):
            break
    first, second = got[: len(image)], got[len(image) : 2 * len(image)]
    assert sorted(first) == sorted(image) and sorted(second) == sorted(image)  # each epoch: every token once
    assert first != second  # a new shuffle each epoch
    assert first != sorted(first)  # shuffled at all


@given(n=st.integers(2, 70), m=st.integers(0, 12))
@settings(max_examples=15, deadline=None)
def test_stream_restarts_exactly_where_it_stopped(id_store, n, m):
    store = ActivationStore.open(id_store)
    s = TokenStream(store, "resid.1", ("text",), n, seed=5, tag=1, shuffle_shards=3)
    chunks = []
    for chunk, pos in s:
        chunks.append((ids_of(chunk), pos))
        if len(chunks) == m + 3:
            break
    start = chunks[m - 1][1] if m else (0, 0)
    resumed = []
    for chunk, pos in TokenStream(store, "resid.1", ("text",), n, seed=5, tag=1, shuffle_shards=3, start=start):
        resumed.append((ids_of(chunk), pos))
        if len(resumed) == 3:
            break
    assert resumed == chunks[m:]


def test_both_modalities_mixed_in_fixed_share(id_store):
    store = ActivationStore.open(id_store)
    cfg = SAETrainConfig(store=str(id_store), site="resid.1", modality="both", image_fraction=0.25, batch_size=40)
    seen_img = set()
    for k, (x, _) in enumerate(Batches(store, cfg)):
        mod = x[:, 2].float()
        assert len(x) == 40 and int((mod == 1).sum()) == 10 and int((mod == 0).sum()) == 30
        assert 0 < int((mod[:20] == 1).sum()) < 20  # interleaved, so DDP slices hold both modalities
        seen_img |= set(ids_of(x[mod == 1]))
        if k == 40:
            break
    assert len(seen_img) == 300  # 410 image tokens drawn cover all 300
    natural = dataclasses.replace(cfg, image_fraction=0.0, batch_size=30)  # default: the store's share, 10 of 15
    x, _ = next(iter(Batches(store, natural)))
    assert int((x[:, 2] == 1).sum()) == 20
    text = SAETrainConfig(store=str(id_store), site="resid.1", modality="text", batch_size=16, prefetch=False)
    x, _ = next(iter(Batches(store, text)))
    assert bool((x[:, 2] == 0).all())


# ---------------------------------------------------------------------- training
def test_topk_learns_the_sparse_dictionary(sparse_store, tmp_path):
    """3-sparse data over 96 atoms: TopK (k=6) explains it far better than the best 6-dim linear map."""
    cfg = base_config(sparse_store, tmp_path / "run", epochs=30)
    (path,) = paths_of(train_saes(cfg, progress=False))
    store = ActivationStore.open(sparse_store)
    x = store.tensor("resid.1").float()[store.index["modality"] == 1]
    sae = SAE.from_pretrained(path)
    fvu, l0, dead = fvu_on(sae, x)
    xc = x - x.mean(0)
    pca6 = 1 - float((torch.linalg.svdvals(xc)[:6] ** 2).sum() / xc.pow(2).sum())
    assert fvu < 0.2 and pca6 > 0.6, (fvu, pca6)
    assert l0 <= 6 and dead < 0.05
    # outputs: config, log, results (summary), figures, page, SAELens folder
    assert SAETrainConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text())) == cfg
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 450 and log[-1]["saes"]["topk-w128-k6"]["fvu"] < log[0]["saes"]["topk-w128-k6"]["fvu"]
    summary = json.loads((tmp_path / "run" / "results.json").read_text())["summary"]
    assert summary["steps"] == 450 and summary["saes"][0]["name"] == "topk-w128-k6"
    assert 0 <= summary["load_frac"] < 1 and sae.cfg.site == "resid.1" and sae.cfg.modality == "image"
    assert sae.cfg.input_scale == pytest.approx(summary["input_scale"])
    assert not (tmp_path / "run" / "checkpoint").exists() and not (tmp_path / "run.partial").exists()
    assert paths_of(train_saes(cfg, progress=False)) == [path]  # a finished run returns at once


def test_resume_gives_identical_weights(sparse_store, tmp_path):
    saes = (SAEConfig(arch="topk", width=64, k=4, lr=3e-3), SAEConfig(arch="batchtopk", width=64, k=4, lr=3e-3),
            SAEConfig(arch="relu", width=64, lr=1e-3, l1_coeff=1.0))
    full = base_config(sparse_store, tmp_path / "full", total_tokens=256 * 40, checkpoint_every=15, saes=saes)
    paths = paths_of(train_saes(full, progress=False))
    cut = dataclasses.replace(full, out=str(tmp_path / "cut"))
    assert train_saes(cut, progress=False, stop_after=22) is None  # "interrupted" at step 22: checkpoint at 15
    assert not (tmp_path / "cut").exists()  # the run folder appears only when complete
    state = json.loads((tmp_path / "cut.partial" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 15
    with pytest.raises(UserError, match="holds an SAE run with another config"):
        train_saes(dataclasses.replace(cut, seed=1), progress=False)  # the partial run is checked too
    resumed = paths_of(train_saes(dataclasses.replace(cut, prefetch=False), progress=False))  # runtime fields may change
    for a, b in zip(paths, resumed):
        wa, wb = weights(a), weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), a.name
    timing = {"seconds", "tokens_per_s", "load_frac", "wait_frac"}
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k not in timing}  # noqa: E731
                       for line in (p / "train_log.jsonl").read_text().splitlines()]
    assert strip(tmp_path / "full") == strip(tmp_path / "cut")
    with pytest.raises(UserError, match="holds an SAE run with another config"):
        train_saes(dataclasses.replace(cut, seed=1), progress=False)


def test_several_saes_in_one_pass_train_as_if_alone(sparse_store, tmp_path):
    grid = sae_grid("topk", widths=(64, 96), ks=(4,), lr=3e-3)
    assert [s.width for s in grid] == [64, 96] and all(s.k == 4 for s in grid)
    both = paths_of(train_saes(base_config(sparse_store, tmp_path / "both", total_tokens=256 * 12, saes=grid),
                               progress=False))
    alone = paths_of(train_saes(base_config(sparse_store, tmp_path / "alone", total_tokens=256 * 12, saes=grid[1:]),
                                progress=False))
    assert [p.name for p in both] == ["topk-w64-k4", "topk-w96-k4"]
    wa, wb = weights(both[1]), weights(alone[0])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ddp_two_gloo_processes_match_one(sparse_store, tmp_path):
    """torchrun --nproc-per-node 2 (CPU, gloo): each rank trains on half of every batch, gradients summed."""
    saes = (SAEConfig(arch="topk", width=256, k=4, lr=3e-3), SAEConfig(arch="relu", width=64, lr=1e-3, l1_coeff=1.0))
    # dead_tokens=256: latents silent for one step count as dead, so AuxK (and its all-reduce) is exercised
    one = base_config(sparse_store, tmp_path / "one", total_tokens=256 * 20, saes=saes, checkpoint_every=10,
                      dead_tokens=256)
    two = dataclasses.replace(one, out=str(tmp_path / "two"))
    cfg_file = tmp_path / "two.json"
    cfg_file.write_text(json.dumps(two.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SIGHTLINE_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "sightline.sae.train", str(cfg_file)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = paths_of(train_saes(one, progress=False))
    summary = json.loads((tmp_path / "two" / "results.json").read_text())["summary"]
    assert summary["world_size"] == 2
    log = [json.loads(line) for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert any(r["saes"]["topk-w256-k4"]["aux"] > 0 for r in log)
    for p in paths:
        wa, wb = weights(p), weights(tmp_path / "two" / p.name)
        for k in wa:  # same math, summed in another order: equal to float tolerance
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4, msg=f"{p.name}.{k}")


def test_cli_under_torchrun_prints_once_and_passes_its_flags(sparse_store, tmp_path):
    """`sightline sae train` on 2 gloo ranks: one "trained" line (rank 0), the flags reach the run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SIGHTLINE_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "sightline.cli", "sae", "train", str(sparse_store), "--site", "resid.1",
                           "--out", str(tmp_path / "run"), "--width", "64", "--k", "4", "--batch-size", "256",
                           "--total-tokens", str(256 * 6), "--dead-tokens", "512", "--checkpoint-every", "2",
                           "--threads", "1", "--no-progress"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line for line in proc.stdout.splitlines() if line.startswith("trained ")] == [
        f"trained {tmp_path / 'run' / 'topk-w64-k4'}"]
    summary = json.loads((tmp_path / "run" / "results.json").read_text())["summary"]
    assert summary["world_size"] == 2 and summary["dead_tokens"] == 512 and summary["steps"] == 6
    assert (tmp_path / "run" / "topk-w64-k4" / "sae_weights.safetensors").exists()


def test_user_errors(sparse_store, tmp_path):
    with pytest.raises(UserError, match="site 'resid.9' is not in store"):
        train_saes(dataclasses.replace(base_config(sparse_store, tmp_path / "a"), site="resid.9"), progress=False)
    with pytest.raises(UserError, match="--modality must be image, text or both"):
        train_saes(base_config(sparse_store, tmp_path / "b", modality="video"), progress=False)
    with pytest.raises(UserError, match="two SAEs are named 'x'"):
        train_saes(base_config(sparse_store, tmp_path / "c", saes=(SAEConfig(name="x"), SAEConfig(name="x"))),
                   progress=False)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not an SAE run"):
        train_saes(base_config(sparse_store, tmp_path / "d"), progress=False)
    with pytest.raises(UserError, match="no activation store"):
        train_saes(base_config(tmp_path / "nowhere", tmp_path / "e"), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_lr_schedule_and_config_round_trip():
    total = 100
    f = [lr_factor(s, total, 0.1, 0.2) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[50] == 1.0 and f[79] == 1.0
    assert f[80] == pytest.approx(1.0) and f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)
    cfg = SAETrainConfig(store="s", site="resid.2", modality="both", saes=sae_grid("relu", "64", l1_coeffs="1,5"))
    assert [s.l1_coeff for s in cfg.saes] == [1.0, 5.0]
    assert SAETrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert [(s.width, s.k) for s in sae_grid("batchtopk", "64,128", "8,16")] == [(64, 8), (64, 16), (128, 8), (128, 16)]
    with pytest.raises(UserError, match="--k must be a number or a comma-separated list"):
        sae_grid("topk", "64", "8,x")


# ---------------------------------------------------------------------- the model organism
@pytest.fixture(scope="module")
def organism_stores(tmp_path_factory):
    """resid.2 of the shipped organism at the image tokens of synthetic scenes: a training and a held-out store."""
    from sightline.data.synthetic import export_jsonl
    from sightline.extract import ExtractConfig, extract
    from sightline.organism import CHECKPOINT

    root = tmp_path_factory.mktemp("organism-sae")
    stores = []
    for name, seed, n in (("train", 11, 200), ("test", 12, 40)):
        manifest = export_jsonl(root / f"data-{name}", seed=seed, n=n, per_image=1, facts=False)
        stores.append(extract(ExtractConfig(model=str(CHECKPOINT), data=str(manifest), out=str(root / name),
                                            sites="resid.2", positions="image", dtype="float32", batch_size=16,
                                            progress=False)))
    return stores


def test_organism_middle_layer_image_tokens(organism_stores, tmp_path):
    """Bounds chosen before the run: held-out FVU <= 0.15 at L0 <= 32, and < 5% dead latents (never active
    on any of the 15,360 training and held-out image tokens)."""
    train, test = organism_stores
    t0 = time.perf_counter()
    cfg = SAETrainConfig(store=str(train), site="resid.2", out=str(tmp_path / "run"), modality="image",
                         batch_size=1024, epochs=12, threads=2, log_every=20,
                         saes=(SAEConfig(arch="topk", width=256, k=32),))
    (path,) = paths_of(train_saes(cfg, progress=False))
    seconds = time.perf_counter() - t0
    sae = SAE.from_pretrained(path)
    image = lambda s: s.tensor("resid.2").float()[np.isin(s.index["modality"], [1, 2])]  # noqa: E731
    x_test, x_train = image(ActivationStore.open(test)), image(ActivationStore.open(train))
    fvu, l0, dead_held = fvu_on(sae, x_test)
    with torch.no_grad():
        ever = (sae.encode(x_test) > 0).any(0) | (sae.encode(x_train) > 0).any(0)
    dead = float((~ever).float().mean())
    summary = json.loads((tmp_path / "run" / "results.json").read_text())["summary"]
    print(f"organism resid.2 image: held-out fvu={fvu:.4f} l0={l0:.1f} dead={dead:.2%} (held-out only {dead_held:.2%}) "
          f"seconds={seconds:.1f} load_frac={summary['load_frac']} wait_frac={summary['wait_frac']}")
    assert fvu <= 0.15 and l0 <= 32 and dead < 0.05
    assert summary["wait_frac"] < 0.2  # streaming is a small part of the step time


def test_training_run_folder_follows_the_output_convention(sparse_store, tmp_path, monkeypatch):
    """config.json round-trips, results.json has the summary, figures/ and index.html exist; an error
    mid-run leaves no OUT (only OUT.partial, which a rerun resumes)."""
    cfg = base_config(sparse_store, tmp_path / "run", total_tokens=256 * 4, saes=(SAEConfig(width=64, k=4),))
    res = train_saes(cfg, progress=False)
    out = tmp_path / "run"
    assert res.path == out and SAETrainConfig.from_dict(json.loads((out / "config.json").read_text())) == cfg
    results = json.loads((out / "results.json").read_text())
    assert results["summary"] == json.loads(json.dumps(res.summary)) and res["steps"] == 4
    assert [p.name for p in (out / "figures").iterdir()] == ["training.png"]
    assert "topk-w64-k4/cfg.json" in (out / "index.html").read_text()

    import sightline.report.sae as figs

    def broken(*a, **k):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(figs, "plot_training_curves", broken)
    with pytest.raises(RuntimeError, match="figure failed"):
        train_saes(dataclasses.replace(cfg, out=str(tmp_path / "broken")), progress=False)
    assert not (tmp_path / "broken").exists() and (tmp_path / "broken.partial" / "config.json").exists()


def test_schedule_from_the_data():
    """The README's command on a 32-image store (2,304 tokens, 1,024 latents): auto epochs and batch give
    200 steps of 256 over 51,200 tokens; the old fixed batch of 4096 for one pass is one step, flagged."""
    from sightline.sae.train import plan_schedule

    auto = SAETrainConfig(store="s", site="resid.2", modality="both")
    s = plan_schedule(auto, n_avail=2304, max_width=1024)
    assert (s.batch_size, s.steps, s.total_tokens) == (256, 200, 51_200) and not s.too_short and not s.warnings
    big = plan_schedule(auto, n_avail=10_000_000, max_width=32_768)  # a large store: one pass, batch 4096
    assert (big.batch_size, big.steps, big.epochs) == (4096, 10_000_000 // 4096, pytest.approx(1.0, abs=1e-3))
    old = plan_schedule(dataclasses.replace(auto, batch_size=4096, epochs=1.0), n_avail=2304, max_width=1024)
    assert old.steps == 1 and old.too_short and len(old.warnings) == 2
    assert "1 optimiser step" in old.warnings[0] and "4,096 tokens seen for 1,024 latents" in old.warnings[1]
    tiny = plan_schedule(auto, n_avail=100, max_width=1024)  # capped at 100 passes: still too short, and flagged
    assert tiny.total_tokens == 10_000 and tiny.too_short and any("memorise" in w for w in tiny.warnings)


def test_too_short_run_is_flagged_in_results_page_and_cli(sparse_store, tmp_path, capsys):
    from sightline.cli import main

    rc = main(["sae", "train", str(sparse_store), "--site", "resid.1", "--out", str(tmp_path / "run"), "--width", "64",
               "--k", "4", "--batch-size", "4096", "--epochs", "1", "--threads", "1", "--no-progress"])
    assert rc == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sightline: warning: ")]
    assert len(err) == 1 and "too short: 1 optimiser step" in err[0]
    summary = json.loads((tmp_path / "run" / "results.json").read_text())["summary"]
    assert summary["too_short"] is True and summary["steps"] == 1 and summary["warnings"] == [err[0][20:]]
    assert "too short" in (tmp_path / "run" / "index.html").read_text()
    # the defaults on the same store: enough steps, no warning
    res = train_saes(SAETrainConfig(store=str(sparse_store), site="resid.1", out=str(tmp_path / "auto"), threads=1,
                                    saes=(SAEConfig(width=64, k=4),)), progress=False)
    assert res["steps"] >= 200 and res["too_short"] is False and res["warnings"] == []
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["batch_size"] == 0  # auto, as asked


def test_incomplete_store_is_refused_unless_allowed(tmp_path):
    from sightline.store import format as fmt

    path = write_store(tmp_path / "store", n_examples=12)
    m = json.loads((path / fmt.MANIFEST).read_text())
    m["n_examples"] = 20  # 8 examples never written: an interrupted extraction
    (path / fmt.MANIFEST).write_text(json.dumps(m))
    cfg = base_config(path, tmp_path / "run", total_tokens=256 * 2, saes=(SAEConfig(width=64, k=4),))
    with pytest.raises(UserError, match=r"is incomplete: 12 of 20 examples.*extract .*--resume"):
        train_saes(cfg, progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()
    res = train_saes(dataclasses.replace(cfg, allow_incomplete=True), progress=False)
    assert res["incomplete"] is True and res["store_counts"]["n_missing"] == 8
    assert any("incomplete" in w for w in res["warnings"])

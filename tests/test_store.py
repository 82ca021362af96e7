"""ActivationStore: round trips, shard arithmetic, ranks, kill-and-resume, errors, bounded memory, batches."""

from __future__ import annotations

import ast
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import store_worker as sw
from sightline.errors import UserError
from sightline.store import INDEX_COLUMNS, MODALITIES, ActivationStore, StoreWriter
from sightline.store import format as fmt

WORKER = str(Path(__file__).with_name("store_worker.py"))
N = 40  # examples in the synthetic stores


def expected(n: int = N, dtype=torch.float16):
    """What a complete store of the synthetic examples must read back as: tensors, index, written ids."""
    ids = [i for i in range(n) if not sw.is_skipped(i)]
    parts = [sw.make_example(i) for i in ids]
    tensors = {s: torch.cat([p[2][s].to(dtype) for p in parts]) for s in sw.SITES}
    index = np.concatenate([p[1] for p in parts])
    return tensors, index, ids


def assert_same_store(a: ActivationStore, b: ActivationStore) -> None:
    assert a.sites == b.sites
    for s in a.sites:
        assert torch.equal(a.tensor(s), b.tensor(s))
    assert np.array_equal(a.index, b.index)
    assert a.examples == b.examples
    assert a.skipped == b.skipped


def shard_dirs(path) -> list[Path]:
    return sorted((Path(path) / fmt.SHARDS).iterdir())


def no_leftovers(path) -> bool:
    """Every shard directory is committed and no temporary file is left anywhere."""
    all_files = [p.name for p in Path(path).rglob("*")]
    return all(fmt.is_committed(d) for d in shard_dirs(path)) and not any(fmt.TMP_MARK in f for f in all_files)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> ActivationStore:
    """The synthetic store written by one uninterrupted writer (fp16)."""
    path = tmp_path_factory.mktemp("ref") / "store"
    sw.write(path, n=N, shard_bytes=600)
    return ActivationStore.open(path)


# ---------------------------------------------------------------------- round trip
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip(tmp_path, dtype):
    torch_dtype = fmt.torch_dtype(dtype)
    sw.write(tmp_path / "s", n=N, shard_bytes=900, dtype=dtype)
    s = ActivationStore.open(tmp_path / "s")
    want, index, ids = expected(N, torch_dtype)
    assert len(shard_dirs(tmp_path / "s")) > 3  # the data really is spread over several shards
    assert s.sites == ["keys.1", "resid.2", "resid.10"]  # natural order
    assert s.dtype == torch_dtype and s.manifest["dtype"] == dtype
    assert s.manifest["sites"] == {k: list(v) for k, v in sw.SITES.items()}
    assert s.manifest["config"] == sw.CONFIG and s.manifest["format_version"] == fmt.FORMAT_VERSION
    for site in s.sites:
        got = s.tensor(site)
        assert got.dtype == torch_dtype and got.shape == (s.n_tokens, *sw.SITES[site])
        assert torch.equal(got, want[site])  # exact: the store holds the cast of what was given
    if dtype == "float32":
        assert torch.equal(s.tensor("resid.2"), torch.cat([sw.make_example(i)[2]["resid.2"] for i in ids]))
    assert s.index.dtype.names == INDEX_COLUMNS
    assert np.array_equal(np.stack([s.index[c] for c in INDEX_COLUMNS], axis=1), index)
    assert [e["example"] for e in s.examples] == ids and len(s) == len(ids)
    assert [e["example"] for e in s.skipped] == [i for i in range(N) if sw.is_skipped(i)]
    assert all(e["reason"] == "corrupt image" for e in s.skipped)
    assert s.complete and s.n_tokens == len(index)
    start = 0
    for e in s.examples:
        meta = sw.make_example(e["example"])[0]
        assert e == {**meta, "example": e["example"], "n_tokens": sw.n_tokens_of(e["example"]), "token_start": start}
        one = s.example(e["example"])
        for site in s.sites:
            assert torch.equal(one[site], want[site][start : start + e["n_tokens"]])
        assert np.array_equal(one["index"], s.index[start : start + e["n_tokens"]])
        start += e["n_tokens"]
    assert set(s.example(ids[3], sites="resid.2")) == {"resid.2", "index"}
    assert s.tensor("resid.2", dtype=torch.float32).dtype == torch.float32


def test_constants_match_token_layout():
    # read from the source so the test does not import every model adapter (and transformers)
    layout_py = Path(fmt.__file__).parents[1] / "models" / "layout.py"
    consts = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(layout_py.read_text()).body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id in ("INDEX_COLUMNS", "MODALITIES")
    }
    assert consts == {"INDEX_COLUMNS": INDEX_COLUMNS, "MODALITIES": MODALITIES}


def test_reading_one_site_touches_only_its_file(tmp_path, monkeypatch):
    sw.write(tmp_path / "s", n=12, shard_bytes=400)
    s = ActivationStore.open(tmp_path / "s")
    opened = []
    import safetensors

    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda f, *a, **k: (opened.append(Path(f).name), real(f, *a, **k))[1])
    s.tensor("resid.10")
    s.example(s.examples[2]["example"], sites=["resid.10"])
    list(s.iter_batches("resid.10", batch_size=7))
    assert opened and set(opened) <= {"acts.resid.10.safetensors", "index.safetensors"}


# ---------------------------------------------------------------------- shard arithmetic
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    counts=st.lists(st.integers(0, 12), min_size=1, max_size=14),
    shard_bytes=st.integers(1, 300),
    order_seed=st.integers(0, 1000),
)
def test_shard_offsets_property(counts, shard_bytes, order_seed):
    ids = np.random.default_rng(order_seed).permutation(len(counts)).tolist()  # added in any order
    with tempfile.TemporaryDirectory() as d:
        with StoreWriter(d + "/s", {"n_examples": len(counts)}, {"a": (2,)}, dtype="float32", shard_bytes=shard_bytes) as w:
            for i in ids:
                n = counts[i]
                index = np.zeros((n, 7), np.int64)
                index[:, 0], index[:, 1] = i, np.arange(n)
                acts = torch.stack([torch.full((n,), float(i)), torch.arange(n, dtype=torch.float32)], dim=1)
                w.add(i, {}, index, {"a": acts})
                assert w.buffered_bytes < shard_bytes
        s = ActivationStore.open(d + "/s")
        assert [e["example"] for e in s.examples] == list(range(len(counts)))
        assert [e["n_tokens"] for e in s.examples] == counts
        assert [e["token_start"] for e in s.examples] == np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
        assert s.n_tokens == sum(counts) and s.complete
        a = s.tensor("a")
        assert np.array_equal(a[:, 0].numpy(), s.index["example"]) and np.array_equal(a[:, 1].numpy(), s.index["position"])
        for e in s.examples:
            rows = slice(e["token_start"], e["token_start"] + e["n_tokens"])
            assert (s.index["example"][rows] == e["example"]).all()
            assert torch.equal(s.example(e["example"])["a"], a[rows])
        # per shard, the records tile the shard's rows exactly
        for name, rec in fmt.committed_shards(Path(d) / "s"):
            spans = sorted((e["token_start"], e["n_tokens"]) for e in rec["examples"])
            assert sum(n for _, n in spans) == rec["n_tokens"]
            assert all(s0 + n0 == s1 for (s0, n0), (s1, _) in zip(spans, spans[1:]))


# ---------------------------------------------------------------------- ranks
def test_ranks_in_process_match_one_writer(tmp_path, reference):
    for rank in (2, 0, 1):  # each rank joins the directory the others are filling, rank 0 not first
        sw.write(tmp_path / "s", rank=rank, world_size=3, n=N, shard_bytes=300)
    names = {d.name[:4] for d in shard_dirs(tmp_path / "s")}
    assert names == {"r000", "r001", "r002"}
    assert_same_store(ActivationStore.open(tmp_path / "s"), reference)


def test_two_processes_concurrently_match_one_writer(tmp_path, reference):
    procs = [
        subprocess.Popen([sys.executable, WORKER, str(tmp_path / "s"), "--rank", str(r), "--world-size", "2",
                          "--n", str(N), "--shard-bytes", "300"], stderr=subprocess.PIPE)
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    s = ActivationStore.open(tmp_path / "s")
    assert_same_store(s, reference)
    assert no_leftovers(tmp_path / "s")


def test_resume_with_a_different_world_size(tmp_path, reference):
    sw.write(tmp_path / "s", rank=0, world_size=2, n=N, shard_bytes=300, ids=range(N // 2))
    sw.write(tmp_path / "s", rank=1, world_size=2, n=N, shard_bytes=300, ids=range(N // 3))
    for rank in range(3):
        w = sw.write(tmp_path / "s", rank=rank, world_size=3, n=N, shard_bytes=300, resume=True)
    assert w.done == set(range(N))
    assert_same_store(ActivationStore.open(tmp_path / "s"), reference)


# ---------------------------------------------------------------------- kill and resume
@pytest.mark.parametrize("moment", ["before_commit", "anywhere"])
def test_kill_and_resume_is_exactly_once(tmp_path, reference, moment):
    path = tmp_path / "s"
    # before_commit: the worker hangs after writing its third shard's tensors, before the record;
    # anywhere: it writes slowly and is killed wherever it is after two commits
    extra = ["--hang-before-commit", "2"] if moment == "before_commit" else ["--sleep", "0.03"]
    proc = subprocess.Popen([sys.executable, WORKER, str(path), "--n", str(N), "--shard-bytes", "300", *extra],
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while True:
            dirs = shard_dirs(path) if (path / fmt.SHARDS).exists() else []
            pending = [d for d in dirs if not fmt.is_committed(d) and (d / fmt.INDEX_FILE).exists()]
            if sum(map(fmt.is_committed, dirs)) >= 2 and (pending or moment == "anywhere"):
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "worker never reached its third commit"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the reader ignores an uncommitted shard
    partial = ActivationStore.open(path)
    assert not partial.complete and 0 < len(partial) < len(reference)
    assert {e["example"] for e in partial.examples} < {e["example"] for e in reference.examples}
    # resuming deletes leftovers before writing anything, then finishes the rest exactly once
    w = StoreWriter(path, sw.manifest(N), sw.SITES, resume=True, shard_bytes=300)
    assert no_leftovers(path)
    if moment == "before_commit":
        assert not pending[0].exists()
    assert w.done == {e["example"] for e in partial.examples} | {e["example"] for e in partial.skipped}
    w.close()
    sw.write(path, n=N, shard_bytes=300, resume=True)
    assert no_leftovers(path)
    assert_same_store(ActivationStore.open(path), reference)


def test_leftovers_removed_only_by_their_owner(tmp_path):
    path = tmp_path / "s"
    sw.write(path, rank=0, world_size=2, n=N, shard_bytes=300, ids=range(10))
    shards = path / fmt.SHARDS
    for name in ("r000-000050", "r001-000050", "r007-000001"):  # killed writers' uncommitted shards
        (shards / name).mkdir()
        (shards / name / fmt.site_file("resid.2")).write_bytes(b"partial")
        (shards / name / (fmt.RECORD + fmt.TMP_MARK + "x")).write_text("{")
    (path / (fmt.MANIFEST + fmt.TMP_MARK + "r001-99")).write_text("{")
    StoreWriter(path, sw.manifest(N), sw.SITES, rank=1, world_size=2, resume=True).close()
    # rank 1 tidies its own, and leaves rank 0's (which may be mid-write right now)
    assert not (shards / "r001-000050").exists() and not (path / (fmt.MANIFEST + fmt.TMP_MARK + "r001-99")).exists()
    assert (shards / "r000-000050").exists() and (shards / "r007-000001").exists()
    StoreWriter(path, sw.manifest(N), sw.SITES, rank=0, world_size=2, resume=True).close()
    # rank 0 tidies its own and those of ranks beyond the world size
    assert no_leftovers(path)


# ---------------------------------------------------------------------- user errors
def test_existing_store_without_resume_is_refused(tmp_path):
    sw.write(tmp_path / "s", n=10)
    with pytest.raises(UserError, match=r"exists; pass --resume to continue it or choose another --out"):
        StoreWriter(tmp_path / "s", sw.manifest(10), sw.SITES)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists"):
        StoreWriter(tmp_path / "other", sw.manifest(10), sw.SITES)
    with pytest.raises(UserError, match="not an activation store"):
        StoreWriter(tmp_path / "other", sw.manifest(10), sw.SITES, resume=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_resume_on_a_missing_path_creates_it(tmp_path):
    w = sw.write(tmp_path / "new", n=10, resume=True)
    assert w.done == set(range(10)) and ActivationStore.open(tmp_path / "new").complete


def test_resume_with_a_different_config_names_the_keys(tmp_path):
    sw.write(tmp_path / "s", n=10)
    changed = sw.manifest(10)
    changed["config"] = {**sw.CONFIG, "layers": [1, 2, 11], "prompt_prefix": True}
    with pytest.raises(UserError, match=r"different configuration \(config\.layers, config\.prompt_prefix differ\)"):
        StoreWriter(tmp_path / "s", changed, sw.SITES, resume=True)
    with pytest.raises(UserError, match=r"dtype differ"):
        StoreWriter(tmp_path / "s", sw.manifest(10), sw.SITES, dtype="bf16", resume=True)
    with pytest.raises(UserError, match=r"sites\.resid\.2 differ"):
        StoreWriter(tmp_path / "s", sw.manifest(10), {**sw.SITES, "resid.2": (7,)}, resume=True)


def test_unknown_site_lists_the_available_ones(reference):
    with pytest.raises(UserError, match=r"site 'resid\.3' is not in store .*; available: keys\.1, resid\.2, resid\.10"):
        reference.tensor("resid.3")
    with pytest.raises(UserError, match="available"):
        reference.example(0, sites=["values.1"])
    with pytest.raises(UserError, match="available"):
        next(reference.iter_batches(["resid.2", "nope"]))
    with pytest.raises(UserError, match=r"example 4 is not in store .* \(skipped: corrupt image\)"):
        reference.example(4)


def test_open_rejects_what_is_not_a_store(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ActivationStore.open(tmp_path / "missing")
    with pytest.raises(UserError, match="not an activation store"):
        ActivationStore.open(tmp_path)
    sw.write(tmp_path / "s", n=5)
    m = json.loads((tmp_path / "s" / fmt.MANIFEST).read_text())
    (tmp_path / "s" / fmt.MANIFEST).write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(UserError, match="format_version 99"):
        ActivationStore.open(tmp_path / "s")


def test_exception_inside_with_commits_nothing_partial(tmp_path):
    path = tmp_path / "s"
    with pytest.raises(RuntimeError, match="capture failed"):
        with StoreWriter(path, sw.manifest(N), sw.SITES, shard_bytes=500) as w:
            for i in range(N):
                if not sw.is_skipped(i):
                    w.add(i, *sw.make_example(i))
                if i == 25:
                    committed = set(w.done) | w.in_flight  # a shard in flight holds whole examples: it commits
                    assert w.buffered_bytes > 0  # a partly filled shard is in memory
                    raise RuntimeError("capture failed")
    s = ActivationStore.open(path)
    assert {e["example"] for e in s.examples} == committed and len(committed) > 0
    assert no_leftovers(path)
    # and resume finishes it like an uninterrupted run
    sw.write(path, n=N, shard_bytes=500, resume=True)
    want, _, _ = expected()
    assert torch.equal(ActivationStore.open(path).tensor("keys.1"), want["keys.1"])


def test_interrupt_inside_with_commits_the_buffer(tmp_path):
    """Ctrl-C (or Interrupted, raised on SIGTERM) keeps every example added so far; resume repeats none."""
    from sightline.store.writer import Interrupted

    for exc in (KeyboardInterrupt, Interrupted):
        path = tmp_path / exc.__name__
        added = []
        with pytest.raises(exc):
            with StoreWriter(path, sw.manifest(N), sw.SITES, shard_bytes=1 << 30) as w:  # never full by bytes
                for i in range(N):
                    if not sw.is_skipped(i):
                        w.add(i, *sw.make_example(i))
                        added.append(i)
                    if i == 17:
                        assert w.done == set()  # all of it is still in memory
                        raise exc()
        s = ActivationStore.open(path)
        assert sorted(e["example"] for e in s.examples) == added and no_leftovers(path)
        sw.write(path, n=N, shard_bytes=1 << 30, resume=True)
        want, _, _ = expected()
        assert torch.equal(ActivationStore.open(path).tensor("keys.1"), want["keys.1"])


def test_shards_close_after_n_examples_or_t_seconds(tmp_path, monkeypatch):
    """shard_examples and shard_seconds bound the work a SIGKILL can lose, whatever shard_bytes is."""
    import sightline.store.writer as writer_mod

    with StoreWriter(tmp_path / "n", sw.manifest(N), sw.SITES, shard_bytes=1 << 30, shard_examples=4,
                     background=False) as w:
        for i in range(10):
            w.add(i, *sw.make_example(i)) if not sw.is_skipped(i) else w.skip(i, {}, "bad")
            assert len(w._buffer) < 4
    sizes = [len(fmt.read_json(d / fmt.RECORD)["examples"]) + len(fmt.read_json(d / fmt.RECORD)["skipped"])
             for d in shard_dirs(tmp_path / "n")]
    assert sizes == [4, 4, 2]
    clock = [100.0]
    monkeypatch.setattr(writer_mod.time, "monotonic", lambda: clock[0])
    with StoreWriter(tmp_path / "t", sw.manifest(N), sw.SITES, shard_bytes=1 << 30, shard_seconds=30,
                     background=False) as w:
        for i in (0, 1, 2, 3):
            w.add(i, *sw.make_example(i))
            clock[0] += 12.0  # the 4th example is added 36 s after the first: that shard closes
        assert w.done == {0, 1, 2, 3}
    assert len(shard_dirs(tmp_path / "t")) == 1
    with pytest.raises(ValueError, match="shard_examples"):
        StoreWriter(tmp_path / "bad", sw.manifest(N), sw.SITES, shard_examples=-1)


def test_writer_rejects_bad_examples(tmp_path):
    with StoreWriter(tmp_path / "s", sw.manifest(10), sw.SITES) as w:
        meta, index, tensors = sw.make_example(1)
        w.add(1, meta, index, tensors)
        with pytest.raises(ValueError, match="example 1 is already"):
            w.add(1, meta, index, tensors)
        with pytest.raises(ValueError, match="'example' must equal"):
            w.add(2, meta, index, tensors)
        with pytest.raises(ValueError, match="missing \\['resid.10'\\]"):
            w.add(3, {}, np.zeros((0, 7), int), {k: v for k, v in sw.make_example(3)[2].items() if k != "resid.10"})
        with pytest.raises(ValueError, match="outside range"):
            w.skip(10, {}, "bad")
        with pytest.raises(ValueError, match="reserved"):
            w.skip(5, {"n_tokens": 3}, "bad")


# ---------------------------------------------------------------------- memory
def test_buffer_stays_bounded_and_owns_its_bytes(tmp_path):
    shard_bytes, sites = 2000, {"x": (8,)}
    biggest = 0
    with StoreWriter(tmp_path / "s", {"n_examples": 300}, sites, dtype="float32", shard_bytes=shard_bytes) as w:
        for i in range(300):
            n = i % 17
            acts = torch.full((n, 8), float(i))
            w.add(i, {}, np.column_stack([np.full(n, i), np.zeros((n, 6), int)]), {"x": acts})
            acts += 1  # the caller reuses its tensor; the store must not see this
            biggest = max(biggest, n * 8 * 4)
            assert w.buffered_bytes < shard_bytes  # a shard is written as soon as the buffer reaches shard_bytes
    # every shard on disk is at most shard_bytes plus one example: the buffer's peak
    for _, rec in fmt.committed_shards(tmp_path / "s"):
        assert rec["n_tokens"] * 8 * 4 < shard_bytes + biggest
    s = ActivationStore.open(tmp_path / "s")
    assert len(fmt.committed_shards(tmp_path / "s")) >= s.n_tokens * 8 * 4 // (shard_bytes + biggest)
    assert torch.equal(s.tensor("x")[:, 0], torch.from_numpy(s.index["example"].astype(np.float32)))


def test_a_view_is_counted_and_stored_as_its_own_bytes(tmp_path):
    big = torch.randn(1000, 8)
    with StoreWriter(tmp_path / "s", {"n_examples": 1}, {"x": (8,)}, dtype="float32") as w:
        w.add(0, {}, np.zeros((2, 7), int), {"x": big[10:12]})
        assert w.buffered_bytes == 2 * 8 * 4
        assert w._buffer[0]["tensors"]["x"].untyped_storage().nbytes() == 2 * 8 * 4
    assert torch.equal(ActivationStore.open(tmp_path / "s").tensor("x"), big[10:12])


# ---------------------------------------------------------------------- streaming
def _rows(batches, site):
    """The batches of one site concatenated, with their index rows."""
    idx = np.concatenate([b["index"] for b in batches])
    acts = torch.cat([b[site] for b in batches])
    return acts, idx


def test_iter_batches_every_token_once(tmp_path, reference):
    s = reference
    starts = {e["example"]: e["token_start"] for e in s.examples}
    full = s.tensor("keys.1")
    # an uninterrupted single-rank store streams in example order
    batches = list(s.iter_batches(["keys.1", "resid.2"], batch_size=7))
    assert all(len(b["index"]) == 7 for b in batches[:-1]) and 0 < len(batches[-1]["index"]) <= 7
    acts, idx = _rows(batches, "keys.1")
    assert torch.equal(acts, full) and np.array_equal(idx, s.index)
    assert torch.equal(torch.cat([b["resid.2"] for b in batches]), s.tensor("resid.2"))
    # shuffled: a different order, each token once, rows still aligned with their index
    for seed in (0, 1):
        batches = list(s.iter_batches("keys.1", batch_size=7, shuffle=True, seed=seed, shuffle_shards=3))
        acts, idx = _rows(batches, "keys.1")
        rows = np.array([starts[e] + p - 3 for e, p in zip(idx["example"], idx["position"])])
        assert sorted(rows.tolist()) == list(range(s.n_tokens))
        assert not np.array_equal(rows, np.arange(s.n_tokens))
        assert torch.equal(acts, full[torch.from_numpy(rows)])
        assert all(len(b["index"]) == 7 for b in batches[:-1])
    again = list(s.iter_batches("keys.1", batch_size=7, shuffle=True, seed=1, shuffle_shards=3))
    assert np.array_equal(_rows(again, "keys.1")[1], idx)  # same seed, same order
    # modality filter: exactly the image tokens, each once
    for shuffle in (False, True):
        batches = list(s.iter_batches("resid.10", batch_size=5, shuffle=shuffle, modality="image"))
        acts, idx = _rows(batches, "resid.10")
        assert (idx["modality"] == 1).all() and len(idx) == (s.index["modality"] == 1).sum()
        rows = np.array([starts[e] + p - 3 for e, p in zip(idx["example"], idx["position"])])
        assert torch.equal(acts, s.tensor("resid.10")[torch.from_numpy(rows)])
        assert len(set(rows.tolist())) == len(rows)
    assert sum(len(b["index"]) for b in s.iter_batches("resid.2", modality=[0, 3])) == np.isin(s.index["modality"], [0, 3]).sum()


def test_iter_batches_on_a_multi_rank_store(tmp_path, reference):
    for rank in range(2):
        sw.write(tmp_path / "s", rank=rank, world_size=2, n=N, shard_bytes=250)
    s = ActivationStore.open(tmp_path / "s")
    for shuffle in (False, True):
        acts, idx = _rows(list(s.iter_batches("resid.2", batch_size=16, shuffle=shuffle)), "resid.2")
        order = np.lexsort((idx["position"], idx["example"]))
        assert np.array_equal(idx[order], reference.index)
        assert torch.equal(acts[torch.from_numpy(order)], reference.tensor("resid.2"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int32])
def test_streamed_safetensors_match_the_library(tmp_path, dtype):
    """Shards are streamed part by part; the safetensors library must read back the concatenation."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    parts = [(torch.randn(n, 3, 5, generator=g) * 100).to(dtype) for n in (4, 0, 7, 1)]
    path = tmp_path / "x.safetensors"
    fmt.save_tensor_atomic(path, "acts", parts, "t")
    assert torch.equal(load_file(str(path))["acts"], torch.cat(parts))
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_slice("acts")[4:9], torch.cat(parts)[4:9])
    assert not list(tmp_path.glob("*.tmp-*"))


def test_background_and_foreground_writes_agree(tmp_path):
    for bg in (True, False):
        with StoreWriter(tmp_path / str(bg), sw.manifest(N), sw.SITES, shard_bytes=700, background=bg) as w:
            for i in range(N):
                if not sw.is_skipped(i):
                    w.add(i, *sw.make_example(i))
    a, b = ActivationStore.open(tmp_path / "True"), ActivationStore.open(tmp_path / "False")
    assert np.array_equal(a.index, b.index)
    for site in a.sites:
        assert torch.equal(a.tensor(site), b.tensor(site))

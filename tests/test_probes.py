"""Linear probes: the batched solver against scikit-learn, pooling and labels against hand
computations, the run folder, directions, and validation on the model organism."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sightline.errors import UserError
from sightline.probes import (
    LogisticProbe,
    ProbeConfig,
    class_mean_direction,
    control_labels,
    load_directions,
    load_probes,
    load_vector,
    pool_features,
    probe_direction,
    resolve_labels,
    run_probes,
)
from sightline.probes.linear import stratified_split
from sightline.probes.metrics import per_class_accuracy, topk_accuracy
from sightline.store import ActivationStore, StoreWriter

sklearn = pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small solves on one thread: on a busy 2-core machine, two threads make them ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def clusters(n: int, d: int, k: int, snr: float, seed: int, layers: int = 1):
    """[layers, n, d] float32 Gaussian class clusters in correlated noise, and labels [n]."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    means = rng.normal(size=(k, d))
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    xs = [(snr * (i + 1) * means[y] + rng.normal(size=(n, d))) @ mix + rng.normal(size=d) * 3
          for i in range(layers)]
    return np.stack(xs).astype(np.float32), y


def sklearn_fit(x_nd, y, l2, tol=1e-10):
    """scikit-learn's probe on the same objective: standardise, C = 1 / (l2 n)."""
    sc = StandardScaler().fit(x_nd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = LogisticRegression(C=1.0 / (l2 * len(y)), tol=tol, max_iter=20000).fit(sc.transform(x_nd), y)
    return sc, m


def objective(w_kd, b_k, xs_nd, y, l2):
    logits = xs_nd @ w_kd.T + b_k
    logits = logits - logits.max(1, keepdims=True)
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -lp[np.arange(len(y)), y].mean() + 0.5 * l2 * (w_kd ** 2).sum()


# --------------------------------------------------------------------------------------- solver
@pytest.mark.parametrize("n,d,rotate", [(150, 64, None), (60, 200, None), (150, 64, False)])
def test_solver_reaches_sklearns_optimum(n, d, rotate):
    """Same objective, same optimum: objective within 1e-5 relative, predictions equal, on both
    rotation routes (Gram n <= d, covariance n > d) and without rotation."""
    x, y = clusters(n, d, 4, 0.3, seed=1)
    l2 = 1e-2
    est = LogisticProbe(l2_grid=[l2], tol=1e-7, max_iter=3000, device="cpu", dtype=torch.float64, rotate=rotate)
    est.fit(x[0], y)
    sc, m = sklearn_fit(x[0], y, l2)
    xs = sc.transform(x[0])
    ours = objective(est.coef_.numpy(), est.intercept_.numpy(), xs, y, l2)
    theirs = objective(m.coef_, m.intercept_, xs, y, l2)
    assert abs(ours - theirs) <= 1e-5 * theirs
    assert np.allclose(est.mean_[0].numpy(), sc.mean_, atol=1e-6)
    assert np.array_equal(est.predict(x[0]).numpy(), m.predict(xs))


def test_float32_solver_matches_sklearn_predictions():
    x, y = clusters(300, 96, 6, 0.15, seed=2)
    tr, te = np.arange(200), np.arange(200, 300)
    est = LogisticProbe(l2_grid=[1e-3], device="cpu").fit(x[0, tr], y[tr])
    sc, m = sklearn_fit(x[0, tr], y[tr], 1e-3)
    agree = (est.predict(x[0, te]).numpy() == m.predict(sc.transform(x[0, te]))).mean()
    assert agree >= 0.98


def test_batched_fit_equals_one_at_a_time():
    """Sites fitted together give the same probes as fitted alone (each stops on its own)."""
    x, y = clusters(120, 40, 3, 0.2, seed=3, layers=3)
    grid = (1e-1, 1e-2, 1e-3)
    together = LogisticProbe(l2_grid=grid, device="cpu", dtype=torch.float64, tol=1e-8).fit(
        x[:, :80], y[:80], x[:, 80:], y[80:])
    for b in range(3):
        alone = LogisticProbe(l2_grid=grid, device="cpu", dtype=torch.float64, tol=1e-8).fit(
            x[b, :80], y[:80], x[b, 80:], y[80:])
        assert float(alone.l2_) == float(together.l2_[b])
        assert torch.allclose(alone.coef_, together.coef_[b], atol=2e-4, rtol=1e-3)


def test_l2_is_the_best_on_validation_and_two_label_sets_fit_together():
    x, y = clusters(200, 30, 4, 0.5, seed=4)
    rng = np.random.default_rng(0)
    y2 = np.stack([y, rng.permutation(y)])
    grid = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)
    est = LogisticProbe(l2_grid=grid, device="cpu").fit(x[0, :140], y2[:, :140], x[0, 140:], y2[:, 140:])
    assert est.coef_.shape == (2, 4, 30)
    for t in range(2):
        acc = est.val_accuracy_[t].numpy()
        loss = est.val_loss_[t].numpy()
        best = max(range(len(grid)), key=lambda i: (round(acc[i], 9), -loss[i]))
        assert float(est.l2_[t]) == est.l2_path_[best]
    # the permuted labels carry nothing: held-out accuracy near chance, the task's far above
    assert est.val_accuracy_[0].max() > 0.8 and est.val_accuracy_[1].max() < 0.5


def test_stratified_split_keeps_groups_whole_and_classes_balanced():
    y = np.repeat(np.arange(4), 30)
    groups = np.arange(120) // 3  # three rows per image
    val, test, train = stratified_split(y, [0.2, 0.2], seed=5, groups=groups)
    assert sorted(np.concatenate([val, test, train]).tolist()) == list(range(120))
    for a, b in ((val, test), (val, train), (test, train)):
        assert not set(groups[a]) & set(groups[b])
    for part, frac in ((val, 0.2), (test, 0.2)):
        counts = np.bincount(y[part], minlength=4)
        assert all(abs(c - frac * 30) <= 3 for c in counts)
    assert np.array_equal(stratified_split(y, [0.2, 0.2], 5, groups)[1], test)  # seeded


def test_control_labels_keep_class_frequencies_and_groups():
    y = np.repeat(np.arange(5), [10, 20, 30, 5, 15])
    groups = np.arange(80) // 2
    c = control_labels(y, seed=0, groups=groups)
    assert np.array_equal(np.bincount(c[::2], minlength=5), np.bincount(y[::2], minlength=5))
    assert np.array_equal(c[::2], c[1::2])  # one label per group
    assert (c != y).mean() > 0.5
    assert np.array_equal(c, control_labels(y, seed=0, groups=groups))


def test_topk_and_per_class_accuracy_against_sklearn():
    from sklearn.metrics import recall_score, top_k_accuracy_score

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 7))
    y = rng.integers(0, 7, 50)
    for k in (1, 3, 5):
        assert float(topk_accuracy(torch.tensor(logits), torch.tensor(y), k)) == pytest.approx(
            top_k_accuracy_score(y, logits, k=k, labels=np.arange(7)))
    pc = per_class_accuracy(logits.argmax(1), y, 7)
    assert np.allclose(pc, recall_score(y, logits.argmax(1), average=None, labels=np.arange(7)))


# ---------------------------------------------------------------------------------- a hand store
SITES = {"resid.0": (8,), "resid.1": (8,), "keys.1": (2, 4)}


def write_store(path: Path, n: int = 120, k: int = 3, seed: int = 0) -> tuple[Path, dict]:
    """A store of n examples, 4 image tokens plus 1 text token each; resid.1 and keys.1 carry the
    class in token 2 (of 4) only, resid.0 carries nothing; labels in `label` and meta.facts."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % k
    truth = {"acts": {s: [] for s in SITES}, "labels": labels}
    manifest = {"n_examples": n, "dataset": {"root": str(path), "kind": "jsonl"}}
    with StoreWriter(path, manifest, SITES, dtype="float32") as w:
        for i in range(n):
            n_tok = 5
            index = np.zeros((n_tok, 7), dtype=np.int64)
            index[:, 0] = i
            index[:, 1] = np.arange(n_tok)
            index[:, 2] = [1, 1, 1, 1, 0]  # four image tokens then a text token
            index[:, 3] = [0, 0, 0, 0, -1]
            index[:, 5] = [0, 0, 1, 1, -1]
            index[:, 6] = [0, 1, 0, 1, -1]
            tensors = {}
            for s, shape in SITES.items():
                x = rng.normal(size=(n_tok, int(np.prod(shape)))).astype(np.float32)
                if s != "resid.0":
                    x[2, labels[i]] += 8.0
                tensors[s] = torch.from_numpy(x).reshape(n_tok, *shape)
                truth["acts"][s].append(x)
            meta = {"path": f"img{i // 2}.png" if i < 20 else f"img{i}.png", "label": f"c{labels[i]}",
                    "meta": {"facts": {"objects": [{"shape": f"s{labels[i]}"}]}, "coin": int(rng.integers(2)),
                             "qtype": "shape" if i % 2 else "colour"}}
            w.add(i, meta, index, tensors)
    return path, truth


@pytest.fixture(scope="module")
def hand_store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("hand") / "store")


@pytest.mark.parametrize("pooling", ["mean", "max", "last", "token"])
def test_pooling_equals_numpy(hand_store, pooling):
    path, truth = hand_store
    store = ActivationStore.open(path)
    ids = [3, 0, 7]
    f = pool_features(store, list(SITES), ids, pooling=pooling)
    for s in SITES:
        img = np.stack([truth["acts"][s][i][:4] for i in ids])  # [3, 4 image tokens, d]
        want = {"mean": img.mean(1), "max": img.max(1), "last": img[:, 3],
                "token": img.reshape(-1, img.shape[-1])}[pooling]
        assert np.allclose(f.acts[s].numpy(), want, atol=1e-6)
    assert f.example_ids.tolist() == ([3, 0, 7] if pooling != "token" else [3] * 4 + [0] * 4 + [7] * 4)


def test_labels_resolve_from_fields_meta_and_dotted_paths(hand_store):
    store = ActivationStore.open(hand_store[0])
    ex = store.examples[:4]
    assert resolve_labels(ex, "label") == ["c0", "c1", "c2", "c0"]
    assert resolve_labels(ex, "meta.facts.objects.0.shape") == ["s0", "s1", "s2", "s0"]
    assert resolve_labels(ex, "facts.objects.0.shape") == ["s0", "s1", "s2", "s0"]
    assert resolve_labels(ex, "qtype") == ["colour", "shape", "colour", "shape"]
    with pytest.raises(UserError, match="no example in the store has label 'facts.objects.1.shape'"):
        resolve_labels(ex, "facts.objects.1.shape")
    with pytest.raises(UserError, match=r"no example in the store has label 'shapes'; available: .*label.*meta\.facts"):
        resolve_labels(ex, "shapes")
    with pytest.raises(UserError, match="is a dict, not a value"):
        resolve_labels(ex, "meta.facts.objects.0")


def test_run_writes_a_complete_probe_folder(hand_store, tmp_path):
    path, truth = hand_store
    cfg = ProbeConfig(store=str(path), label="label", out=str(tmp_path / "run"), progress=False, device="cpu")
    res = run_probes(cfg)
    out = Path(res["out"])
    assert res.path == out
    for name in ("config.json", "results.json", "index.html", "figures/accuracy_vs_layer.png", "probes.safetensors",
                 "directions.safetensors", "directions.json"):
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    card = json.loads((out / "results.json").read_text())
    assert ProbeConfig.from_dict(json.loads((out / "config.json").read_text())) == cfg
    assert card["classes"] == ["c0", "c1", "c2"]
    assert sum(card["split_sizes"].values()) == 120
    # the signal sites decode, the empty one does not; the control task stays near chance
    m = card["metrics"]["sites"]
    assert m["resid.1"]["test"]["top1"] >= 0.95 and m["keys.1"]["test"]["top1"] >= 0.95
    assert m["resid.0"]["test"]["top1"] <= 0.6
    assert m["resid.1"]["control"]["test_top1"] <= 0.6 and m["resid.1"]["selectivity"] >= 0.35
    assert res["best_site"] in ("resid.1", "keys.1")
    # splits: the examples that share an image never straddle two splits
    splits = card["splits"]["examples"]
    where = {i: name for name, ids in splits.items() for i in ids}
    for i in range(0, 20, 2):
        assert where[i] == where[i + 1]
    # saved probes reproduce the reported test accuracy on the raw activations
    probes = load_probes(out)
    acts = ActivationStore.open(path)
    f = pool_features(acts, ["keys.1"], splits["test"])
    pred = probes["keys.1"].predict(f.acts["keys.1"])
    want = [f"c{truth['labels'][i]}" for i in splits["test"]]
    assert np.mean([p == w for p, w in zip(pred, want)]) == pytest.approx(m["keys.1"]["test"]["top1"])
    # directions: "{site}/{class}", differences equal differences of training class means
    dirs, dcard = load_directions(out)
    assert set(dirs) == set(SITES) and set(dirs["resid.1"]) == {"c0", "c1", "c2"}
    ftr = pool_features(acts, ["resid.1"], splits["train"])
    ytr = truth["labels"][splits["train"]]
    mu = [ftr.acts["resid.1"][torch.from_numpy(ytr == c)].double().mean(0) for c in range(3)]
    assert torch.allclose(dirs["resid.1"]["c2"] - dirs["resid.1"]["c0"], (mu[2] - mu[0]).float(), atol=1e-5)
    assert "dir[t] - dir[s] = mu_t - mu_s" in dcard["definition"]
    # steering reads the same file
    from sightline.steer.vectors import load_directions as steer_load

    flat = steer_load(out / "directions.safetensors")
    assert torch.equal(flat["resid.1/c1"], dirs["resid.1"]["c1"])
    # a second run into the same folder is refused, then allowed with overwrite
    with pytest.raises(UserError, match="exists and is not empty; pass --overwrite"):
        run_probes(cfg)
    run_probes(ProbeConfig(**{**cfg.to_dict(), "overwrite": True, "sites": "resid", "layers": "1",
                              "l2_grid": (1e-2,), "control": False}))
    assert list(json.loads((out / "results.json").read_text())["metrics"]["sites"]) == ["resid.1"]


def test_run_with_where_filter_token_pooling_and_user_errors(hand_store, tmp_path):
    path, _ = hand_store
    base = dict(store=str(path), progress=False, device="cpu")
    res = run_probes(ProbeConfig(**base, label="facts.objects.0.shape", where="qtype=shape", pooling="token",
                                 sites="resid.1", out=str(tmp_path / "tok")))
    assert res["n_rows"] == 60 * 4  # half the examples, four image tokens each
    assert res["classes"] == ["s0", "s1", "s2"]
    with pytest.raises(UserError, match="is not in store .*available: keys.1, resid.0, resid.1"):
        run_probes(ProbeConfig(**base, sites="values.3", out=str(tmp_path / "x")))
    with pytest.raises(UserError, match="unknown --pooling 'median'"):
        run_probes(ProbeConfig(**base, pooling="median", out=str(tmp_path / "x")))
    with pytest.raises(UserError, match="is per token: use --pooling token"):
        run_probes(ProbeConfig(**base, label="mask.shape", out=str(tmp_path / "x")))
    with pytest.raises(UserError, match="--where 'qtype=count' matches no example"):
        run_probes(ProbeConfig(**base, where="qtype=count", out=str(tmp_path / "x")))
    with pytest.raises(UserError, match="at least two classes"):
        run_probes(ProbeConfig(**base, label="qtype", where="qtype=shape", out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


def test_directions_from_class_means_probes_and_files(tmp_path):
    from safetensors.torch import save_file

    x, y = clusters(90, 12, 3, 0.5, seed=6)
    acts = torch.from_numpy(x[0])
    v = class_mean_direction(acts, y, ["a", "b", "c"], target="c", source="a")
    want = x[0][y == 2].mean(0) - x[0][y == 0].mean(0)
    assert np.allclose(v.numpy(), want / np.linalg.norm(want), atol=1e-5)
    est = LogisticProbe(l2_grid=[1e-2], device="cpu").fit(x[0], y)
    p = est.probe(classes=["a", "b", "c"])
    u = probe_direction(p, "c", "a", normalise=False)
    assert torch.allclose(u, (p.weight[2] - p.weight[0]) / p.std, atol=1e-5)
    # moving along the probe direction raises logit c against logit a
    lg0, lg1 = p.decision_function(acts[:1]), p.decision_function(acts[:1] + u)
    assert (lg1[0, 2] - lg1[0, 0]) > (lg0[0, 2] - lg0[0, 0])
    save_file({"v": v}, str(tmp_path / "v.safetensors"))
    np.save(tmp_path / "v.npy", v.numpy())
    (tmp_path / "v.json").write_text(json.dumps(v.tolist()))
    for name in ("v.safetensors", "v.npy", "v.json"):
        assert torch.allclose(load_vector(tmp_path / name), v)
    save_file({"v": v, "w": v.clone()}, str(tmp_path / "two.safetensors"))
    with pytest.raises(UserError, match="holds 2 tensors"):
        load_vector(tmp_path / "two.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        load_vector(tmp_path / "nope.npy")


def test_mask_token_labels_match_the_models_own_layout(tiny_checkpoint, tmp_path):
    """mask.shape labels (scenes re-drawn from world.json, grids from the store's layout JSON) equal
    mask_to_tokens on the adapter's own TokenLayout."""
    from sightline.data.synthetic import World, WorldConfig, export_imagefolder
    from sightline.extract import ExtractConfig, extract
    from sightline.models import load_model, mask_to_tokens
    from sightline.probes.features import synthetic_token_labels

    data = export_imagefolder(tmp_path / "data", seed=3, n=6, config=WorldConfig(n_objects=1), attribute="shape")
    ckpt = tiny_checkpoint("llava")
    path = extract(ExtractConfig(model=ckpt, data=str(data), out=str(tmp_path / "store"), sites="resid",
                                 layers="0", progress=False))
    store = ActivationStore.open(path)
    rows = store.index[store.index["modality"] == 1]
    labels = synthetic_token_labels(store, rows, "shape", min_cover=0.5)
    adapter = load_model(ckpt)
    world = World(3, WorldConfig(n_objects=1))
    seen = set()
    for ex in store.examples:
        scene = world.scene(int(Path(ex["path"]).stem))
        lay = adapter.prepare([scene.to_pil()], [adapter.render_prompt(None)]).layouts[0]
        cover = mask_to_tokens(lay, scene.class_mask > 0)
        for j in np.flatnonzero(rows["example"] == ex["example"]):
            f = cover[rows["row"][j], rows["col"][j]]
            want = scene.objects[0].shape if f >= 0.5 else "background" if f <= 0.5 else None
            assert labels[j] == want
            seen.add(want)
    assert "background" in seen and len(seen - {"background", None}) >= 1


# ------------------------------------------------------------------------ the model organism
@pytest.fixture(scope="module")
def organism_probes(tmp_path_factory):
    """A store of 800 one-object scenes through the shipped organism (resid.0..4), probed for
    shape, for colour and for a coin the images do not carry. Objects of all three sizes."""
    from sightline.data.synthetic import WorldConfig, export_jsonl
    from sightline.extract import ExtractConfig, extract
    from sightline.organism import checkpoint_path

    root = tmp_path_factory.mktemp("organism_probes")
    manifest = export_jsonl(root / "data", seed=11, n=800, config=WorldConfig(n_objects=1),
                            qtypes=("shape",), per_image=1)
    rng = np.random.default_rng(0)
    lines = [json.loads(s) for s in manifest.read_text().splitlines()]
    for rec in lines:
        rec["coin"] = ["heads", "tails", "edge", "side"][int(rng.integers(4))]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    store = extract(ExtractConfig(model=str(checkpoint_path()), data=str(manifest), out=str(root / "store"),
                                  prompt="What shape is shown?", sites="resid", layers="all", batch_size=32,
                                  progress=False))
    runs = {}
    for name, label in (("shape", "facts.objects.0.shape"), ("colour", "facts.objects.0.colour"),
                        ("coin", "coin")):
        runs[name] = run_probes(ProbeConfig(store=str(store), label=label, out=str(root / name), progress=False,
                                            device="cpu"))
    return root, store, runs


def test_organism_shape_is_linearly_decodable(organism_probes):
    _, _, runs = organism_probes
    r = runs["shape"]
    assert len(r["classes"]) == 8
    # measured: 0.975 at resid.0, 0.957-0.963 at resid.1-4 (the organism itself names 98% of single shapes)
    assert r["best_top1"] >= 0.95, r["sites"]
    assert runs["colour"]["best_top1"] >= 0.95, runs["colour"]["sites"]


def test_organism_probes_are_selective(organism_probes):
    r = organism_probes[2]["shape"]
    best = r["sites"][r["best_site"]]
    assert best["control_test_top1"] <= 0.3  # 8 classes: chance 0.125
    assert best["selectivity"] >= 0.65


def test_organism_coin_stays_at_chance(organism_probes):
    r = organism_probes[2]["coin"]
    assert len(r["classes"]) == 4
    assert max(s["test_top1"] for s in r["sites"].values()) <= 0.4  # chance 0.25; 160 test images


def test_organism_probe_accuracy_agrees_with_sklearn(organism_probes):
    root, store_path, runs = organism_probes
    store = ActivationStore.open(store_path)
    card = json.loads((root / "shape" / "results.json").read_text())
    splits = card["splits"]["examples"]
    labels = {e["example"]: e["meta"]["facts"]["objects"][0]["shape"] for e in store.examples}
    for site, info in card["sites"].items():
        f = {k: pool_features(store, [site], splits[k]).acts[site].numpy() for k in ("train", "test")}
        ytr = [labels[i] for i in splits["train"]]
        yte = [labels[i] for i in splits["test"]]
        sc, m = sklearn_fit(f["train"], np.array(ytr), info["l2"], tol=1e-8)
        acc = (m.predict(sc.transform(f["test"])) == np.array(yte)).mean()
        assert abs(acc - info["test_top1"]) <= 0.01 + 1e-9, (site, acc, info["test_top1"])


def test_probe_run_folder_follows_the_output_convention(hand_store, tmp_path, monkeypatch):
    """config.json round-trips, results.json has the summary, figures/ and index.html exist; an error
    mid-run leaves no output folder."""
    from sightline.report.files import RunResult

    path, _ = hand_store
    cfg = ProbeConfig(store=str(path), label="label", out=str(tmp_path / "run"), progress=False, device="cpu",
                      sites="resid", layers="1", l2_grid=(1e-2,), control=False)
    res = run_probes(cfg)
    assert isinstance(res, RunResult) and res.path == tmp_path / "run"
    assert ProbeConfig.from_dict(json.loads((res.path / "config.json").read_text())) == cfg
    results = json.loads((res.path / "results.json").read_text())
    assert results["summary"] == json.loads(json.dumps(res.summary)) and results["summary"]["best_site"] == "resid.1"
    assert [p.name for p in (res.path / "figures").iterdir()] == ["accuracy_vs_layer.png"]
    page = (res.path / "index.html").read_text()
    assert "figures/accuracy_vs_layer.png" in page and "resid.1" in page

    import sightline.report.probes as figs

    def broken(*a, **k):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(figs, "plot_accuracy_vs_layer", broken)
    with pytest.raises(RuntimeError, match="figure failed"):
        run_probes(ProbeConfig(**{**cfg.to_dict(), "out": str(tmp_path / "broken")}))
    assert not (tmp_path / "broken").exists() and not (tmp_path / "broken.partial").exists()


def _incomplete_copy(path: Path, dst: Path, planned: int) -> Path:
    """A copy of a store whose manifest planned `planned` examples (more than were written): an interrupted
    extraction as the reader sees it."""
    import shutil

    from sightline.store import format as fmt

    shutil.copytree(path, dst)
    m = json.loads((dst / fmt.MANIFEST).read_text())
    m["n_examples"] = planned
    (dst / fmt.MANIFEST).write_text(json.dumps(m))
    return dst


def test_probe_refuses_an_incomplete_store_unless_allowed(hand_store, tmp_path):
    path = _incomplete_copy(hand_store[0], tmp_path / "partial", planned=200)
    base = dict(store=str(path), label="label", sites="resid", layers="1", l2_grid=(1e-2,), control=False,
                progress=False, device="cpu")
    with pytest.raises(UserError, match=r"store .*partial is incomplete: 120 of 200 examples.*--resume"):
        run_probes(ProbeConfig(**base, out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
    res = run_probes(ProbeConfig(**base, out=str(tmp_path / "run"), allow_incomplete=True))
    saved = res.results["summary"]
    assert saved["incomplete"] is True
    assert saved["store_counts"] == {"n_planned": 200, "n_written": 120, "n_skipped": 0, "n_missing": 80}
    assert len(saved["warnings"]) == 1 and "incomplete" in saved["warnings"][0]
    assert "Warning" in res.html.read_text()
    # a complete store: no warning, incomplete false
    ok = run_probes(ProbeConfig(**{**base, "store": str(hand_store[0])}, out=str(tmp_path / "ok")))
    assert ok["incomplete"] is False and ok["warnings"] == []


def test_top5_only_with_more_than_five_classes(hand_store, tmp_path):
    """3 classes: top-5 is 1 by construction, so it is null in results.json and absent from the page;
    the best top-1 comes with its chance level."""
    res = run_probes(ProbeConfig(store=str(hand_store[0]), label="label", sites="resid", layers="1", l2_grid=(1e-2,),
                                 control=False, out=str(tmp_path / "run"), progress=False, device="cpu"))
    assert res["best_top5"] is None and res["sites"]["resid.1"]["test_top5"] is None
    assert res.results["metrics"]["sites"]["resid.1"]["test"]["top5"] is None
    assert "top-5" not in res.html.read_text() and "best_top5" not in res.html.read_text()
    assert res["best_top1_chance"] == pytest.approx(max(res["chance"].values()))
    from sightline.probes.metrics import site_metrics

    logits = torch.randn(40, 7)
    y = np.arange(40) % 7
    m = site_metrics(logits, y, [f"c{i}" for i in range(7)])
    assert m["top5"] == pytest.approx(float(topk_accuracy(logits, torch.from_numpy(y), 5)))

"""SAE analysis: AUROC against scikit-learn, metrics and modality split against a direct computation over the
whole store, top activations against brute force, token ids against the processor, answer NLL against HF's
own loss, loss recovered at its two ends, task accuracy with the SAE spliced in (choice scoring against HF's
loss, an exact reconstruction changing no answer, zeros dropping the organism's shape answers to chance), the
analysis job's files, and the organism validation (sparse probing of shapes and colours, shared-latent
fraction at every layer)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from sightline.errors import UserError
from sightline.sae.analyze import SAEAnalyzeConfig, analyze_sae, analyze_saes
from sightline.sae.features import (
    IMAGE_CODES,
    TEXT,
    StoreTokens,
    TopActivations,
    iter_example_batches,
    iter_latents,
    per_example_max,
    word_positions,
)
from sightline.sae.metrics import (
    SparseScores,
    TaskItem,
    answer_items,
    answer_nll,
    auroc,
    loss_recovered,
    reconstruction_metrics,
    sparse_probe,
    task_accuracy,
    task_answers,
    task_items,
)
from sightline.sae.models import ARCHITECTURES, SAEConfig
from sightline.sae.modality import ModalityStats, example_concepts, sharing

GROUP_CODES = {"image": (1, 2), "text": (0,), "special": (3,)}


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tmp_path_factory):
    """A tiny LLaVA, a small synthetic JSONL (2 questions per image) and its store of every position."""
    from sightline.data.synthetic import WorldConfig, export_jsonl
    from sightline.extract import ExtractConfig, extract
    from sightline.models import load_model
    from sightline.store import ActivationStore

    torch.manual_seed(0)
    ck = tiny_checkpoint("llava")
    root = tmp_path_factory.mktemp("sae_analysis")
    manifest = export_jsonl(root / "data", seed=3, n=8, config=WorldConfig(image_size=56),
                            qtypes=("shape", "colour"), per_image=2)
    extract(ExtractConfig(model=ck, data=str(manifest), out=str(root / "store"), positions="all", sites="resid",
                          dtype="float32", batch_size=4, progress=False))
    return {"adapter": load_model(ck), "store": ActivationStore.open(root / "store"), "manifest": manifest,
            "root": root}


def make_sae(store, site: str, width: int = 48, k: int = 4, seed: int = 0):
    """A TopK SAE (the real class) with random unit decoder rows, W_enc = W_dec^T, b_dec = the data mean."""
    x = store.tensor(site).float()
    sae = ARCHITECTURES["topk"](SAEConfig(arch="topk", d_in=x.shape[1], width=width, k=k, lr=1e-3, site=site))
    with torch.no_grad():
        sae.reset_parameters(torch.Generator().manual_seed(seed))
        sae.b_dec.copy_(x.mean(0))
    return sae.eval()


def _direct(sae, store, site):
    """Latents and reconstructions of every stored token at once (the reference)."""
    x = store.tensor(site).double()
    with torch.no_grad():
        f = sae.encode(x.float()).double()
        xh = sae.decode(f.float()).double()
    return x.numpy(), xh.numpy(), f.numpy(), store.index


# ---------------------------------------------------------------------------------------------- AUROC
def test_auroc_equals_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 200))
        s = rng.integers(0, 6, n).astype(float) if trial % 2 else rng.normal(size=n)  # many ties, or none
        y = rng.random(n) < rng.uniform(0.1, 0.9)
        if y.all() or not y.any():
            continue
        assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(auroc([1.0, 2.0], [True, True]))


def test_sparse_auroc_equals_dense_and_sklearn_on_subsets():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    n, w = 80, 9
    dense = np.where(rng.random((n, w)) < 0.3, rng.integers(1, 4, (n, w)).astype(np.float32), 0.0)
    dense[:, 4] = 0.0  # a dead latent: every score tied
    y = rng.random((n, 3)) < 0.4
    sc = SparseScores(w)
    sc.add(torch.as_tensor(dense[:50]))
    sc.add(torch.as_tensor(dense[50:]))
    np.testing.assert_array_equal(sc.dense(), dense)
    rows = np.sort(rng.choice(n, 45, replace=False))
    for sub in (None, rows):
        got = sc.auroc(y if sub is None else y[sub], rows=sub)
        dd, yy = (dense, y) if sub is None else (dense[sub], y[sub])
        for j in range(w):
            for c in range(3):
                assert got[j, c] == pytest.approx(roc_auc_score(yy[:, c], dd[:, j]), abs=1e-12)
    assert np.allclose(sc.auroc(y)[4], 0.5)


def test_sparse_probe_scores_the_held_out_half():
    """The latent is chosen on the train items; its AUROC is reported on the test items."""
    train, test = np.arange(0, 40, 2), np.arange(1, 40, 2)
    y = np.zeros((40, 1), bool)
    y[[0, 4, 8, 12, 16, 1, 5, 9, 13, 17], 0] = True  # 5 positives in each half
    s = np.zeros((40, 2), np.float32)
    s[y[:, 0], 0] = 2.0  # latent 0: perfect on the test half...
    s[0, 0] = 0.0  # ...but one train positive missed: train AUROC 0.9
    s[train, 1] = y[train, 0] * 3.0  # latent 1: perfect on the train half (AUROC 1.0, so it is chosen)
    s[test, 1] = np.arange(20) % 3  # latent 1: unrelated to the labels on the test half
    sc = SparseScores(2)
    sc.add(torch.as_tensor(s))
    res = sparse_probe(sc, y, train, test, ["c"], threshold=0.9)
    rec = res["per_label"]["c"]
    assert rec["latent"] == 1 and rec["auroc_train"] == 1.0
    assert rec["auroc_test"] == pytest.approx(auroc(s[test, 1], y[test, 0]))
    assert rec["auroc_test"] < 0.9 and res["coverage"] == 0.0
    assert rec["best_auroc_test_any_latent"] == 1.0


# ------------------------------------------------------------------------------------ streaming pass
@pytest.mark.parametrize("batch_size", [1, 7, 10_000])
def test_example_batches_never_split_an_example(tiny, batch_size):
    store = tiny["store"]
    seen, rows = [], []
    for x, idx in iter_example_batches(store, "resid.1", batch_size=batch_size):
        ex = idx["example"]
        assert len(set(ex.tolist()) & set(seen)) == 0  # no example continues into a later batch
        seen += sorted(set(ex.tolist()))
        rows.append(x)
    assert sorted(seen) == [e["example"] for e in store.examples]
    torch.testing.assert_close(torch.cat(rows), store.tensor("resid.1"), rtol=0, atol=0)


def test_reconstruction_metrics_equal_direct_computation(tiny):
    store = tiny["store"]
    sae = make_sae(store, "resid.1")
    got = reconstruction_metrics(sae, store, batch_size=13, dense_threshold=0.2)
    x, xh, f, idx = _direct(sae, store, "resid.1")
    for g, codes in {**GROUP_CODES, "all": (0, 1, 2, 3)}.items():
        m = np.isin(idx["modality"], codes)
        assert got[g]["n_tokens"] == int(m.sum()) > 0
        xe, xhe, fe = x[m], xh[m], f[m]
        assert got[g]["mse"] == pytest.approx(((xe - xhe) ** 2).mean(), rel=1e-5)
        fvu = ((xe - xhe) ** 2).sum() / ((xe - xe.mean(0)) ** 2).sum()
        assert got[g]["fvu"] == pytest.approx(fvu, rel=1e-4)
        assert got[g]["l0"] == pytest.approx((fe > 0).sum(1).mean(), rel=1e-9)
        assert got[g]["n_dead"] == int(((fe > 0).sum(0) == 0).sum())
        assert got[g]["n_dense"] == int(((fe > 0).mean(0) > 0.2).sum())
    assert got["all"]["l0"] == pytest.approx(4.0)  # TopK k=4 (the data give every token 4 positive latents)


def test_modality_split_and_fractions(tiny):
    store = tiny["store"]
    sae = make_sae(store, "resid.2", seed=1)
    stats = ModalityStats(sae.W_dec.shape[0])
    for b in iter_latents(sae, store, batch_size=11):
        stats.update(b)
    _, _, f, idx = _direct(sae, store, "resid.2")
    mi = f[np.isin(idx["modality"], IMAGE_CODES)].mean(0)
    mt = f[idx["modality"] == TEXT].mean(0)
    share = stats.image_share()
    alive = (mi + mt) > 0
    np.testing.assert_allclose(share[alive], (mi / (mi + mt))[alive], rtol=1e-6)
    assert np.isnan(share[~alive]).all()
    s = sharing(np.array([0.0, 0.05, 0.1, 0.11, 0.5, 0.89, 0.9, 1.0, np.nan]), threshold=0.1)
    assert (s["n_text_only"], s["n_shared"], s["n_image_only"], s["n_dead"]) == (3, 3, 2, 1)
    assert s["shared"] == pytest.approx(3 / 8)
    with pytest.raises(UserError, match="share threshold"):
        sharing(share, threshold=0.6)


def test_top_activations_equal_brute_force(tiny):
    store = tiny["store"]
    sae = make_sae(store, "resid.2", seed=2)
    top = TopActivations(sae.W_dec.shape[0], k_images=3, k_text=4)
    for b in iter_latents(sae, store, batch_size=9):
        top.update(b)
    _, _, f, idx = _direct(sae, store, "resid.2")
    img = np.isin(idx["modality"], IMAGE_CODES)
    ex_ids = np.unique(idx["example"])
    per_ex = np.stack([f[img & (idx["example"] == e)].max(0) for e in ex_ids])  # [n_examples, w]
    txt = np.flatnonzero(idx["modality"] == TEXT)
    for j in range(0, sae.W_dec.shape[0], 5):
        want = np.sort(per_ex[:, j][per_ex[:, j] > 0])[::-1][:3]
        got = top.images(j)
        np.testing.assert_allclose([v for _, v in got], want, rtol=1e-5)
        for e, v in got:
            assert per_ex[list(ex_ids).index(e), j] == pytest.approx(v, rel=1e-5)
        want_t = np.sort(f[txt, j][f[txt, j] > 0])[::-1][:4]
        got_t = top.texts(j)
        np.testing.assert_allclose([v for _, _, v in got_t], want_t, rtol=1e-5)
        for e, p, v in got_t:
            row = np.flatnonzero((idx["example"] == e) & (idx["position"] == p))[0]
            assert idx["modality"][row] == TEXT and f[row, j] == pytest.approx(v, rel=1e-5)


def test_per_example_max_leaves_out_examples_without_image_tokens():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    idx = np.zeros(3, dtype=[("example", np.int32), ("modality", np.int32)])
    idx["example"] = [5, 5, 6]
    idx["modality"] = [1, 1, 0]
    vals, ex = per_example_max(f, idx)
    assert ex.tolist() == [5] and vals.tolist() == [[1.0, 2.0]]


# ------------------------------------------------------------------------------------- token ids
def test_store_tokens_reproduce_the_processor_ids(tiny):
    from PIL import Image

    ad, store = tiny["adapter"], tiny["store"]
    tokens = StoreTokens(store, ad.tokenizer)
    for ex in store.examples[:6]:
        batch = ad.prepare([Image.open(ex["path"]).convert("RGB")], [ex["text"]])
        want = batch.inputs["input_ids"][0, : batch.lengths[0]].numpy()
        np.testing.assert_array_equal(tokens.ids(ex["example"]), want)
    ex = next(e for e in store.examples if "blue" in e["text"].split())
    ids = tokens.ids(ex["example"])
    hits = word_positions(ids, tokens.word_variants("blue"))
    assert len(hits) == 1 and "blue" in ad.tokenizer.decode(ids[: hits[0] + 1]).split()[-1]
    assert ad.tokenizer.decode(ids[: hits[0] + 1]).rstrip().endswith("blue")


def test_example_concepts_from_facts(tiny):
    store = tiny["store"]
    names, concepts = example_concepts(store)
    ex = store.examples[0]
    objs = ex["meta"]["facts"]["objects"]
    assert concepts[ex["example"]] == {o[a] for o in objs if o["area"] > 0 for a in ("shape", "colour")}
    assert set(names) == set().union(*concepts.values())
    assert example_concepts(store, "none") == ([], {})
    with pytest.raises(UserError, match="concepts mode"):
        example_concepts(store, "shapes")


# ---------------------------------------------------------------------------------- loss recovered
class IdentitySAE(nn.Module):
    """Stand-in with the SAE interface whose reconstruction is exact: f = [relu(x), relu(-x)]."""

    def __init__(self, site: str, zero: bool = False):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.zero = zero
        self.cfg = type("Cfg", (), {"site": site})()

    def encode(self, x):
        return torch.cat([torch.relu(x), torch.relu(-x)], -1)

    def decode(self, f):
        d = f.shape[-1] // 2
        out = f[..., :d] - f[..., d:]
        return torch.zeros_like(out) if self.zero else out


def test_answer_nll_equals_hf_loss(tiny):
    ad = tiny["adapter"]
    items = answer_items(str(tiny["manifest"]), limit=5)
    total, count = answer_nll(ad, items, batch_size=5)
    # HF's own mean cross-entropy with labels on the answer (+ end) tokens only
    from sightline.data import load_image
    from sightline.sae.metrics import _end_token

    images = [load_image(p) for p, _, _ in items]
    prompts = [ad.render_prompt(q) for _, q, _ in items]
    full = ad.prepare(images, [p + a + _end_token(ad) for p, (_, _, a) in zip(prompts, items)])
    head = ad.prepare(images, prompts)
    labels = torch.full_like(full.inputs["input_ids"], -100)
    for i in range(len(items)):
        labels[i, head.lengths[i] : full.lengths[i]] = full.inputs["input_ids"][i, head.lengths[i] : full.lengths[i]]
    with torch.no_grad():
        ref = ad.model(**full.inputs, labels=labels).loss
    assert count == int((labels != -100).sum()) and count > len(items)
    assert total / count == pytest.approx(float(ref), rel=1e-5)


def test_loss_recovered_is_one_for_an_exact_and_zero_for_a_zero_reconstruction(tiny):
    ad = tiny["adapter"]
    items = answer_items(str(tiny["manifest"]), limit=6)
    exact = loss_recovered(ad, IdentitySAE("resid.0"), items, batch_size=4)
    assert abs(exact["nll_zero"] - exact["nll_clean"]) > 1e-3  # zero-ablating the image moves the answers' loss
    assert exact["nll_sae"] == pytest.approx(exact["nll_clean"], abs=1e-6)
    assert exact["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    zero = loss_recovered(ad, IdentitySAE("resid.0", zero=True), items, batch_size=4)
    assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------------------------- task accuracy
def test_task_items_read_qtypes_and_choices_and_refuse_a_bad_choice_list(tiny, tmp_path):
    lines = [json.loads(x) for x in tiny["manifest"].read_text().splitlines()]
    items = task_items(str(tiny["manifest"]), per_qtype=3)
    assert sum(it.qtype == "shape" for it in items) == 3 and sum(it.qtype == "colour" for it in items) == 3
    colour = task_items(str(tiny["manifest"]), qtypes=("colour",))
    assert [(it.question, it.answer) for it in colour] == [(r["prompt"], r["label"]) for r in lines
                                                           if r["qtype"] == "colour"]
    from_store = task_items(store=tiny["store"])
    assert [(it.question, it.answer, it.qtype) for it in from_store] == [
        (it.question, it.answer, it.qtype) for it in task_items(str(tiny["manifest"]))]
    image = str(tiny["manifest"].parent / "images" / "000000.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": image, "prompt": "Which?", "label": "cat", "choices": ["dog", "cow"]}) + "\n")
    with pytest.raises(UserError, match="line 1: the answer 'cat' is not one of its \"choices\""):
        task_items(str(bad))
    with pytest.raises(UserError, match="question type 'count' is not in the data"):
        task_items(str(tiny["manifest"]), qtypes=("count",))


def test_choice_scoring_picks_the_choice_with_the_lowest_hf_loss(tiny):
    """Choice scoring (clean and with zeros spliced in at resid.1) equals picking, per item, the choice whose
    answer tokens (+ end) have the lowest summed cross-entropy by HF's own loss."""
    from sightline.capture.edit import Edit, apply_edits, replace_with
    from sightline.data import load_image
    from sightline.sae.metrics import _end_token

    ad = tiny["adapter"]
    shapes = ["circle", "square", "star", "heart"]
    items = [TaskItem(it.image, it.question, it.answer if it.answer in shapes else "circle", "shape", tuple(shapes))
             for it in task_items(str(tiny["manifest"]), qtypes=("shape",))[:4]]
    for fn in (None, torch.zeros_like):
        right, given = task_answers(ad, items, fn, "resid.1" if fn else None, batch_size=3)
        for it, g in zip(items, given):
            losses = []
            for c in it.choices:  # one unpadded sequence per choice, labels on the answer and end tokens
                image = load_image(it.image)
                prompt = ad.render_prompt(it.question)
                full = ad.prepare([image], [prompt + c + _end_token(ad)])
                n_head = ad.prepare([image], [prompt]).lengths[0]
                labels = torch.full_like(full.inputs["input_ids"], -100)
                labels[0, n_head:] = full.inputs["input_ids"][0, n_head:]
                edits = [Edit("resid.1", [full.layouts[0].image_positions], replace_with(fn))] if fn else []
                with torch.no_grad(), apply_edits(ad, edits):
                    loss = ad.model(**full.inputs, labels=labels).loss
                losses.append(float(loss) * int((labels != -100).sum()))
            assert g == it.choices[int(np.argmin(losses))]
        assert list(right) == [g == it.answer for g, it in zip(given, items)]


@pytest.fixture(scope="module")
def organism_sae(tmp_path_factory):
    """The organism, 96 single-object scenes asked their shape or colour (seed 2), a store of resid.0 over them and
    a TopK SAE (256 latents, k = 32, the demo's setting) trained on it."""
    from sightline.data.synthetic import WorldConfig, export_jsonl
    from sightline.extract import ExtractConfig, extract
    from sightline.organism import checkpoint_path, load_organism
    from sightline.sae.models import SAE
    from sightline.sae.train import SAETrainConfig, train_saes
    from sightline.store import ActivationStore

    root = tmp_path_factory.mktemp("organism_tasks")
    data = export_jsonl(root / "data", seed=2, n=96, config=WorldConfig(n_objects=1), qtypes=("shape", "colour"),
                        per_image=1)
    store = extract(ExtractConfig(model=str(checkpoint_path()), data=str(data), out=str(root / "store"),
                                  sites="resid", layers="0", positions="all", batch_size=48, progress=False))
    paths = train_saes(SAETrainConfig(store=str(store), site="resid.0", out=str(root / "sae"), modality="both",
                                      batch_size=1024, epochs=6, dead_tokens=4096, seed=2,
                                      saes=(SAEConfig(arch="topk", width=256, k=32, aux_coeff=0.25),)),
                       progress=False)["paths"]
    return {"adapter": load_organism(), "data": data, "store": ActivationStore.open(store),
            "sae": SAE.from_pretrained(str(paths[0])), "root": root}


def test_organism_spliced_identity_changes_no_answer_and_zeros_drop_shape_to_chance(organism_sae):
    """On the organism at resid.0: an exact reconstruction spliced in at the image positions leaves every answer as
    it was; zeros there drop shape accuracy to chance (1/8) or below (measured 0.0 on data seeds 1-4: the
    organism then answers "white white ..."; bound chance + 0.1), far from clean (measured 0.92-1.0)."""
    ad = organism_sae["adapter"]
    items = task_items(str(organism_sae["data"]))
    res = task_accuracy(ad, IdentitySAE("resid.0"), items, batch_size=96, max_new_tokens=4)
    assert res["n_answers_changed_by_sae"] == 0 and res["scoring"] == "exact"
    shape = res["per_qtype"]["shape"]
    assert shape["n"] >= 30 and shape["sae"] == shape["clean"] >= 0.85
    assert shape["chance"] == 0.125 and res["per_qtype"]["colour"]["chance"] == 0.125
    assert shape["zero"] <= shape["chance"] + 0.1
    right, given = task_answers(ad, items, batch_size=96, max_new_tokens=4)  # clean, by itself
    assert res["per_qtype"]["all"]["clean"] == pytest.approx(right.mean(), abs=1e-4)


def test_organism_trained_sae_spliced_accuracy_is_reported(organism_sae):
    """The analysis job reports, per question type, clean / SAE-spliced / zero accuracy and chance beside loss
    recovered. Measured for the trained SAE at resid.0 (data and SAE seeds 1-4): shape 0.90-1.0 spliced against
    0.92-1.0 clean (largest drop 0.04), colour 1.0 against 1.0; bound: within 0.1 of clean."""
    from sightline.report.files import read_json

    o = organism_sae
    cfg = SAEAnalyzeConfig(saes=(), store=str(o["store"].path), out=str(o["root"] / "analysis"), data=str(o["data"]),
                           n_loss=16, loss_batch_size=48, n_task=48, max_new_tokens=4, n_features=2, top_images=2,
                           top_texts=2, progress=False)
    res = analyze_saes([o["sae"]], o["store"], cfg, adapter=o["adapter"])
    ta = res["saes"][0]["task_accuracy"]
    assert set(ta) == {"shape", "colour", "all"}
    for q in ("shape", "colour"):
        assert ta[q]["sae"] >= ta[q]["clean"] - 0.1, ta
        assert ta[q]["zero"] < ta[q]["sae"] - 0.5, ta
    full = read_json(o["root"] / "analysis" / "results.json")["metrics"]["saes"]["resid.0"]
    assert full["task_accuracy"]["per_qtype"]["shape"]["majority"] is not None
    assert full["loss_recovered"]["loss_recovered"] is not None
    page = (o["root"] / "analysis" / "resid.0" / "features.html").read_text()
    assert "SAE spliced in" in page and "zero at image positions" in page


# ------------------------------------------------------------------------------------- the whole job
def test_analysis_job_writes_a_complete_report(tiny, tmp_path):
    store, ad = tiny["store"], tiny["adapter"]
    saes = [make_sae(store, "resid.1", seed=3), make_sae(store, "resid.2", seed=4)]
    cfg = SAEAnalyzeConfig(saes=(), store=str(store.path), out=str(tmp_path / "an"), n_features=4, top_images=3,
                           top_texts=3, n_loss=4, batch_size=50, progress=False, features=(7,))
    res = analyze_saes(saes, store, cfg, adapter=ad)
    out = tmp_path / "an"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["an"]  # no temporary folder left
    results = json.loads((out / "results.json").read_text())
    metrics, modality = results["metrics"], results["modality"]
    assert res.path == out and results["summary"] == json.loads(json.dumps(res.summary))
    assert set(metrics["saes"]) == {"resid.1", "resid.2"}
    rec = metrics["saes"]["resid.1"]
    assert set(rec["reconstruction"]) == {"image", "text", "special", "all"}
    assert rec["loss_recovered"]["n_sequences"] == 4 and rec["loss_recovered"]["loss_recovered"] is not None
    assert [c["layer"] for c in modality["shared_by_layer"]] == [1, 2]
    assert [c["layer"] for c in res["shared_by_layer"]] == [1, 2]
    assert abs(sum(modality["shared_by_layer"][0][k] for k in ("shared", "image_only", "text_only")) - 1) < 1e-9
    assert (out / "figures" / "shared_by_layer.png").stat().st_size > 1000
    assert SAEAnalyzeConfig.from_dict(json.loads((out / "config.json").read_text())) == cfg
    index = (out / "index.html").read_text()
    assert "resid.1/features.html" in index and "<script" not in index
    page = (out / "resid.1" / "features.html").read_text()
    srcs = re.findall(r"<img src='([^']+)'", page)
    assert "../figures/resid.1/modality_hist.png" in srcs and any(s.startswith("../figures/resid.1/latent_")
                                                                  for s in srcs)
    assert all((out / "resid.1" / s).is_file() and not s.startswith("/") for s in srcs)
    assert "id='latent7'" in page and "class='ctx'" in page  # forced latent; text contexts shown
    with pytest.raises(UserError, match="exists and is not empty"):
        analyze_saes(saes, store, cfg, adapter=ad)


def test_analysis_run_folder_follows_the_output_convention(tiny, tmp_path, monkeypatch):
    """config.json round-trips, results.json has the summary, figures/ and index.html exist; an error
    mid-run leaves no output folder."""
    store = tiny["store"]
    saes = [make_sae(store, "resid.1", seed=3)]
    cfg = SAEAnalyzeConfig(saes=("a", "b"), store=str(store.path), out=str(tmp_path / "an"), loss=False,
                           tasks=False, n_features=2, top_images=2, top_texts=2, batch_size=50, progress=False)
    res = analyze_saes(saes, store, cfg)
    out = tmp_path / "an"
    assert SAEAnalyzeConfig.from_dict(json.loads((out / "config.json").read_text())) == cfg
    assert json.loads((out / "results.json").read_text())["summary"]["saes"][0]["site"] == res["saes"][0]["site"]
    assert (out / "figures" / "resid.1" / "modality_hist.png").is_file()
    index = (out / "index.html").read_text()
    assert "What this run found" in index and "resid.1/features.html" in index

    import sightline.report.sae as figs

    def broken(*a, **k):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(figs, "plot_modality_hist", broken)
    with pytest.raises(RuntimeError, match="figure failed"):
        analyze_saes(saes, store, SAEAnalyzeConfig(**{**cfg.to_dict(), "out": str(tmp_path / "broken")}))
    assert not (tmp_path / "broken").exists() and not (tmp_path / "broken.partial").exists()


def test_analyze_sae_loads_folders_and_rejects_mismatches(tiny, tmp_path):
    store = tiny["store"]
    for site in ("resid.0", "resid.2"):
        make_sae(store, site).save_pretrained(tmp_path / "saes" / site)
    cfg = SAEAnalyzeConfig(saes=(str(tmp_path / "saes"),), store=str(store.path), out=str(tmp_path / "an"),
                           loss=False, tasks=False, n_features=2, top_images=2, top_texts=2, progress=False)
    res = analyze_sae(cfg)
    assert [s["site"] for s in res["saes"]] == ["resid.0", "resid.2"]
    assert res["saes"][0]["loss_recovered"] is None
    wrong = ARCHITECTURES["topk"](SAEConfig(arch="topk", d_in=7, width=16, k=2, lr=1e-3, site="resid.1"))
    with pytest.raises(UserError, match="d_in 7 does not match"):
        analyze_saes([wrong], store, cfg)
    missing = make_sae(store, "resid.1")
    missing.cfg = SAEConfig(arch="topk", d_in=missing.cfg.d_in, width=48, k=4, lr=1e-3, site="values.1")
    with pytest.raises(UserError, match="values.1 is not in store"):
        analyze_saes([missing], store, cfg)
    with pytest.raises(UserError, match="latent 48 is out of range"):
        analyze_saes([make_sae(store, "resid.1")], store, SAEAnalyzeConfig(saes=(), store="", features=(3, 48)))
    with pytest.raises(UserError, match="does not exist"):
        analyze_sae(SAEAnalyzeConfig(saes=(str(tmp_path / "nope"),), store=str(store.path)))


# ---------------------------------------------------------------------------- organism validation
ORGANISM_N_IMAGES = 600
ORGANISM_EPOCHS = 6.0  # ~250 steps of 1024 tokens per SAE, above train's min_steps (200): not flagged too short
PROBE_LAYER = "resid.2"  # the middle of the organism's 4 blocks, chosen before looking at the results


def _organism_saes(root, seed: int = 0, n_images: int = ORGANISM_N_IMAGES, epochs: float = ORGANISM_EPOCHS):
    """(the organism, the analysis result) of multimodal SAEs (TopK, 8x, k=32) trained at every layer on n_images
    single-object scenes (scene seed 11 + seed) with their captions (SAE seed `seed`), analysed without loss
    recovered and task accuracy (tested on their own above: this run is about probing and sharing)."""
    from sightline.data.synthetic import WorldConfig, export_jsonl
    from sightline.extract import ExtractConfig, extract
    from sightline.organism import checkpoint_path, load_organism
    from sightline.sae.models import SAE
    from sightline.sae.train import SAETrainConfig, train_saes
    from sightline.store import ActivationStore

    ad = load_organism()
    scenes = export_jsonl(root / "scenes", seed=11 + seed, n=n_images, qtypes=("caption",),
                          config=WorldConfig(n_objects=1))
    end = "<|end|>"  # the organism's end-of-turn: image + caption sequences in its own chat format
    lines = []
    for line in scenes.read_text().splitlines():
        r = json.loads(line)
        r["prompt"] = ad.render_prompt(r["prompt"]) + r["label"] + end
        lines.append(json.dumps(r))
    captioned = root / "scenes" / "captioned.jsonl"  # beside images/: paths in it are relative
    captioned.write_text("\n".join(lines) + "\n")
    extract(ExtractConfig(model=str(checkpoint_path()), data=str(captioned), out=str(root / "store"),
                          raw_prompt=True, positions="all", sites="resid", batch_size=32, progress=False))
    store = ActivationStore.open(root / "store")
    assert store.sites == [f"resid.{L}" for L in range(ad.n_layers + 1)]
    saes = []
    threads = torch.get_num_threads()
    try:
        for site in store.sites:
            run = train_saes(SAETrainConfig(store=str(store.path), site=site, out=str(root / f"sae-{site}"),
                                            modality="both", batch_size=1024, epochs=epochs, threads=2, seed=seed,
                                            saes=(SAEConfig(arch="topk", expansion=8, k=32, lr=1e-3),)),
                             progress=False)
            saes.append(SAE.from_pretrained(run["paths"][0]))
    finally:
        torch.set_num_threads(threads)  # train_saes(threads=2) sets torch's threads for the whole process
    cfg = SAEAnalyzeConfig(saes=(), store=str(store.path), out=str(root / "analysis"), loss=False, tasks=False,
                           n_features=4, top_images=2, top_texts=2, progress=False)
    return ad, analyze_saes(saes, store, cfg, adapter=ad)


def test_organism_sae_probing_and_sharing_curve(tmp_path_factory):
    """Multimodal SAEs (TopK, 8x, k=32) at every layer of the organism, trained on image + caption sequences:
    for >= 80% of the 16 shape and colour values one latent separates the images showing it from the others
    (AUROC >= 0.9 on held-out images, the latent chosen on the other half), and the shared fraction is
    computed at every layer.

    Scenes hold ONE object, the analogue of the paper's ImageNet images (the organism names 98% of single
    shapes but answers questions about scenes of several objects far less well, docs/organism.md).
    Measured (600 images, 6 epochs; seeds 0-2, `python tests/test_sae_analysis.py SEED`): coverage [1.00, 1.00]
    at every layer (bound 0.8); shared fraction over resid.0-4 [0.053, 0.056], [0.218, 0.225], [0.256, 0.288],
    [0.282, 0.304], [0.287, 0.319]. (At 12 epochs, seed 0: coverage 1.00 at every layer, shared 0.04, 0.24, 0.29,
    0.27, 0.30.)"""
    root = tmp_path_factory.mktemp("organism_sae")
    ad, res = _organism_saes(root)
    report = {s["site"]: s for s in res["saes"]}
    print(json.dumps({"out": res["out"], "shared_by_layer": res["shared_by_layer"],
                      "per_sae": {k: {m: v[m] for m in ("probe_coverage", "fvu_image", "fvu_text", "frac_dead",
                                                         "shared", "cross_modal_concepts")}
                                  for k, v in report.items()}}, indent=1))
    # the curve: every layer, and the png that shows it
    assert [c["layer"] for c in res["shared_by_layer"]] == list(range(ad.n_layers + 1))
    assert (root / "analysis" / "figures" / "shared_by_layer.png").stat().st_size > 1000
    # sparse probing at the layer fixed in advance
    modality = json.loads((root / "analysis" / "results.json").read_text())["modality"]
    assert modality["saes"][PROBE_LAYER]["concepts"]["probing"]["n_labels"] == 16
    assert report[PROBE_LAYER]["probe_coverage"] >= 0.8


def test_two_saes_at_one_site_get_distinct_labels(tiny, tmp_path):
    """Two SAEs at resid.1: each its own label (site + arch/width/k) in results.json, folders, figure legend
    and page headings; one SAE per site keeps the site as its label."""
    store = tiny["store"]
    saes = [make_sae(store, "resid.1", width=48, seed=3), make_sae(store, "resid.1", width=32, seed=4),
            make_sae(store, "resid.2", seed=5)]
    cfg = SAEAnalyzeConfig(saes=(), store=str(store.path), out=str(tmp_path / "an"), loss=False, tasks=False,
                           n_features=2, top_images=2, top_texts=2, batch_size=50, progress=False)
    res = analyze_saes(saes, store, cfg)
    out = tmp_path / "an"
    names = [s["name"] for s in res["saes"]]
    assert names == ["resid.1-topk-w48-k4", "resid.1-topk-w32-k4", "resid.2"]
    assert set(res.results["metrics"]["saes"]) == set(names)
    for n in names:
        assert (out / n / "features.html").is_file() and (out / "figures" / n / "modality_hist.png").is_file()
    assert "SAE resid.1-topk-w32-k4 (at resid.1)" in (out / "resid.1-topk-w32-k4" / "features.html").read_text()
    index = (out / "index.html").read_text()
    assert ">resid.1-topk-w48-k4" in index and ">resid.1-topk-w32-k4" in index
    curve = res["shared_by_layer"]
    assert [(c["layer"], c["series"]) for c in curve] == [(1, "topk-w32-k4"), (1, "topk-w48-k4"), (2, "")]
    assert (out / "figures" / "shared_by_layer.png").stat().st_size > 1000
    from sightline.sae.analyze import sae_labels

    a, b = make_sae(store, "resid.1", seed=1), make_sae(store, "resid.1", seed=2)  # identical settings: a counter
    assert sae_labels([a, b], ["resid.1", "resid.1"]) == ["resid.1-topk-w48-k4-1", "resid.1-topk-w48-k4-2"]


def test_untrained_and_too_short_saes_are_flagged(tiny, tmp_path):
    from sightline.sae.analyze import analyze_sae, quality_flags
    from sightline.sae.train import SAETrainConfig, train_saes

    good = {"image": {"n_tokens": 10, "fvu": 0.2}, "text": {"n_tokens": 10, "fvu": 0.3}, "all": {"frac_dead": 0.1}}
    assert quality_flags({"metrics": good}, "both", None, 0.9, 0.5) == []
    bad = {**good, "text": {"n_tokens": 10, "fvu": 1.4}, "all": {"frac_dead": 0.52}}
    assert quality_flags({"metrics": bad}, "image", None, 0.9, 0.5) == ["52% of latents dead (> 50%)"]
    assert quality_flags({"metrics": bad}, "both", None, 0.9, 0.5) == ["text FVU 1.40 >= 0.9",
                                                                         "52% of latents dead (> 50%)"]
    assert "too short (1 steps" in quality_flags({"metrics": good}, "both", {"too_short": True, "steps": 1,
                                                                             "tokens": 4096}, 0.9, 0.5)[0]
    # a one-step training run, analysed: its training record and its measurements flag it
    store = tiny["store"]
    run = train_saes(SAETrainConfig(store=str(store.path), site="resid.1", out=str(tmp_path / "sae"),
                                    modality="both", batch_size=4096, epochs=1, threads=1, progress=False,
                                    saes=(SAEConfig(arch="topk", width=64, k=4),)), progress=False)
    assert run["too_short"] and run["steps"] == 1
    res = analyze_sae(SAEAnalyzeConfig(saes=(str(tmp_path / "sae"),), store=str(store.path), out=str(tmp_path / "an"),
                                       loss=False, tasks=False, n_features=2, top_images=1, top_texts=1,
                                       progress=False))
    (s,) = res["saes"]
    assert s["flagged"] and s["flags"][0].startswith("its training run was too short (1 steps")
    assert len(res["warnings"]) == 1 and "looks untrained" in res["warnings"][0]
    q = res.results["metrics"]["saes"][s["name"]]["quality"]
    assert q["training"]["steps"] == 1 and q["flagged"]
    assert "looks untrained" in (tmp_path / "an" / "index.html").read_text()
    assert "looks untrained" in (tmp_path / "an" / s["name"] / "features.html").read_text()


if __name__ == "__main__":  # the figures behind the organism bounds: python tests/test_sae_analysis.py SEED [EPOCHS]
    import sys
    import tempfile
    import time
    from pathlib import Path

    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        _, got = _organism_saes(Path(d), int(sys.argv[1]) if len(sys.argv) > 1 else 0,
                                epochs=float(sys.argv[2]) if len(sys.argv) > 2 else ORGANISM_EPOCHS)
    print("coverage", {s["site"]: s["probe_coverage"] for s in got["saes"]})
    print("shared", [round(c["shared"], 3) for c in got["shared_by_layer"]], f"{time.time() - t0:.0f} s")

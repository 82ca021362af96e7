"""Directions in the SAE basis and sparse probes over SAE latents: OMP against scikit-learn, the selection
score against a direct computation, feature-page links, the CLI, and the organism validation (a shape
direction is sparse in the SAE basis, random directions are not; k <= 4 latents per class read shape as well
as the dense residual probe)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sightline.cli import main
from sightline.sae.directions import (
    ExplainDirectionConfig,
    explain_directions,
    latents_needed,
    omp,
    unit_dictionary,
)
from sightline.sae.sparse_probe import (
    SparseProbeConfig,
    run_sparse_probes,
    separation_scores,
    top_latents,
)

LABEL = "facts.objects.0.shape"
SITE = "resid.2"  # the middle of the organism's 4 blocks (as tests/test_sae_analysis.py), fixed before measuring


def _sklearn_path(D: torch.Tensor, y: torch.Tensor, k: int) -> np.ndarray:
    from sklearn.linear_model import OrthogonalMatchingPursuit

    m = OrthogonalMatchingPursuit(n_nonzero_coefs=k, fit_intercept=False).fit(D.T.numpy(), y.numpy())
    return m.coef_


@pytest.mark.parametrize("seed", [0, 1])
def test_omp_equals_sklearn(seed):
    """Every prefix of the OMP path equals scikit-learn's OrthogonalMatchingPursuit with that many latents (1e-5),
    on an overcomplete random dictionary, for a random target and for a sparse one."""
    g = torch.Generator().manual_seed(seed)
    D = unit_dictionary(torch.randn(300, 48, generator=g, dtype=torch.float64))
    sparse = D[[5, 77, 201]].T @ torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    for y in (torch.randn(48, generator=g, dtype=torch.float64), sparse):
        path = omp(D, y, 40)
        for k in (1, 2, 3, 7, 20, 40):
            if k > len(path.latents):
                continue
            ref = _sklearn_path(D, y, k)
            ours = np.zeros(D.shape[0])
            ours[path.latents[:k]] = path.coef_at(k)
            np.testing.assert_allclose(ours, ref, atol=1e-5)
            approx = D.T.numpy() @ ref
            cos = float(approx @ y.numpy() / np.linalg.norm(approx) / np.linalg.norm(y.numpy()))
            assert path.cosine[k - 1] == pytest.approx(cos, abs=1e-9)
        assert all(b >= a - 1e-12 for a, b in zip(path.cosine, path.cosine[1:]))  # nested least squares
    path = omp(D, sparse, 40)
    assert sorted(path.latents) == [5, 77, 201] and path.cosine[-1] == pytest.approx(1.0, abs=1e-12)  # then stops
    assert latents_needed(path.cosine, 0.999) == 3


def test_separation_scores_and_selection_against_a_direct_computation():
    rng = np.random.default_rng(0)
    f = torch.from_numpy(np.maximum(rng.normal(size=(90, 12)), 0)).float()
    f[:, 3] = 0.0  # a dead latent scores 0
    y = rng.integers(0, 3, size=90)
    s = separation_scores(f, y, 3).numpy()
    x = f.double().numpy()
    for c in range(3):
        for j in range(12):
            a, b = x[y == c, j], x[y != c, j]
            sd = np.sqrt((a.var() + b.var()) / 2)
            ref = 0.0 if sd == 0 else abs(a.mean() - b.mean()) / sd
            assert s[c, j] == pytest.approx(ref, rel=1e-9, abs=1e-12)
    top = top_latents(torch.from_numpy(s), 4).numpy()
    for c in range(3):
        assert list(top[c]) == sorted(range(12), key=lambda j: (-s[c, j], j))[:4]


# ---------------------------------------------------------------------------------------- the organism
@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    """400 held-out single-object scenes, resid.2 at the image tokens, and a TopK SAE (8x = 1024 latents,
    k 32) trained on them."""
    from sightline.data.synthetic import WorldConfig, export_jsonl
    from sightline.extract import ExtractConfig, extract
    from sightline.organism import checkpoint_path
    from sightline.sae import SAEConfig, SAETrainConfig, train_saes

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sae_directions")
    data = export_jsonl(root / "data", seed=21, n=400, config=WorldConfig(n_objects=1), qtypes=("shape",),
                        per_image=1, progress=False)
    extract(ExtractConfig(model=str(checkpoint_path()), data=str(data), out=str(root / "store"), sites="resid",
                          layers="2", positions="image", batch_size=32, progress=False))
    run = train_saes(SAETrainConfig(store=str(root / "store"), site=SITE, out=str(root / "sae"), modality="image",
                                    batch_size=1024, epochs=4.0, threads=1, saes=(SAEConfig(arch="topk", k=32),)),
                     progress=False)
    yield {"root": root, "store": str(root / "store"), "sae": str(run["paths"][0])}
    torch.set_num_threads(threads)


def test_organism_shape_directions_are_sparse_in_the_sae_basis(organism, capsys):
    """Every shape's class direction at resid.2 reaches cosine 0.7 with at most 20 latents (the issue's bound),
    and random directions of the same norm need clearly more: each random direction more than the hardest
    class direction + 2, and on average at least twice the class directions' mean.
    Measured with the fixture's scene seed 21 + s and SAE seed s, s = 0..3 (s = 0 is this fixture): class
    directions needed 1-5 latents (hardest 4, 5, 4, 4; mean 2.75, 3.25, 3.25, 2.63), random ones 8.9-9.5 on
    average and at least 8, 9, 9, 8 (the fewest any of the 8 seeds needed, read off their pointwise best
    curve); cosine with 3 latents: class >= 0.63, random mean <= 0.48."""
    out = organism["root"] / "explain"
    rc = main(["sae", "explain-direction", "--sae", organism["sae"], "--store", organism["store"], "--label", LABEL,
               "--out", str(out), "--no-progress"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    s = res["summary"]
    assert s["site"] == SITE and s["n_latents"] == 1024 and len(s["directions"]) == 8
    needed = {}
    for name, r in res["directions"].items():
        assert len(r["cosine"]) == min(100, s["n_latents"], s["d"]) == len(r["random"]["mean"])
        assert r["needed"]["0.7"] is not None and r["needed"]["0.7"] <= 20, name
        needed[name] = r["needed"]["0.7"]
        assert [e["rank"] for e in r["latents"]] == list(range(1, len(r["latents"]) + 1))
        assert (out / r["figure"]).stat().st_size > 5000
    rand = res["directions"]["star"]["random"]  # one baseline (same seeds) for every direction
    fewest_random = latents_needed(rand["max"], 0.7)  # no random direction needs fewer
    mean_random = res["directions"]["star"]["random_needed"]["0.7"]
    assert fewest_random is not None and fewest_random > max(needed.values()) + 2, (needed, fewest_random)
    assert mean_random >= 2 * np.mean(list(needed.values())), (needed, mean_random)
    # the job's coefficients are scikit-learn's on the SAE's own (unit-norm) dictionary
    from sightline.sae.directions import class_directions_from_store
    from sightline.sae.models import SAE
    from sightline.store import ActivationStore

    sae = SAE.from_pretrained(organism["sae"])
    v = class_directions_from_store(ActivationStore.open(organism["store"]), SITE, LABEL)["star"].double()
    star = res["directions"]["star"]["latents"]
    ref = _sklearn_path(unit_dictionary(sae.W_dec), v, len(star))
    ours = np.zeros(1024)
    ours[[e["latent"] for e in star]] = [e["coef"] for e in star]
    np.testing.assert_allclose(ours, ref, atol=1e-5 * max(1.0, float(np.abs(ref).max())))
    page = (out / "index.html").read_text()
    assert "Direction star" in page and "figures/star.png" in page


def test_explain_direction_pairs_and_feature_page_links(organism, tmp_path, capsys):
    """SRC:TGT explains mu_TGT - mu_SRC; latents shown on the `sae analyze` feature page are linked there,
    the others not; a class the store lacks is one line, exit 2."""
    from sightline.sae.directions import class_directions_from_store, omp
    from sightline.sae.models import SAE
    from sightline.store import ActivationStore

    analysis = tmp_path / "analysis"
    (analysis / SITE).mkdir(parents=True)
    sae_name = organism["sae"].rstrip("/").rsplit("/", 1)[-1]
    (analysis / "results.json").write_text(json.dumps(
        {"metrics": {"saes": {SITE: {"site": SITE, "sae": {"name": sae_name}}}}}))
    sae = SAE.from_pretrained(organism["sae"])
    dirs = class_directions_from_store(ActivationStore.open(organism["store"]), SITE, LABEL)
    path = omp(unit_dictionary(sae.W_dec), dirs["star"].double() - dirs["circle"].double(), 10)
    shown = path.latents[1]
    (analysis / SITE / "features.html").write_text(f"<h3 id='latent{shown}'>latent {shown}</h3>")
    res = explain_directions(ExplainDirectionConfig(
        sae=organism["sae"], store=organism["store"], label=LABEL, classes=("circle:star",), max_latents=10,
        n_random=2, features=str(analysis), out=str(tmp_path / "out"), progress=False))
    r = json.loads((tmp_path / "out" / "results.json").read_text())["directions"]["circle:star"]
    assert [e["latent"] for e in r["latents"]] == path.latents
    assert [e["page"] for e in r["latents"]] == [None, f"../analysis/{SITE}/features.html#latent{shown}"] + [None] * 8
    assert (tmp_path / "out" / r["latents"][1]["page"].split("#")[0]).resolve().is_file()  # the link opens
    assert res["directions"]["circle:star"]["figure"] == "figures/circle-to-star.png"
    rc = main(["sae", "explain-direction", "--sae", organism["sae"], "--store", organism["store"], "--label", LABEL,
               "--classes", "blob", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no direction for class 'blob'" in err
    assert not (tmp_path / "bad").exists()


def test_organism_sparse_probe_reads_shape_with_few_latents(organism):
    """k-sparse probes over the SAE's latents at resid.2: at most 4 latents per class read single-object shape
    within 5 points of the dense probe on the residual of the same layer (the issue's bound).
    Measured with the fixture's scene seed 21 + s and SAE seed s, s = 0..3 (s = 0 is this fixture): the best
    k <= 4 minus the dense probe +0.04, +0.06, +0.06, +0.08 (k = 1 alone: +0.04, +0.06, 0.00, +0.08); dense
    probe 0.925, 0.938, 0.925, 0.913 on 80 test images."""
    out = organism["root"] / "sparse"
    res = run_sparse_probes(SparseProbeConfig(sae=organism["sae"], store=organism["store"], label=LABEL, ks=(1, 2, 4, 8),
                                         out=str(out), progress=False))
    assert res["ks"] == [1, 2, 4, 8] and res["split_sizes"]["test"] >= 70
    assert res["dense_top1"] >= 0.85  # the dense probe itself reads shape (measured 0.913-0.938)
    best_small = max(a for k, a in zip(res["ks"], res["top1"]) if k <= 4)
    assert best_small >= res["dense_top1"] - 0.05, (res["top1"], res["dense_top1"])
    assert res["smallest_k_within_5_points"] is not None and res["smallest_k_within_5_points"] <= 4
    full = json.loads((out / "results.json").read_text())
    for entries in full["per_class"].values():  # which latents carry each class: k of them, best first
        for e in entries:
            assert len(e["latents"]) == len(e["coef"]) == e["k"]
            assert e["scores"] == sorted(e["scores"], reverse=True)
    assert (out / "figures" / "accuracy_vs_k.png").stat().st_size > 5000
    assert "Latents that carry each class" in (out / "index.html").read_text()

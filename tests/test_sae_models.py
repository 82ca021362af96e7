"""SAE architectures: forward and gradients against dense reference implementations, the unit-norm decoder,
the registry, and the SAELens layout (against its documented forward, and against sae-lens itself when installed)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sightline.errors import UserError
from sightline.sae import ARCHITECTURES, SAE, SAEConfig, register_architecture
from sightline.sae.models import ReLUSAE, topk_latents

D, W = 16, 64


def make(arch: str, seed: int = 0, scale: float = 1.0, **kw) -> SAE:
    """An SAE with random (not initial) parameters, so every term of the forward matters."""
    cfg = SAEConfig(arch=arch, d_in=D, width=W, k=kw.pop("k", 4), input_scale=scale, **kw)
    sae = ARCHITECTURES[arch](cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if sae.cfg.unit_norm_decoder:
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
        if arch == "batchtopk":
            sae.threshold.fill_(0.2)
    return sae


def data(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 3 + 1


def dense_reference(sae: SAE, x_nd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward written out from the formulas in models.py's docstring, dense, no shared code."""
    s = sae.cfg.input_scale
    xs = x_nd * s
    x_in = xs - sae.b_dec if sae.cfg.apply_b_dec_to_input else xs
    pre = x_in @ sae.W_enc + sae.b_enc
    if sae.cfg.arch == "relu":
        f = pre.clamp_min(0)
    elif sae.cfg.arch == "topk":
        keep = pre >= pre.topk(sae.cfg.k, dim=1).values[:, -1:]
        f = pre.clamp_min(0) * keep
    else:
        f = pre.clamp_min(0) * (pre > sae.threshold)
    return (f @ sae.W_dec + sae.b_dec) / s, f


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk"])
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_forward_matches_dense_reference(arch, scale):
    sae = make(arch, scale=scale)
    x = data()
    x_hat, f = sae(x)
    ref_hat, ref_f = dense_reference(sae, x)
    assert f.shape == (len(x), W) and x_hat.shape == x.shape
    torch.testing.assert_close(f, ref_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, ref_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), x_hat)
    if arch == "topk":
        assert int((f > 0).sum(1).max()) <= sae.cfg.k
    # leading dimensions are kept
    assert sae.encode(x.view(4, 10, D)).shape == (4, 10, W)


@given(n=st.integers(1, 6), w=st.integers(1, 300), k=st.integers(1, 40), seed=st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_topk_latents_equals_torch_topk(n, w, k, seed):
    k = min(k, w)
    x = torch.randn(n, w, generator=torch.Generator().manual_seed(seed))
    vals, idx = topk_latents(x, k)
    assert torch.equal(x.gather(1, idx), vals)
    assert torch.equal(vals.sort(1).values, x.topk(k, dim=1).values.sort(1).values)


def _grads(params) -> list[torch.Tensor]:
    return [p.grad.clone() for p in params]


def _reference_losses(sae: SAE, xs: torch.Tensor, total_var: torch.Tensor, n_global: int, progress: float,
                      dead: torch.Tensor | None) -> torch.Tensor:
    """Dense autograd version of each architecture's training loss (AuxK included)."""
    cfg = sae.cfg
    x_in = xs - sae.b_dec if cfg.apply_b_dec_to_input else xs
    pre = x_in @ sae.W_enc + sae.b_enc
    n, w = pre.shape
    if cfg.arch == "relu":
        f = F.relu(pre)
    elif cfg.arch == "topk":
        v, i = pre.topk(cfg.k, dim=1)
        f = torch.zeros_like(pre).scatter(1, i, F.relu(v))
    else:
        v, i = pre.reshape(-1).topk(cfg.k * n)
        f = torch.zeros(n * w).scatter(0, i, F.relu(v)).view(n, w)
    x_hat = f @ sae.W_dec + sae.b_dec
    err = (x_hat - xs).pow(2).sum()
    if cfg.arch == "relu":
        warm = min(1.0, progress / cfg.l1_warmup_frac)
        loss = err / n_global + cfg.l1_coeff * warm * (f * sae.W_dec.norm(dim=1)).sum() / n_global
    else:
        loss = err / total_var
    if dead is not None and cfg.aux_coeff:
        n_dead = int(dead.sum())
        k_aux = min(cfg.aux_k, n_dead)
        masked = pre.masked_fill(~dead, float("-inf"))  # as in Gao et al.: AuxK trains the encoder too
        av, ai = masked.topk(k_aux, dim=1)
        e_hat = torch.zeros_like(pre).scatter(1, ai, F.relu(av)) @ sae.W_dec
        aux = min(n_dead / cfg.aux_k, 1.0) * (e_hat - (xs - x_hat).detach()).pow(2).sum() / total_var
        loss = loss + cfg.aux_coeff * aux
    return loss


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk"])
@pytest.mark.parametrize("with_dead", [False, True])
def test_training_gradients_match_dense_autograd(arch, with_dead):
    """The sparse backward (topk/batchtopk) and AuxK give the gradients of the dense formulas."""
    extra = {"aux_coeff": 0.5} if arch == "relu" else {}
    sae = make(arch, k=5, **extra)
    xs = data(32)
    total_var = (xs - xs.mean(0)).pow(2).sum()
    dead = (torch.arange(W) % 3 == 0) if with_dead else None
    out = sae.training_losses(xs, total_var, 32, 0.02, dead)
    out.loss.backward()
    ours = _grads(sae.parameters())
    sae.zero_grad()
    ref = _reference_losses(sae, xs, total_var, 32, 0.02, dead)
    ref.backward()
    torch.testing.assert_close(out.loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip(sae.named_parameters(), ours, _grads(sae.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    if with_dead:
        assert float(out.aux) > 0
    if arch != "relu":
        assert float(out.l0) <= 5 + 1e-6  # at most k active per token (on average for batchtopk)


def test_unit_norm_decoder_step():
    sae = make("topk")
    sae.W_dec.grad = torch.randn(W, D)
    sae.before_step()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert float(parallel.detach().abs().max()) < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.after_step({})
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(W))
    relu = make("relu")  # the paper's ReLU recipe leaves norms free (its L1 is weighted by them)
    before = relu.W_dec.norm(dim=1).clone()
    relu.after_step({})
    torch.testing.assert_close(relu.W_dec.norm(dim=1), before)


def test_paper_defaults_for_relu_and_topk():
    r = SAEConfig(arch="relu").resolved(4096)
    assert (r.width, r.l1_coeff, r.lr, r.init_dec_norm, r.grad_clip, r.l1_warmup_frac) == (
        32768, 5.0, 5e-5, 0.1, 1.0, 0.05)
    assert r.apply_b_dec_to_input is False and r.unit_norm_decoder is False and r.aux_coeff == 0
    t = SAEConfig(arch="topk", width=2**14).resolved(128)
    assert t.lr == pytest.approx(1.5e-3) and t.aux_coeff == pytest.approx(1 / 32) and t.aux_k == 64
    assert t.unit_norm_decoder and t.apply_b_dec_to_input
    big = SAEConfig(arch="topk", width=32768).resolved(4096)  # near Gao et al.'s 2e-4/sqrt(w/2^14) at LLM size
    assert 1.4e-4 < big.lr < 2.1e-4
    sae = ReLUSAE(SAEConfig(arch="relu", d_in=8, width=32))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((32,), 0.1))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())


def test_config_errors():
    with pytest.raises(UserError, match="unknown SAE architecture 'nope'"):
        SAEConfig(arch="nope")
    with pytest.raises(UserError, match="k=40 is larger than its width 32"):
        SAEConfig(arch="topk", k=40, width=32).resolved(8)
    with pytest.raises(UserError, match="d_in is unknown"):
        SAEConfig().resolved()
    cfg = SAEConfig(arch="batchtopk", width=10, k=3, lr=1e-3)
    assert SAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_register_architecture_is_one_class(tmp_path):
    @register_architecture("abs_relu")
    class AbsReLU(ReLUSAE):
        """|pre| kept where pre > 0.5 (a made-up architecture)."""

        def activation(self, pre_nw):
            return pre_nw * (pre_nw > 0.5)

    try:
        sae = SAE.from_pretrained(AbsReLU(SAEConfig(arch="abs_relu", d_in=D, width=W)).save_pretrained(tmp_path / "a"))
        assert type(sae) is AbsReLU and sae.cfg.arch == "abs_relu"
        x = data()
        pre = x @ sae.W_enc + sae.b_enc
        torch.testing.assert_close(sae.encode(x), pre * (pre > 0.5))
    finally:
        ARCHITECTURES.pop("abs_relu")


def saelens_reference(folder) -> callable:
    """SAELens' inference forward written from its documented cfg.json / safetensors layout (raw inputs)."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    t = load_file(str(folder / "sae_weights.safetensors"))

    def fwd(x):
        sae_in = x - t["b_dec"] * cfg["apply_b_dec_to_input"]
        h = sae_in @ t["W_enc"] + t["b_enc"]
        if cfg["architecture"] == "standard":
            f = h.relu()
        elif cfg["architecture"] == "topk":
            v, i = h.topk(cfg["k"], dim=-1)
            f = torch.zeros_like(h).scatter(-1, i, v.relu())
        else:
            assert cfg["architecture"] == "jumprelu"
            f = h.relu() * (h > t["threshold"])
        return f @ t["W_dec"] + t["b_dec"], f

    return fwd


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk"])
def test_saelens_layout_and_round_trip(arch, tmp_path):
    sae = make(arch, scale=0.05, site="resid.2", name="x")
    folder = sae.save_pretrained(tmp_path / arch)
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((folder / "cfg.json").read_text())
    expect_arch = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu"}[arch]
    assert cfg["architecture"] == expect_arch and (cfg["d_in"], cfg["d_sae"]) == (D, W)
    assert cfg["normalize_activations"] == "none" and cfg["sightline"]["input_scale"] == 0.05
    from safetensors.torch import load_file

    shapes = {k: tuple(v.shape) for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    assert shapes == {"W_enc": (D, W), "W_dec": (W, D), "b_enc": (W,), "b_dec": (D,),
                      **({"threshold": (W,)} if arch == "batchtopk" else {})}
    x = data() * 20  # raw units: the scale is folded into the saved weights
    ref_hat, ref_f = saelens_reference(folder)(x)
    x_hat, f = sae(x)
    torch.testing.assert_close(f, ref_f, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_hat, ref_hat, rtol=1e-4, atol=1e-4)
    back = SAE.from_pretrained(folder)
    assert back.cfg == sae.cfg and type(back) is type(sae)
    for (n, a), b in zip(sae.state_dict().items(), back.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)


def test_plain_saelens_folder_loads(tmp_path):
    """A topk SAE as SAELens trains it (rescale_acts_by_decoder_norm, scale 1): same latents and output."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    t = {"W_enc": torch.randn(D, W, generator=g), "W_dec": torch.randn(W, D, generator=g) * 2,
         "b_enc": torch.randn(W, generator=g), "b_dec": torch.randn(D, generator=g)}
    folder = tmp_path / "plain"
    folder.mkdir()
    save_file(t, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": D, "d_sae": W, "k": 6,
                                                 "apply_b_dec_to_input": True, "normalize_activations": "none",
                                                 "rescale_acts_by_decoder_norm": True,
                                                 "metadata": {"hook_name": "blocks.3.hook_resid_pre"}}))
    sae = SAE.from_pretrained(folder)
    x = data()
    norm = t["W_dec"].norm(dim=1)
    h = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * norm  # SAELens TopKSAE.encode with rescaling
    v, i = h.topk(6, dim=1)
    f_ref = torch.zeros_like(h).scatter(1, i, v.relu())
    out_ref = (f_ref / norm) @ t["W_dec"] + t["b_dec"]
    torch.testing.assert_close(sae.encode(x), f_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae(x)[0], out_ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="is not an SAE folder"):
        SAE.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk"])
def test_loads_in_sae_lens(arch, tmp_path):
    """What we save loads with sae-lens itself and computes the same latents and reconstruction.
    (sae-lens is in the test extras: a missing install fails here rather than skipping.)"""
    import sae_lens
    sae = make(arch, scale=0.05)
    folder = sae.save_pretrained(tmp_path / arch)
    theirs = sae_lens.SAE.load_from_disk(str(folder))
    x = data() * 20
    with torch.no_grad():
        f = theirs.encode(x)
        torch.testing.assert_close(f, sae.encode(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs.decode(f), sae(x)[0], rtol=1e-4, atol=1e-4)
    back = tmp_path / f"{arch}-back"
    theirs.save_model(back)  # and back: a folder SAELens wrote loads in sightline
    torch.testing.assert_close(SAE.from_pretrained(back)(x)[0], sae(x)[0], rtol=1e-4, atol=1e-4)

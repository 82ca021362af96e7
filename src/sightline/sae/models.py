"""SAE architectures (ReLU + decoder-norm L1, TopK, BatchTopK) behind one registry, saved in SAELens' layout.

Every SAE computes, on inputs scaled by `cfg.input_scale` (chosen at training so that the mean
token norm is sqrt(d_in), as in Rajaram et al. / Anthropic's April 2024 recipe):

    pre_nw = (x_nd * s - b_dec [if apply_b_dec_to_input]) @ W_enc + b_enc      W_enc [d, w]
    f_nw   = activation(pre_nw)                                                  (per architecture)
    x_hat  = (f_nw @ W_dec + b_dec) / s                                          W_dec [w, d]

so the parameters live in the scaled units the SAE was trained in, and `encode`/`decode` take
and give activations in the model's own units. The rows of `W_dec` are the latents' decoder
directions (the "decoder columns" of the W_dec [d, w] convention); TopK and BatchTopK keep them at
unit norm (the gradient component parallel to each row is removed before every step and rows are
renormalised after it); the ReLU recipe instead weights its L1 penalty by the row norms.

Dead latents: TopK and BatchTopK train with the AuxK loss of Gao et al. (2024): the residual
x - x_hat is reconstructed by the top `aux_k` (default d_in/2) pre-activations among latents that
have not fired for `dead_tokens` training tokens; its squared error over the batch's total
variance (as sparsify; scaled by n_dead/aux_k when fewer are dead) is added with weight
`aux_coeff` (default 1/32). It trains the dead latents' encoder and decoder, and works for any
architecture (`aux_coeff` > 0 turns it on for ReLU too; the paper's ReLU recipe has none).
(Normalising by the residual's own energy instead was tried: on low-rank data with a small
residual it pushed the dead latents' pre-activations down and left more of them dead.)

On disk (`save_pretrained`): `cfg.json` + `sae_weights.safetensors` with W_enc [d, w], W_dec [w, d],
b_enc [w], b_dec [d] (+ threshold [w] for BatchTopK, saved as SAELens' "jumprelu" inference
architecture, as SAELens itself does), the input scale folded into the weights so that SAELens
computes the same function on raw activations; sightline's own config sits under the key
"sightline" of cfg.json (SAELens ignores unknown keys) and `from_pretrained` unfolds it. Plain
SAELens folders (standard, topk, jumprelu) load too.

Adding an architecture is one class: subclass `SAE`, set `defaults`, implement `activation` and
`training_losses`, decorate with `@register_architecture("name")`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from sightline.errors import UserError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
FORMAT_VERSION = 1

# fields whose None means "this architecture's default" (SAE.defaults)
ARCH_DEFAULT_FIELDS = ("init_dec_norm", "apply_b_dec_to_input", "unit_norm_decoder", "aux_coeff",
                       "grad_clip")


@dataclass(frozen=True)
class SAEConfig:
    """One SAE: architecture, shape, and the per-SAE training hyperparameters (saved in cfg.json)."""

    arch: str = "topk"  # a key of ARCHITECTURES
    d_in: int = 0  # 0: the store's width (filled in by training)
    width: int = 0  # number of latents; 0: expansion * d_in
    expansion: int = 8  # used when width == 0 (the paper's 8x dictionary)
    k: int = 32  # active latents per token (topk; mean per token for batchtopk)
    l1_coeff: float = 5.0  # relu: lambda of the decoder-norm-weighted L1 (paper: 5)
    l1_warmup_frac: float = 0.05  # relu: lambda rises linearly over this fraction of the steps
    lr: float | None = None  # Adam lr; None: relu 5e-5 (paper), topk/batchtopk SAE.default_lr(width, d_in)
    init_dec_norm: float | None = None  # norm of decoder rows at init; None: relu 0.1 (paper), else 1
    apply_b_dec_to_input: bool | None = None  # subtract b_dec before encoding; None: relu no, else yes
    unit_norm_decoder: bool | None = None  # keep decoder rows at unit norm; None: relu no, else yes
    aux_k: int = 0  # AuxK: dead latents used to reconstruct the residual; 0: d_in // 2
    aux_coeff: float | None = None  # AuxK weight; None: 1/32 for topk/batchtopk, 0 (off) for relu
    grad_clip: float | None = None  # clip this SAE's gradient norm; None: relu 1.0 (paper), else off (0)
    threshold_momentum: float = 0.01  # batchtopk: EMA rate of the inference threshold
    site: str = ""  # the activation it reads, e.g. "resid.2"
    modality: str = ""  # tokens it was trained on: image, text or both
    input_scale: float = 1.0  # inputs are multiplied by this (mean norm -> sqrt(d_in)); set by training
    name: str = ""  # folder name under the run; "" = auto (default_name)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise UserError(f"unknown SAE architecture {self.arch!r}: use one of {', '.join(ARCHITECTURES)}")
        for f, lo in (("d_in", 0), ("width", 0), ("expansion", 1), ("k", 1), ("aux_k", 0)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise UserError(f"SAE {f} must be a whole number >= {lo}, got {v!r}")
        if not (self.input_scale > 0 and math.isfinite(self.input_scale)):
            raise UserError(f"SAE input_scale must be a positive number, got {self.input_scale!r}")
        if self.l1_coeff < 0 or not 0 <= self.l1_warmup_frac <= 1:
            raise UserError("SAE l1_coeff must be >= 0 and l1_warmup_frac in [0, 1]")

    def resolved(self, d_in: int | None = None) -> SAEConfig:
        """A copy with d_in set (if given), width and every architecture default filled in."""
        d = self.d_in if d_in is None else int(d_in)
        if d < 1:
            raise UserError("SAE d_in is unknown: give d_in or train it on a store")
        width = self.width or self.expansion * d
        arch_defaults = ARCHITECTURES[self.arch].defaults
        fill = {f: arch_defaults[f] for f in ARCH_DEFAULT_FIELDS if getattr(self, f) is None}
        if self.lr is None:
            fill["lr"] = ARCHITECTURES[self.arch].default_lr(width, d)
        cfg = dataclasses.replace(self, d_in=d, width=width, aux_k=self.aux_k or max(1, d // 2), **fill)
        if self.k > width and self.arch in ("topk", "batchtopk"):
            raise UserError(f"SAE k={self.k} is larger than its width {width}; lower --k or raise --width")
        return cfg

    def default_name(self) -> str:
        """A folder name from the architecture and its main hyperparameters."""
        w = self.width or f"x{self.expansion}"
        if self.arch == "relu":
            return f"relu-w{w}-l1_{self.l1_coeff:g}"
        return f"{self.arch}-w{w}-k{self.k}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class _SelectedPre(torch.autograd.Function):
    """Pre-activations at chosen (token, latent) pairs, with a sparse backward.

    The dense pre-activation matrix is computed without autograd; only the nnz chosen entries carry
    gradient, so the backward is a sparse-dense product costing O(nnz * d) instead of a second dense
    N x d x w product (the trick of sparsify's fused encoder, done with torch.sparse.mm)."""

    @staticmethod
    def forward(ctx, vals, x_in, W_enc, b_enc, b_dec, rows, cols, sub_b_dec):  # noqa: ARG004
        ctx.save_for_backward(x_in, W_enc, rows, cols)
        ctx.sub_b_dec = sub_b_dec
        return vals.clone()

    @staticmethod
    def backward(ctx, g):
        x_in, W_enc, rows, cols = ctx.saved_tensors
        g = g.reshape(-1).contiguous()
        w = W_enc.shape[1]
        s_w = torch.zeros(w, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        G_wn = torch.sparse_coo_tensor(torch.stack([cols, rows]), g, (w, x_in.shape[0]), check_invariants=False)
        grad_W_enc = torch.sparse.mm(G_wn, x_in).t()  # [d, w]
        grad_b_dec = -(W_enc @ s_w) if ctx.sub_b_dec else None
        return None, None, grad_W_enc, s_w, grad_b_dec, None, None, None


@dataclass
class StepOut:
    """What one SAE's training step gives the trainer (sums normalised by the GLOBAL batch, so ranks add up)."""

    loss: torch.Tensor  # differentiable
    fvu: torch.Tensor  # sum of squared errors / total variance of the global batch
    l0: torch.Tensor  # active latents summed over this rank's tokens / global batch size
    aux: torch.Tensor  # AuxK loss (0 when off or nothing is dead)
    fired: torch.Tensor  # [w] bool, latents active on some token of this rank
    sync: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # averaged over ranks -> after_step


class SAE(nn.Module):
    """Base class: parameters, scaling, encode/decode, unit-norm decoder, AuxK, SAELens save/load."""

    arch: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    saelens_arch: ClassVar[str] = "standard"
    init_b_dec_to_mean: ClassVar[bool] = False

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        cfg = cfg.resolved()
        if cfg.arch != self.arch:
            raise ValueError(f"{type(self).__name__} is arch {self.arch!r}, config says {cfg.arch!r}")
        self.cfg = cfg
        d, w = cfg.d_in, cfg.width
        self.W_enc = nn.Parameter(torch.empty(d, w))
        self.W_dec = nn.Parameter(torch.empty(w, d))
        self.b_enc = nn.Parameter(torch.zeros(w))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    @staticmethod
    def default_lr(width: int, d_in: int) -> float:
        """Adam learning rate when cfg.lr is None: 3e-3 * min(1, sqrt(4096 / width)) * min(1, sqrt(128 / d_in)).

        Tuned on the organism (d 128, widths 256..4096, a few hundred steps); at LLM sizes it is
        within 1.5x of Gao et al.'s 2e-4 / sqrt(width / 2**14) (1.9e-4 at d 4096, width 32768)."""
        return 3e-3 * min(1.0, math.sqrt(4096 / width)) * min(1.0, math.sqrt(128 / d_in))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit directions scaled to init_dec_norm for W_dec; W_enc = W_dec^T; zero biases."""
        w_wd = torch.randn(self.W_dec.shape, generator=generator, dtype=self.W_dec.dtype)
        w_wd = w_wd / w_wd.norm(dim=1, keepdim=True) * self.cfg.init_dec_norm
        self.W_dec.copy_(w_wd)
        self.W_enc.copy_(w_wd.t())
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def init_from_data(self, x_s: torch.Tensor) -> None:
        """Data-dependent init from a batch of SCALED inputs: b_dec = their mean where the architecture asks."""
        if self.init_b_dec_to_mean:
            self.b_dec.copy_(x_s.float().mean(0))
        if self.cfg.unit_norm_decoder:
            # With W_enc = W_dec^T, the k latents chosen are the decoder rows most aligned with x, and
            # their sum overshoots x several times when w >> d (FVU > 1 at step 0). Scale the encoder by
            # the least-squares factor on this batch: the same latents fire, the start is FVU < 1.
            x = x_s[:8192].float()  # enough for one scalar; bounds the [n, w] pre-activations
            pre = (x - self.b_dec if self.cfg.apply_b_dec_to_input else x) @ self.W_enc + self.b_enc
            vals, idx = topk_latents(pre, min(self.cfg.k, self.cfg.width))  # the k chosen per token at the start
            recon = self._sparse_decode(idx, F.relu(vals))
            target = x - self.b_dec
            c = float((recon * target).sum() / recon.pow(2).sum().clamp_min(1e-12))
            if math.isfinite(c) and c > 0:
                self.W_enc.mul_(c)
                self.b_enc.mul_(c)

    # ------------------------------------------------------------------ inference
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def width(self) -> int:
        return self.cfg.width

    def _scaled(self, x_nd: torch.Tensor) -> torch.Tensor:
        return x_nd.to(self.W_enc.dtype) * self.cfg.input_scale

    def pre_acts(self, x_nd: torch.Tensor) -> torch.Tensor:
        """Pre-activations [..., w] of inputs in the model's units."""
        x = self._scaled(x_nd)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activation(self, pre_nw: torch.Tensor) -> torch.Tensor:
        """Per-token latents from pre-activations (inference)."""
        raise NotImplementedError

    def encode(self, x_nd: torch.Tensor) -> torch.Tensor:
        """Latent activations f [..., w] (post-activation) of inputs x [..., d] in the model's units."""
        return self.activation(self.pre_acts(x_nd))

    def decode(self, f_nw: torch.Tensor) -> torch.Tensor:
        """Reconstruction [..., d] in the model's units from latents [..., w]."""
        return (f_nw.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.cfg.input_scale

    def forward(self, x_nd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat [..., d] in the model's units, f [..., w])."""
        f = self.encode(x_nd)
        return self.decode(f), f

    # ------------------------------------------------------------------ training
    def training_losses(self, x_s: torch.Tensor, total_var: torch.Tensor, n_global: int, progress: float,
                        dead_mask: torch.Tensor | None) -> StepOut:
        """Loss and metrics of one step on SCALED inputs x_s [n_local, d].

        total_var: sum over the global batch of ||x - mean||^2 (scaled units); n_global: tokens in the
        global batch; progress: fraction of training done (for warm-ups); dead_mask: [w] latents
        counted dead (for AuxK) or None."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, sync: dict[str, torch.Tensor]) -> None:
        """After the optimizer step: renormalise decoder rows (and architecture state, e.g. thresholds)."""
        if self.cfg.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def before_step(self) -> None:
        """Before the optimizer step: drop the gradient component parallel to each unit decoder row."""
        if self.cfg.unit_norm_decoder and self.W_dec.grad is not None:
            g, W = self.W_dec.grad, self.W_dec
            g.sub_((g * W).sum(1, keepdim=True) * W)

    def _x_in(self, x_s: torch.Tensor) -> torch.Tensor:
        return x_s - self.b_dec.detach() if self.cfg.apply_b_dec_to_input else x_s

    def _selected(self, vals: torch.Tensor, x_in: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Differentiable pre-activations at (rows, cols) given their values (sparse backward)."""
        return _SelectedPre.apply(vals.reshape(-1), x_in, self.W_enc, self.b_enc, self.b_dec, rows, cols,
                                  bool(self.cfg.apply_b_dec_to_input))

    def _sparse_decode(self, cols: torch.Tensor, vals: torch.Tensor,
                       offsets: torch.Tensor | None = None) -> torch.Tensor:
        """sum_j vals[n, j] * W_dec[cols[n, j]] per token (no bias); cols [n, k], or flat with offsets."""
        return F.embedding_bag(cols, self.W_dec, offsets, per_sample_weights=vals, mode="sum")

    def _selected_losses(self, x_s: torch.Tensor, x_in: torch.Tensor, pre: torch.Tensor, cols: torch.Tensor,
                         vals: torch.Tensor, offsets: torch.Tensor | None, total_var: torch.Tensor, n_global: int,
                         dead_mask: torch.Tensor | None, sync: dict[str, torch.Tensor] | None = None) -> StepOut:
        """The step of the top-k family once its latents are chosen: decode `vals` at `cols` (sparse),
        loss = FVU + aux_coeff * AuxK, and the metrics."""
        x_hat = self._sparse_decode(cols, vals, offsets) + self.b_dec
        resid = x_s - x_hat
        err = resid.pow(2).sum()
        aux = self._auxk(pre, x_in, resid.detach(), total_var, dead_mask)
        with torch.no_grad():
            active = vals > 0
            fired = torch.zeros(self.cfg.width, dtype=torch.bool, device=x_s.device)
            fired[cols[active]] = True
        return StepOut(loss=err / total_var + self.cfg.aux_coeff * aux, fvu=err.detach() / total_var,
                       l0=active.sum() / n_global, aux=aux.detach(), fired=fired, sync=sync or {})

    def _auxk(self, pre_nw: torch.Tensor, x_in: torch.Tensor, resid_nd: torch.Tensor, total_var: torch.Tensor,
              dead_mask: torch.Tensor | None) -> torch.Tensor:
        """AuxK loss (Gao et al.): the top aux_k dead latents reconstruct the (detached) residual x - x_hat;
        squared error over the global batch's total variance, scaled by min(1, n_dead / aux_k) (as sparsify)."""
        zero = pre_nw.new_zeros(())
        if dead_mask is None or not self.cfg.aux_coeff:
            return zero
        dead_idx = torch.nonzero(dead_mask).flatten()
        n_dead = int(dead_idx.numel())
        if n_dead == 0:
            return zero
        k_aux = min(self.cfg.aux_k, n_dead)
        with torch.no_grad():
            sub = pre_nw.index_select(1, dead_idx) if n_dead < pre_nw.shape[1] else pre_nw
            a_pre, a_sub = sub.topk(k_aux, dim=1, sorted=False)
            a_cols = dead_idx[a_sub] if n_dead < pre_nw.shape[1] else a_sub
        n = x_in.shape[0]
        rows = _rows(n, k_aux, x_in.device)
        a_vals = F.relu(self._selected(a_pre, x_in, rows, a_cols.reshape(-1))).view(n, k_aux)
        e_hat = self._sparse_decode(a_cols, a_vals)
        return min(1.0, n_dead / self.cfg.aux_k) * (e_hat - resid_nd).pow(2).sum() / total_var

    # ------------------------------------------------------------------ SAELens layout
    def _saelens_cfg(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "architecture": self.saelens_arch,
            "d_in": cfg.d_in,
            "d_sae": cfg.width,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input),
            "normalize_activations": "none",  # the input scale is folded into the weights
            "reshape_activations": "none",
            "metadata": {"sae_lens_version": "6.0.0", "hook_name": _hook_name(cfg.site), "hook_head_index": None,
                         "prepend_bos": True, "context_size": None, "neuronpedia_id": None,
                         "model_name": getattr(self, "model_name", None) or "", "sightline_site": cfg.site},
        }

    def _extra_tensors(self) -> dict[str, torch.Tensor]:
        """Architecture tensors saved besides W_enc, W_dec, b_enc, b_dec (in SAELens' names)."""
        return {}

    def _load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    @torch.no_grad()
    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write cfg.json + sae_weights.safetensors (SAELens layout, input scale folded in); returns the folder."""
        from sightline.report.files import save_safetensors as save_file  # mode like every other file

        out = Path(path)
        s = float(self.cfg.input_scale)
        tensors = {
            "W_enc": (self.W_enc.detach().float() * s).contiguous().cpu(),
            "W_dec": (self.W_dec.detach().float() / s).contiguous().cpu(),
            "b_enc": self.b_enc.detach().float().contiguous().cpu(),
            "b_dec": (self.b_dec.detach().float() / s).contiguous().cpu(),
            **{k: v.detach().float().contiguous().cpu() for k, v in self._extra_tensors().items()},
        }
        cfg = {**self._saelens_cfg(), "sightline": {"format_version": FORMAT_VERSION, **self.cfg.to_dict()}}
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> SAE:
        """Load a folder written by `save_pretrained`, or a plain SAELens folder (standard, topk, jumprelu)."""
        from safetensors.torch import load_file

        root = Path(path)
        if not (root / CFG_FILE).is_file() or not (root / WEIGHTS_FILE).is_file():
            raise UserError(f"{root} is not an SAE folder (needs {CFG_FILE} and {WEIGHTS_FILE})")
        try:
            raw = json.loads((root / CFG_FILE).read_text())
        except ValueError as e:
            raise UserError(f"{root / CFG_FILE} is not valid JSON ({e})") from None
        tensors = load_file(str(root / WEIGHTS_FILE))
        missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec") if k not in tensors]
        if missing:
            raise UserError(f"{root / WEIGHTS_FILE} lacks {', '.join(missing)}; not an SAE in SAELens' layout")
        tensors = {k: v.float() for k, v in tensors.items()}
        if "sightline" in raw:
            cfg = SAEConfig.from_dict(raw["sightline"])
        else:
            cfg, tensors = _from_saelens(raw, tensors, root)
        sae = ARCHITECTURES[cfg.arch](cfg)
        s = float(sae.cfg.input_scale)
        with torch.no_grad():
            sae.W_enc.copy_(tensors["W_enc"] / s)
            sae.W_dec.copy_(tensors["W_dec"] * s)
            sae.b_enc.copy_(tensors["b_enc"])
            sae.b_dec.copy_(tensors["b_dec"] * s)
            sae._load_extra_tensors(tensors)
        sae.model_name = raw.get("metadata", {}).get("model_name") or ""
        return sae.to(device) if device is not None else sae


def _hook_name(site: str) -> str:
    """TransformerLens' hook name for a sightline site where one exists (resid.L -> blocks.L.hook_resid_pre)."""
    kind, _, layer = site.partition(".")
    names = {"resid": "hook_resid_pre", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}
    if kind in names and layer.isdigit():
        return f"blocks.{layer}.{names[kind]}"
    return site


def _from_saelens(raw: dict, tensors: dict[str, torch.Tensor], root: Path) -> tuple[SAEConfig, dict]:
    """A sightline config (input_scale 1) for a folder SAELens wrote, folding what can be folded."""
    arch = raw.get("architecture", "standard")
    if raw.get("normalize_activations", "none") not in ("none", None, False):
        raise UserError(f"{root}: normalize_activations={raw['normalize_activations']!r} is not supported; "
                        "fold the normalisation into the weights with SAELens first")
    d_in, width = tensors["W_enc"].shape
    common = dict(d_in=int(d_in), width=int(width), apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
                  unit_norm_decoder=False,
                  site=raw.get("metadata", {}).get("hook_name", "") or raw.get("hook_name", ""),
                  name=root.name)
    if arch == "standard":
        return SAEConfig(arch="relu", **common), tensors
    if arch == "topk":
        if raw.get("rescale_acts_by_decoder_norm"):  # fold ||W_dec|| into the encoder: same latents, plain top-k
            norm = tensors["W_dec"].norm(dim=1).clamp_min(1e-8)
            tensors = {**tensors, "W_enc": tensors["W_enc"] * norm, "b_enc": tensors["b_enc"] * norm,
                       "W_dec": tensors["W_dec"] / norm[:, None]}
        return SAEConfig(arch="topk", k=int(raw["k"]), **common), tensors
    if arch == "jumprelu":
        if "threshold" not in tensors:
            raise UserError(f"{root}: a jumprelu SAE needs a threshold tensor")
        return SAEConfig(arch="batchtopk", **common), tensors
    raise UserError(f"{root}: SAELens architecture {arch!r} is not supported (standard, topk, jumprelu are)")


def topk_latents(pre_nw: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly the k largest entries of each row (values, indices; unsorted), faster than torch.topk on CPU.

    Latents are cut into G = w/B groups of B (latent c*G + j is in group j, so the group maxima are a
    contiguous-friendly reduction); the
    k largest values of a row lie in the k groups with the largest maxima, so a cheap max over the
    groups, a top-k over G group maxima and a top-k over the k*B candidates replace a top-k over w
    (1.6x faster at w = 4096, k = 32 on one CPU thread)."""
    n, w = pre_nw.shape
    b = 1 << max(0, int(math.log2(max(1.0, math.sqrt(w / k)))))  # B ~ sqrt(w / k) balances the two top-ks
    while b > 1 and (w % b or w // b < k):
        b //= 2
    if b < 4 or pre_nw.device.type != "cpu":
        return pre_nw.topk(k, dim=1, sorted=False)
    g = w // b
    pv = pre_nw.view(n, b, g)  # column c of group j is latent c * g + j
    _, grp = pv.amax(1).topk(k, dim=1, sorted=False)  # [n, k] best groups
    cand = pv.gather(2, grp.unsqueeze(1).expand(-1, b, -1))  # [n, b, k]
    vals, ci = cand.reshape(n, b * k).topk(k, dim=1, sorted=False)
    return vals, (ci // k) * g + grp.gather(1, ci % k)


_ROWS_CACHE: dict[tuple[int, int, str], torch.Tensor] = {}


def _rows(n: int, k: int, device: torch.device) -> torch.Tensor:
    """[n * k] token index of each of k entries per token (cached: built every step otherwise)."""
    key = (n, k, str(device))
    if key not in _ROWS_CACHE:
        if len(_ROWS_CACHE) > 16:
            _ROWS_CACHE.clear()
        _ROWS_CACHE[key] = torch.arange(n, device=device).repeat_interleave(k)
    return _ROWS_CACHE[key]


ARCHITECTURES: dict[str, type[SAE]] = {}


def register_architecture(name: str) -> Callable[[type[SAE]], type[SAE]]:
    """Class decorator: make an SAE subclass available as `SAEConfig(arch=name)`."""

    def deco(cls: type[SAE]) -> type[SAE]:
        cls.arch = name
        ARCHITECTURES[name] = cls
        return cls

    return deco


@register_architecture("relu")
class ReLUSAE(SAE):
    """f = ReLU(pre); loss = mean ||x - x_hat||^2 + lambda * mean sum_i f_i ||W_dec_i|| (Rajaram et al. 2025).

    lambda warms up linearly over the first l1_warmup_frac of the steps; Adam lr 5e-5, gradient clip
    1.0, decoder rows initialised at norm 0.1 with W_enc = W_dec^T (the paper's settings)."""

    defaults: ClassVar[dict[str, Any]] = dict(init_dec_norm=0.1, apply_b_dec_to_input=False,
                                              unit_norm_decoder=False, aux_coeff=0.0, grad_clip=1.0)
    saelens_arch = "standard"

    @staticmethod
    def default_lr(width: int, d_in: int) -> float:
        return 5e-5

    def activation(self, pre_nw: torch.Tensor) -> torch.Tensor:
        return F.relu(pre_nw)

    def training_losses(self, x_s, total_var, n_global, progress, dead_mask) -> StepOut:
        x_in = x_s - self.b_dec if self.cfg.apply_b_dec_to_input else x_s
        pre = torch.addmm(self.b_enc, x_in, self.W_enc)
        f = F.relu(pre)
        x_hat = torch.addmm(self.b_dec, f, self.W_dec)
        err = (x_hat - x_s).pow(2).sum()
        sparsity = (f @ self.W_dec.norm(dim=1)).sum() / n_global
        warm = min(1.0, progress / self.cfg.l1_warmup_frac) if self.cfg.l1_warmup_frac > 0 else 1.0
        aux = self._auxk(pre.detach(), self._x_in(x_s), (x_s - x_hat).detach(), total_var, dead_mask)
        loss = err / n_global + self.cfg.l1_coeff * warm * sparsity + self.cfg.aux_coeff * aux
        with torch.no_grad():
            active = f > 0
            return StepOut(loss=loss, fvu=err.detach() / total_var, l0=active.sum() / n_global, aux=aux.detach(),
                           fired=active.any(0))


@register_architecture("topk")
class TopKSAE(SAE):
    """f = ReLU of the k largest pre-activations per token (Gao et al. 2024); loss = FVU + aux_coeff * AuxK."""

    defaults: ClassVar[dict[str, Any]] = dict(init_dec_norm=1.0, apply_b_dec_to_input=True, unit_norm_decoder=True,
                                              aux_coeff=1 / 32, grad_clip=0.0)
    saelens_arch = "topk"
    init_b_dec_to_mean = True

    def activation(self, pre_nw: torch.Tensor) -> torch.Tensor:
        flat = pre_nw.reshape(-1, pre_nw.shape[-1])
        vals, idx = topk_latents(flat, self.cfg.k)
        return torch.zeros_like(flat).scatter_(-1, idx, F.relu(vals)).view(pre_nw.shape)

    def _saelens_cfg(self) -> dict[str, Any]:
        return {**super()._saelens_cfg(), "k": self.cfg.k, "rescale_acts_by_decoder_norm": False}

    def training_losses(self, x_s, total_var, n_global, progress, dead_mask) -> StepOut:
        k = self.cfg.k
        n = x_s.shape[0]
        x_in = self._x_in(x_s)
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x_in, self.W_enc)
            top_pre, idx = topk_latents(pre, k)
        vals = F.relu(self._selected(top_pre, x_in, _rows(n, k, x_s.device), idx.reshape(-1))).view(n, k)
        return self._selected_losses(x_s, x_in, pre, idx, vals, None, total_var, n_global, dead_mask)


@register_architecture("batchtopk")
class BatchTopKSAE(SAE):
    """Training: the k * n largest pre-activations over the whole batch (Bussmann et al. 2024), so tokens
    get a variable number of latents averaging k. Inference: per token, f = ReLU(pre) where pre > threshold,
    the threshold an EMA of the smallest selected activation during training (saved as SAELens 'jumprelu').
    Under DDP the batch-level selection is over each rank's share of the batch."""

    defaults: ClassVar[dict[str, Any]] = dict(init_dec_norm=1.0, apply_b_dec_to_input=True, unit_norm_decoder=True,
                                              aux_coeff=1 / 32, grad_clip=0.0)
    saelens_arch = "jumprelu"
    init_b_dec_to_mean = True

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(self.cfg.width))

    def activation(self, pre_nw: torch.Tensor) -> torch.Tensor:
        return F.relu(pre_nw) * (pre_nw > self.threshold)

    def _extra_tensors(self) -> dict[str, torch.Tensor]:
        return {"threshold": self.threshold}

    def _load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "threshold" in tensors:
            self.threshold.copy_(tensors["threshold"])

    def training_losses(self, x_s, total_var, n_global, progress, dead_mask) -> StepOut:
        n, w = x_s.shape[0], self.cfg.width
        x_in = self._x_in(x_s)
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x_in, self.W_enc)
            top_pre, flat = pre.view(-1).topk(min(self.cfg.k * n, n * w), sorted=False)
            flat, order = flat.sort()  # token-major, as embedding_bag's bags need
            top_pre = top_pre[order]
            rows, cols = flat // w, flat % w
            offsets = torch.searchsorted(rows, torch.arange(n, device=x_s.device))
        vals = F.relu(self._selected(top_pre, x_in, rows, cols))
        with torch.no_grad():  # the threshold's EMA follows the smallest selected activation
            active = vals > 0
            min_pos = vals[active].min() if bool(active.any()) else vals.new_zeros(())
        return self._selected_losses(x_s, x_in, pre, cols, vals, offsets, total_var, n_global, dead_mask,
                                     sync={"min_active": min_pos})

    @torch.no_grad()
    def after_step(self, sync: dict[str, torch.Tensor]) -> None:
        super().after_step(sync)
        m = sync["min_active"].to(self.threshold)
        if bool((self.threshold == 0).all()):  # first step: start at the observed value, not at 0
            self.threshold.fill_(float(m))
        else:
            self.threshold.mul_(1 - self.cfg.threshold_momentum).add_(self.cfg.threshold_momentum * m)

"""Input-agnostic image keys: how much of each (layer, KV head, image-token position)'s key depends on the image.

Over N images shown with the same prompt, every image-token position p of layer L and KV head h has one
key per image, k_i (head_dim). Streamed over batches (shifted sums added to float64 accumulators, `KeyMoments`, so memory does
not grow with N and an image-independent key gives exactly zero variance):

    var          across-image variance at p:        mean_i ||k_i - mu_p||^2           mu_p = mean_i k_i
    var_ratio    var / total, total = the (L, h)'s variance over ALL images and positions
                 = mean_p var_p + mean_p ||mu_p - m||^2 (m = mean_p mu_p): the flagging statistic
    image_share  var / mean_i ||k_i||^2: the share of the key's second moment that depends on the image
    cosine       mean_i cos(k_i, mu_p): 1 when every image gives the same key
    norm         mean_i ||k_i||
    cos_to_grand cos(mu_p, m): 1 when the position's mean key is the layer-head's mean key

A key is flagged input-agnostic when var_ratio < threshold (default FLAG_THRESHOLD = 0.02): its image-driven
spread is under 2% of how much that head's keys vary at all. var_ratio is judged against the head's own total,
so it does not depend on the head's scale, and a key that is merely large (a big constant part beside a normal
image-driven part) is not flagged, where image_share would call it agnostic. Measured on the organism: planted
image-independent keys give exactly 0; on noise images (which differ at every position) the lowest var_ratio
is 0.18-0.30 (24 images, seeds 0-2); on its own synthetic world the corner tokens, often empty background in
every image, reach 0.008-0.04 (16-64 scenes, seeds 0-3): keys that are image-independent because the images
are. The same statistic of the projector output at each position (`input`, the language model's input there)
tells the two apart: a model-made agnostic key has a low var_ratio where its input's is not low.

Both kinds of key are read: `keys` as cached (post-RoPE, what attention sees) and `keys_prerope`. RoPE
rotates each position's key by a fixed angle, the same for every image, so per position var, image_share,
cosine and norm are the SAME before and after it; only the pooled total differs: post-RoPE, the rotation
spreads the mean keys over positions (`position_share` = mean_p ||mu_p - m||^2 / total per layer-head),
which can make var_ratio look small for a purely positional reason. A key flagged post-RoPE but not
pre-RoPE is such a rotation artifact (`rope_only`).

    scan = scan_keys(adapter, images)                       # KeyScan: stats per kind, first images' keys
    flags = scan.flags("keys")                        # bool [n_layers, n_kv_heads, n_positions]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from sightline.errors import UserError

KINDS = ("keys", "keys_prerope")
FLAG_THRESHOLD = 0.02
STATS = ("var", "var_ratio", "image_share", "cosine", "norm", "cos_to_grand")


class KeyMoments:
    """Running per-(layer, head, position) moments of keys over images (the shifted-data algorithm).

    `update(keys)` takes one batch [B, n_layers, n_heads, n_positions, head_dim]; `finish()` gives the
    statistics of the module docstring. Every image's key is taken relative to the first image's key at the same
    (layer, head, position), the shift c: a batch's sums of y = k - c and of ||y||^2 are formed in the keys' own
    dtype (one pass each, float32 for captured keys) and added to float64 accumulators, and var = mean ||y||^2 -
    ||mean y||^2. The shift is a data point, so the subtraction loses nothing to cancellation; keys equal to the
    first image's give y = 0 exactly, hence exactly zero variance whatever the batching. Memory: a few arrays of
    [n_layers, n_heads, n_positions, head_dim].
    """

    def __init__(self, shape_lhpd: tuple[int, int, int, int], device: str | torch.device = "cpu"):
        L, H, P, d = shape_lhpd
        z = {"dtype": torch.float64, "device": device}
        self.n = 0
        self.shift: torch.Tensor | None = None  # the first image's keys [L, H, P, d], in the keys' dtype
        self.s1 = torch.zeros(L, H, P, d, **z)  # sum_i (k_i - shift)
        self.s2 = torch.zeros(L, H, P, **z)  # sum_i ||k_i - shift||^2
        self.sq = torch.zeros(L, H, P, **z)  # sum_i ||k_i||^2
        self.norm = torch.zeros(L, H, P, **z)  # sum_i ||k_i||
        self.unit = torch.zeros(L, H, P, d, **z)  # sum_i k_i / ||k_i||

    @torch.no_grad()
    def update(self, keys_blhpd: torch.Tensor, scratch: bool = False) -> None:
        """Add one batch of images' keys [B, L, H, P, d] (float32 or float64; other dtypes are read as float32).
        `scratch`: the batch tensor is the caller's to lose, and is overwritten (saves two copies of it)."""
        x = keys_blhpd.to(device=self.s1.device)
        if x.dtype not in (torch.float32, torch.float64):
            x, scratch = x.float(), True
        if x.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = x[0].clone()
        norms = torch.linalg.vector_norm(x, dim=-1)  # [B, L, H, P]
        self.sq += norms.square().sum(0)
        self.norm += norms.sum(0)
        inv = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
        shift = self.shift.to(x.dtype)
        y = x.sub_(shift) if scratch else x - shift
        self.s1 += y.sum(0)
        self.s2 += torch.linalg.vector_norm(y, dim=-1).square().sum(0)
        # sum_i k_i / |k_i| = sum_i y_i / |k_i| + shift * sum_i 1 / |k_i|
        self.unit += y.mul_(inv[..., None]).sum(0) + shift * inv.sum(0)[..., None]
        self.n += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        """The across-image mean key [L, H, P, d], float64."""
        if self.shift is None:
            return torch.zeros_like(self.s1)
        return self.shift.double() + self.s1 / self.n

    def finish(self) -> dict[str, np.ndarray]:
        """The statistics (module docstring) as float64 arrays [L, H, P], plus `total` and `position_share` [L, H]."""
        if self.n < 2:
            raise UserError(f"key statistics need at least 2 images, got {self.n}; pass more images (--n-images)")
        n = self.n
        mean_y = self.s1 / n
        var = (self.s2 / n - mean_y.square().sum(-1)).clamp_min(0.0)  # rounding can leave -1e-16 where var is 0
        mu = self.mean
        grand = mu.mean(2, keepdim=True)
        pos_var = (mu - grand).square().sum(-1).mean(2)  # [L, H]
        total = var.mean(2) + pos_var
        second = self.sq / n
        mu_norm = mu.norm(dim=-1)
        cosine = torch.where(mu_norm > 0, (self.unit / n * mu).sum(-1) / torch.where(mu_norm > 0, mu_norm, 1.0), 0.0)
        # the unit vectors are summed in the keys' dtype: keep the cosine in [-1, 1], and exactly 1 where every
        # image gave the same (non-zero) key
        cosine = torch.where((var == 0) & (mu_norm > 0), 1.0, cosine.clamp(-1.0, 1.0))
        g_norm = grand.norm(dim=-1)
        den = mu_norm * g_norm
        cos_grand = torch.where(den > 0, (mu * grand).sum(-1) / torch.where(den > 0, den, 1.0), 0.0)

        def ratio(a, b):  # 0 / 0 = 0: nothing varies, so nothing depends on the image
            return torch.where(b > 0, a / torch.where(b > 0, b, 1.0), torch.zeros_like(a))

        out = {"var": var, "var_ratio": ratio(var, total[..., None]), "image_share": ratio(var, second),
               "cosine": cosine, "norm": self.norm / n, "cos_to_grand": cos_grand, "total": total,
               "position_share": ratio(pos_var, total)}
        return {k: v.cpu().numpy() for k, v in out.items()}


@dataclass
class KeyScan:
    """What `scan_keys` found: per kind ("keys", "keys_prerope") the statistics (`KeyMoments.finish`), the
    layers read, the token grid (rows, cols), the first images' keys (for the PCA figure) and the image
    positions of the first sequence."""

    layers: list[int]
    kinds: tuple[str, ...]
    grid_hw: tuple[int, int]
    n_images: int
    stats: dict[str, dict[str, np.ndarray]]
    input_stats: dict[str, np.ndarray] | None = None  # the projector output's statistics, [1, 1, P] (input control)
    examples: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> [n_kept, L, H, P, d] float32
    positions: np.ndarray | None = None  # sequence positions of the grid (row-major) in the first example

    def flags(self, kind: str = "keys", threshold: float = FLAG_THRESHOLD) -> np.ndarray:
        """bool [n_layers read, n_kv_heads, n_positions]: the input-agnostic keys (var_ratio < threshold)."""
        if kind not in self.stats:
            raise UserError(f"no {kind} in this scan; it read {', '.join(self.stats)}")
        return self.stats[kind]["var_ratio"] < threshold

    def flagged_positions(self, kind: str = "keys", threshold: float = FLAG_THRESHOLD) -> dict[tuple[int, int], np.ndarray]:
        """{(layer, KV head): grid indices (row-major) of its flagged keys} for every layer-head with any."""
        f = self.flags(kind, threshold)
        return {(L, h): np.flatnonzero(f[i, h]) for i, L in enumerate(self.layers) for h in range(f.shape[1])
                if f[i, h].any()}


def _batches(images: Iterable, batch_size: int) -> Iterator[list]:
    chunk: list = []
    for im in images:
        chunk.append(im)
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@torch.no_grad()
def scan_keys(adapter, images: Iterable, *, prompt: str = "", prefix: str | None = None,
              layers: Sequence[int] | None = None, kinds: Sequence[str] = KINDS, view: int = 0, batch_size: int = 8,
              keep_examples: int = 2, input_control: bool = True, progress: bool = False,
              total: int | None = None) -> KeyScan:
    """Stream `images` (PIL, any iterable) through the model with the same prompt and accumulate the key
    statistics of every chosen layer (default: every layer with keys), KV head and grid position.

    One forward per batch reads every kind's keys at the grid tokens of `view`; every image must give the
    same grid (one image size). `keep_examples` images' keys are kept for the PCA figure. `input_control`: also
    the statistics of the projector output (what enters the language model) at the same positions.
    """
    from tqdm.auto import tqdm

    from sightline.capture import Capture

    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise UserError(f"unknown key kind {bad[0] if bad else ''!r}; kinds are {', '.join(KINDS)}")
    layers = list(adapter.kv_layers if layers is None else layers)
    for L in layers:
        if L not in adapter.kv_layers:
            raise UserError(f"layer {L} has no keys: layers with keys are {', '.join(map(str, adapter.kv_layers))}")
    sites = [f"{k}.{L}" for k in kinds for L in layers] + (["projector"] if input_control else [])
    capture = Capture(adapter, sites, dtype=torch.float32)
    text = adapter.render_prompt(prompt, prefix=prefix)
    moments: dict[str, KeyMoments] = {}
    examples: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    grid_hw = None
    first_positions = None
    n = 0
    bar = tqdm(total=total, desc="key scan", unit="img", disable=not progress, dynamic_ncols=True)
    for chunk in _batches(images, max(1, int(batch_size))):
        batch = adapter.prepare(chunk, [text] * len(chunk))
        positions = []
        for i, lay in enumerate(batch.layouts):
            try:
                g = lay.grid(0, view)
            except KeyError:
                raise UserError(f"--view {view}: this model gives no view {view}; its views are "
                                f"{sorted({gg.view for gg in lay.grids})}") from None
            hw = (int(g.rows), int(g.cols))
            if grid_hw is None:
                grid_hw = hw
                first_positions = lay.grid_positions(0, view).reshape(-1)
            elif hw != grid_hw:
                raise UserError(f"image {n + i} gives a {hw[0]}x{hw[1]} token grid, the first gave "
                                f"{grid_hw[0]}x{grid_hw[1]}: key statistics compare positions, so use images of one size")
            positions.append(lay.grid_positions(0, view).reshape(-1))
        got = capture.run(batch, positions)
        for kind in kinds:
            x = torch.stack([torch.stack([g[f"{kind}.{L}"].transpose(0, 1) for L in layers])
                             for g in got])  # [B, L, H, P, d], contiguous
            if kind not in moments:
                moments[kind] = KeyMoments(tuple(x.shape[1:]))
            kept = sum(len(e) for e in examples[kind])
            if kept < keep_examples:
                examples[kind].append(x[: keep_examples - kept].clone())
            moments[kind].update(x, scratch=True)
        if input_control:
            x = torch.stack([g["projector"] for g in got])[:, None, None]  # [B, 1, 1, P, D]
            if "input" not in moments:
                moments["input"] = KeyMoments(tuple(x.shape[1:]))
            moments["input"].update(x, scratch=True)
        n += len(chunk)
        bar.update(len(chunk))
    bar.close()
    if n < 2:
        raise UserError(f"key statistics need at least 2 images, got {n}")
    stats = {k: m.finish() for k, m in moments.items()}
    return KeyScan(layers, kinds, grid_hw, n, {k: stats[k] for k in kinds}, stats.get("input"),
                   {k: torch.cat(v) for k, v in examples.items() if v}, first_positions)


# ------------------------------------------------------------------------------------ planted keys
def _kv_view(out: torch.Tensor, n_kv: int, hd: int, heads_first: bool) -> torch.Tensor:
    """The pre-RoPE key module's output as a [B, S, n_kv, hd] view (writes go through to `out`)."""
    if heads_first:
        return out.transpose(1, 2)
    return out.view(out.shape[0], out.shape[1], n_kv, hd)


@contextmanager
def plant_constant_keys(adapter, plants: Mapping[tuple[int, int], Sequence[int] | np.ndarray], *,
                        shared: bool = False, scale: float = 1.0, seed: int = 0) -> Iterator[dict]:
    """Within the block the model's keys are image-independent by construction at chosen positions.

    plants: {(layer, KV head): sequence positions}. The pre-RoPE key (the output of k_proj, or of the k-norm)
    of that head at those positions is replaced by a constant: one random vector per position (N(0, scale^2)
    entries, from `seed`), or with `shared` one vector for every planted position of the layer-head. RoPE then
    rotates it by the position's fixed angle, so the cached key is constant across images too, exactly
    (for sequences whose positions line up: the same prompt). Only the forward call that holds the positions
    (the prefill) is touched. Yields {(layer, head): the constants [n_positions, head_dim]}.
    """
    hd, n_kv = adapter.head_dim, adapter.n_kv_heads
    gen = torch.Generator().manual_seed(int(seed))
    consts: dict[tuple[int, int], torch.Tensor] = {}
    by_layer: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for (L, h), pos in sorted(plants.items()):
        if L not in adapter.kv_layers or not 0 <= h < n_kv:
            raise UserError(f"cannot plant keys at layer {L} head {h}: layers {adapter.kv_layers}, KV heads 0..{n_kv - 1}")
        pos_t = torch.as_tensor(np.asarray(pos, dtype=np.int64).reshape(-1))
        rows = 1 if shared else len(pos_t)
        c = torch.randn(rows, hd, generator=gen, dtype=torch.float64) * scale
        c = c.expand(len(pos_t), hd).contiguous()
        consts[L, h] = c
        by_layer.setdefault(L, []).append((h, pos_t, c))
    hooks = []

    def hook_for(L):
        heads_first = adapter.prerope_keys_heads_first(L)

        def post(m, a, out):
            o = out[0] if isinstance(out, (tuple, list)) else out
            new = o.clone()
            v = _kv_view(new, n_kv, hd, heads_first)
            S = v.shape[1]
            for h, pos, c in by_layer[L]:
                if len(pos) and int(pos.max()) < S:
                    v[:, pos.to(v.device), h] = c.to(device=v.device, dtype=v.dtype)
            return (new, *out[1:]) if isinstance(out, (tuple, list)) else new

        return post

    try:
        for L in by_layer:
            hooks.append(adapter.prerope_keys_module(L).register_forward_hook(hook_for(L)))
        yield consts
    finally:
        for hk in hooks:
            hk.remove()

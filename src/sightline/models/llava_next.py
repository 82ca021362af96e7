"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, also Llama-3-LLaVA-NeXT): base view + unpadded anyres map.

Each image becomes crops: crop 0 is the whole image squashed to the tower's square input (the base
view, g x g tokens, no newline), crops 1.. are tiles of the image resized to fit the best
`image_grid_pinpoints` resolution and padded to it. HF lays the tiles out as one
(nph*g) x (npw*g) map, crops the padding rows or columns away (`unpad_image`, on the token grid) and
emits the map row by row, each row followed by one `image_newline` token. The geometry below
mirrors that on sizes: resize for patching, centred pad, tile grid, then the unpad offsets.
Patches are `patch_size` processed pixels; where a crop is not a whole number of patches
(SigLIP-384 with 14-px patches: 27 patches = 378 px) the rest of each tile is seen by no token, so
the map is affine only piecewise and its grid carries exact per-column / per-row spans.
LLaVA-OneVision (llava_onevision.py) reuses all of it and adds the anyres_max interpolation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from sightline.models.base import Adapter, Batch, ModuleNames, register
from sightline.models.geometry import clip_style_grid
from sightline.models.layout import TokenLayout, ViewGrid

# Tiny checkpoints (`build_tiny`): tiles of 56 px with patch 14 give 4 x 4 tokens per crop. The
# pinpoints are LLaVA-NeXT's set scaled down (336 -> 56), so images of 20..300 px take 1 to 3 tiles
# and every unpad direction occurs.
TINY_PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]


def select_best_resolution(image_hw: tuple[int, int], pinpoints) -> tuple[int, int]:
    """HF's anyres choice of (height, width) among `image_grid_pinpoints` for an image."""
    from transformers.image_processing_utils import select_best_resolution as hf_select

    return tuple(int(v) for v in hf_select(tuple(image_hw), [tuple(p) for p in pinpoints]))


def patch_output_hw(image_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """Size of the image after HF's aspect-preserving resize for patching (`get_patch_output_size`)."""
    h, w = image_hw
    th, tw = target_hw
    scale_w, scale_h = tw / w, th / h
    if scale_w < scale_h:
        return min(math.ceil(h * scale_w), th), tw
    return th, min(math.ceil(w * scale_h), tw)


def unpad_window(image_hw: tuple[int, int], map_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, rows, cols) of the token map that HF's `unpad_image` keeps."""
    h, w = image_hw
    cur_h, cur_w = map_hw
    if w / h > cur_w / cur_h:
        new_h = int(round(h * (cur_w / w), 7))
        pad = (cur_h - new_h) // 2
        return pad, 0, cur_h - 2 * pad, cur_w
    new_w = int(round(w * (cur_h / h), 7))
    pad = (cur_w - new_w) // 2
    return 0, pad, cur_h, cur_w - 2 * pad


@dataclass(frozen=True)
class AnyresPlan:
    """Everything about one image's anyres processing that its token grids depend on (sizes only)."""

    image_hw: tuple[int, int]
    side: int  # g: tokens per crop side
    tiles_hw: tuple[int, int]  # (nph, npw) tiles of the padded best resolution
    window: tuple[int, int, int, int]  # unpad window (top, left, rows, cols) on the (nph*g) x (npw*g) map
    base_origin_xy: tuple[float, float]
    base_step_xy: tuple[float, float]
    map_col_spans: np.ndarray  # [cols, 2] original-pixel x0, x1 of each column of the UNPADDED map
    map_row_spans: np.ndarray  # [rows, 2] y0, y1 of each row
    map_pitch_xy: tuple[float, float]  # pixels per map token (one patch)

    @property
    def n_crops(self) -> int:
        return 1 + self.tiles_hw[0] * self.tiles_hw[1]


def _crop_pipeline(image_processor):
    """The per-crop steps (resize to `size`, optional centre crop) as a CLIP-style processor, no pad."""
    return SimpleNamespace(
        do_pad=False,
        size=image_processor.size,
        do_resize=getattr(image_processor, "do_resize", True),
        do_center_crop=getattr(image_processor, "do_center_crop", False),
        crop_size=getattr(image_processor, "crop_size", None),
    )


def _sd(size, key):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _patch_pitch(pipeline, in_hw, vision_config):
    """(origin_xy, pitch_xy): where patch (0, 0) starts and how far apart patches are, in the crop
    pipeline's INPUT pixels. Patches are `patch_size` processed pixels; when the tower's input is
    not a whole number of patches (SigLIP 384 / 14), the last few processed pixels are seen by none."""
    (ox, oy), (ex, ey) = clip_style_grid(pipeline, in_hw, 1, 1)  # whole processed crop, in input px
    k = vision_config.patch_size / vision_config.image_size  # processed crop is image_size px square
    return (ox, oy), (ex * k, ey * k)


def _map_spans(start: int, count: int, side: int, tile: int, origin: float, pitch: float, paste: int, scale: float):
    """Original-pixel spans of `count` map tokens from `start` along one axis of the tiled map."""
    tile_idx, within = np.divmod(start + np.arange(count), side)
    x0 = tile_idx * tile + origin + within * pitch  # on the padded canvas of the best resolution
    return (np.stack([x0, x0 + pitch], axis=1) - paste) * scale


def spans_grid(image: int, view: int, image_hw, col_spans, row_spans, pitch_xy, **kw) -> ViewGrid:
    """A ViewGrid from per-column and per-row pixel spans: affine when they are evenly spaced and
    contiguous (origin/step only), otherwise carrying the spans (origin/step: the mean pitch)."""
    xs, ys = np.asarray(col_spans, np.float64), np.asarray(row_spans, np.float64)

    def affine(sp, pitch):
        if len(sp) == 0:
            return 0.0, float(pitch), True
        step = (sp[-1, 1] - sp[0, 0]) / len(sp)
        even = sp[0, 0] + np.arange(len(sp) + 1) * step
        tol = 1e-9 * max(1.0, float(np.abs(sp).max()))
        ok = np.allclose(sp[:, 0], even[:-1], rtol=0, atol=tol) and np.allclose(sp[:, 1], even[1:], rtol=0, atol=tol)
        return float(sp[0, 0]), float(step), ok

    ox, sx, ax = affine(xs, pitch_xy[0])
    oy, sy, ay = affine(ys, pitch_xy[1])
    exact = {} if ax and ay else {"col_spans": xs, "row_spans": ys}
    return ViewGrid(image, view, len(ys), len(xs), tuple(image_hw), (ox, oy), (sx, sy), **exact, **kw)


def anyres_plan(image_processor, config, image_hw: tuple[int, int]) -> AnyresPlan:
    """Mirror, on sizes, the anyres image processor and the model's `pack_image_features`."""
    vc = config.vision_config
    g = vc.image_size // vc.patch_size
    h, w = image_hw
    ip = image_processor
    pipeline = _crop_pipeline(ip)
    # the crop size the processor tiles with (crop_size.height, else size.height, else shortest_edge)
    size, crop = ip.size, getattr(ip, "crop_size", None)
    tile = int((crop and _sd(crop, "height")) or _sd(size, "height") or _sd(size, "shortest_edge"))
    if tile != vc.image_size:
        raise ValueError(f"image processor tiles of {tile} px do not match the vision tower's {vc.image_size} px")

    # base view: the whole image resized (not aspect-preserving) to a square, then the crop pipeline
    if _sd(size, "height") and _sd(size, "width"):
        base_hw = (int(_sd(size, "height")), int(_sd(size, "width")))
    else:
        base_hw = (int(_sd(size, "shortest_edge")),) * 2
    (ox, oy), (px, py) = _patch_pitch(pipeline, base_hw, vc)
    fx, fy = w / base_hw[1], h / base_hw[0]
    base_origin, base_step = (ox * fx, oy * fy), (px * fx, py * fy)

    # tiles of the padded best resolution, laid out as one map, then unpadded on the token grid
    (tox, toy), (tpx, tpy) = _patch_pitch(pipeline, (tile, tile), vc)
    best_h, best_w = select_best_resolution(image_hw, config.image_grid_pinpoints)
    nph, npw = best_h // vc.image_size, best_w // vc.image_size  # as get_anyres_image_grid_shape
    new_h, new_w = patch_output_hw(image_hw, (best_h, best_w))
    paste_y, paste_x = (best_h - new_h) // 2, (best_w - new_w) // 2
    top, left, rows, cols = unpad_window(image_hw, (nph * g, npw * g))
    col_spans = _map_spans(left, cols, g, tile, tox, tpx, paste_x, w / new_w)
    row_spans = _map_spans(top, rows, g, tile, toy, tpy, paste_y, h / new_h)
    pitch = (tpx * w / new_w, tpy * h / new_h)
    return AnyresPlan((h, w), g, (nph, npw), (top, left, rows, cols), base_origin, base_step, col_spans, row_spans, pitch)


def num_crops(image_hw: tuple[int, int], pinpoints, tile: int) -> int:
    """Crops of one image fed to the tower, as HF's `image_size_to_num_patches` counts them."""
    bh, bw = select_best_resolution(image_hw, pinpoints)
    return 1 + math.ceil(bh / tile) * math.ceil(bw / tile)


@register
class LlavaNextAdapter(Adapter):
    family = "llava_next"
    architectures = ("LlavaNextForConditionalGeneration",)
    model_types = ("llava_next",)
    hf_class = "LlavaNextForConditionalGeneration"
    modules = ModuleNames()  # HF's LLaVA layout (the defaults): model.language_model, model.vision_tower, ...

    @classmethod
    def build_tiny(
        cls,
        out_dir: str | Path,
        image_size: int = 56,
        patch_size: int = 14,
        image_grid_pinpoints: list | None = None,
        text: dict | None = None,
        vision: dict | None = None,
        seed: int = 0,
    ) -> Path:
        """A random LlavaNextForConditionalGeneration (CLIP tower, Llama LM) with processor, saved to `out_dir`."""
        from transformers import LlavaNextImageProcessor, LlavaNextProcessor

        from sightline.models.testing import llava_config, make_tokenizer, save_tiny

        pinpoints = image_grid_pinpoints or [[a * image_size // 56, b * image_size // 56] for a, b in TINY_PINPOINTS]
        tok = make_tokenizer("<image>")
        config = llava_config("LlavaNextConfig", tok, image_size, patch_size, text, vision, image_grid_pinpoints=pinpoints)
        ip = LlavaNextImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=pinpoints,
        )
        proc = LlavaNextProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS, as in llava-hf/llava-v1.6-*-hf
            chat_template=tok.chat_template,
        )
        return save_tiny(cls, config, proc, out_dir, seed)

    # ------------------------------------------------------------------ facts
    @property
    def grid_side(self) -> int:
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    @property
    def vision_seq_len(self) -> int:
        """Positions per crop in the tower's hidden states (patches plus CLS where the tower has one)."""
        tower = self.vision_tower
        emb = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
        n = getattr(emb, "num_positions", None)
        if n is None:  # towers without the attribute: CLIP-like have a CLS, SigLIP-like do not
            n = self.grid_side**2 + int("clip" in self.config.vision_config.model_type)
        return int(n)

    @property
    def vision_prefix(self) -> int:
        """Tower positions before the first patch (1 for CLIP's CLS, 0 for SigLIP)."""
        return self.vision_seq_len - self.grid_side**2

    def _check_strategy(self) -> None:
        # HF reshapes each crop's selected features to g x g: only these combinations are coherent
        drop = int(self.config.vision_feature_select_strategy == "default")
        if self.vision_seq_len - drop != self.grid_side**2:
            raise ValueError(
                f"vision_feature_select_strategy={self.config.vision_feature_select_strategy!r} leaves "
                f"{self.vision_seq_len - drop} features per crop, not the {self.grid_side}x{self.grid_side} "
                "grid the model reshapes them to; this checkpoint's config is inconsistent"
            )

    def plan(self, image_hw: tuple[int, int]) -> AnyresPlan:
        """Sizes and geometry of one image's crops and token maps."""
        return anyres_plan(self.processor.image_processor, self.config, image_hw)

    # ------------------------------------------------------------------ grids
    def _base_grid(self, k: int, p: AnyresPlan, crop_offset: int) -> ViewGrid:
        g, seq = p.side, self.vision_seq_len
        vi = (crop_offset * seq + self.vision_prefix + np.arange(g * g)).reshape(g, g)
        return ViewGrid(k, 0, g, g, p.image_hw, p.base_origin_xy, p.base_step_xy, vision_index=vi)

    def _map_index(self, p: AnyresPlan, crop_offset: int) -> np.ndarray:
        """Vision row of each token of the unpadded map, [rows, cols]."""
        g, seq = p.side, self.vision_seq_len
        top, left, rows, cols = p.window
        rr = np.arange(rows)[:, None] + top  # row on the full (nph*g) x (npw*g) map
        cc = np.arange(cols)[None, :] + left
        crop = crop_offset + 1 + (rr // g) * p.tiles_hw[1] + cc // g  # tiles row-major after the base
        return crop * seq + self.vision_prefix + (rr % g) * g + cc % g

    def source_map_grid(self, k: int, p: AnyresPlan, crop_offset: int = 0) -> ViewGrid:
        """Image k's unpadded high-resolution map as the tower sees it, 1:1 with patches."""
        vi = self._map_index(p, crop_offset)
        return spans_grid(
            k, 1, p.image_hw, p.map_col_spans, p.map_row_spans, p.map_pitch_xy, newline=True, vision_index=vi
        )

    def map_grid(self, k: int, p: AnyresPlan, crop_offset: int = 0) -> ViewGrid:
        """View 1 as the language model receives it (LLaVA-NeXT: the source map itself)."""
        return self.source_map_grid(k, p, crop_offset)

    def image_grids(self, inputs, example: int, image_sizes_hw):
        """Per image: view 0 the base g x g grid, view 1 the unpadded high-resolution map."""
        self._check_strategy()
        grids = []
        crop_offset = 0  # vision rows are per example: crops of earlier images come first
        for k, hw in enumerate(image_sizes_hw):
            p = self.plan(tuple(int(v) for v in hw))
            grids.append([self._base_grid(k, p, crop_offset), self.map_grid(k, p, crop_offset)])
            crop_offset += p.n_crops
        return grids

    def vision_rows(self, batch: Batch, layout: TokenLayout) -> int:
        """Real crops of the example's images (not the batch padding) times positions per crop."""
        tile = self.config.vision_config.image_size
        sizes = [g.image_size_hw for g in layout.grids if g.view == 0]
        return sum(num_crops(hw, self.config.image_grid_pinpoints, tile) for hw in sizes) * self.vision_seq_len

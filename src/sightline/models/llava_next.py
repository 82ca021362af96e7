"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, also Llama-3-LLaVA-NeXT): base view + unpadded anyres map.

Each image becomes crops: crop 0 is the whole image squashed to the tower's square input (the base
view, g x g tokens, no newline), crops 1.. are tiles of the image resized to fit the best
`image_grid_pinpoints` resolution and padded to it. HF lays the tiles out as one
(nph*g) x (npw*g) map, crops the padding rows or columns away (`unpad_image`, on the token grid) and
emits the map row by row, each row followed by one `image_newline` token. The geometry below
mirrors that on sizes: resize for patching, centred pad, tile grid, then the unpad offsets.
LLaVA-OneVision (llava_onevision.py) reuses all of it and adds the anyres_max interpolation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from sightline.models.base import Adapter, Batch, register
from sightline.models.geometry import clip_style_grid
from sightline.models.layout import TokenLayout, ViewGrid


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
    map_origin_xy: tuple[float, float]  # of token (0, 0) of the UNPADDED map
    map_step_xy: tuple[float, float]

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


def anyres_plan(image_processor, config, image_hw: tuple[int, int]) -> AnyresPlan:
    """Mirror, on sizes, the anyres image processor and the model's `pack_image_features`."""
    vc = config.vision_config
    g = vc.image_size // vc.patch_size
    h, w = image_hw
    ip = image_processor
    pipeline = _crop_pipeline(ip)
    # the crop size the processor tiles with (crop_size.height, else size.height, else shortest_edge)
    size, crop = ip.size, getattr(ip, "crop_size", None)
    tile = (crop and _sd(crop, "height")) or _sd(size, "height") or _sd(size, "shortest_edge")
    tile = int(tile)
    if tile != vc.image_size:
        raise ValueError(f"image processor tiles of {tile} px do not match the vision tower's {vc.image_size} px")

    # base view: the whole image resized (not aspect-preserving) to a square, then the crop pipeline
    if _sd(size, "height") and _sd(size, "width"):
        base_hw = (int(_sd(size, "height")), int(_sd(size, "width")))
    else:
        base_hw = (int(_sd(size, "shortest_edge")),) * 2
    (ox, oy), (sx, sy) = clip_style_grid(pipeline, base_hw, g, g)
    fx, fy = w / base_hw[1], h / base_hw[0]
    base_origin, base_step = (ox * fx, oy * fy), (sx * fx, sy * fy)

    # tiles: each tile x tile crop of the padded best resolution must map onto its g x g grid exactly
    (tox, toy), (tsx, tsy) = clip_style_grid(pipeline, (tile, tile), g, g)
    if abs(tox) > 1e-9 or abs(toy) > 1e-9 or abs(tsx * g - tile) > 1e-9 or abs(tsy * g - tile) > 1e-9:
        raise ValueError("the image processor's per-crop resize/crop does not keep whole tiles; unsupported")
    best_h, best_w = select_best_resolution(image_hw, config.image_grid_pinpoints)
    nph, npw = best_h // vc.image_size, best_w // vc.image_size  # as get_anyres_image_grid_shape
    new_h, new_w = patch_output_hw(image_hw, (best_h, best_w))
    paste_y, paste_x = (best_h - new_h) // 2, (best_w - new_w) // 2
    top, left, rows, cols = unpad_window(image_hw, (nph * g, npw * g))
    # unpadded token (r, c) -> padded-canvas pixel ((c + left) * tsx, ...) -> resized pixel -> original
    kx, ky = w / new_w, h / new_h
    map_origin = ((left * tsx - paste_x) * kx, (top * tsy - paste_y) * ky)
    map_step = (tsx * kx, tsy * ky)
    return AnyresPlan(
        (h, w), g, (nph, npw), (top, left, rows, cols), base_origin, base_step, map_origin, map_step
    )


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

    def _map_grid(self, k: int, p: AnyresPlan, crop_offset: int) -> ViewGrid:
        _, _, rows, cols = p.window
        vi = self._map_index(p, crop_offset)
        return ViewGrid(k, 1, rows, cols, p.image_hw, p.map_origin_xy, p.map_step_xy, newline=True, vision_index=vi)

    def image_grids(self, inputs, example: int, image_sizes_hw):
        """Per image: view 0 the base g x g grid, view 1 the unpadded high-resolution map."""
        self._check_strategy()
        grids = []
        crop_offset = 0  # vision rows are per example: crops of earlier images come first
        for k, hw in enumerate(image_sizes_hw):
            p = self.plan(tuple(int(v) for v in hw))
            grids.append([self._base_grid(k, p, crop_offset), self._map_grid(k, p, crop_offset)])
            crop_offset += p.n_crops
        return grids

    def vision_rows(self, batch: Batch, layout: TokenLayout) -> int:
        """Real crops of the example's images (not the batch padding) times positions per crop."""
        tile = self.config.vision_config.image_size
        sizes = [g.image_size_hw for g in layout.grids if g.view == 0]
        return sum(num_crops(hw, self.config.image_grid_pinpoints, tile) for hw in sizes) * self.vision_seq_len

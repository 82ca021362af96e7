"""Idefics3 (`Idefics3ForConditionalGeneration`): tiles of the resized image plus a global view, pixel-shuffled.

The processor resizes the image so its longest edge is `size.longest_edge` (aspect kept, the other
side made even), then to multiples of the tile size M = `max_image_size.longest_edge` (the whole
image, so the map is affine on the original), and cuts it into nh x nw tiles of M px, row-major;
the global view is that image squashed to M x M. An image already M x M gets the global view only.
SigLIP cuts each tile into p x p patches; the connector pixel-shuffles s x s patches (s =
`scale_factor`) into one token and projects it: t = p / s tokens per side, `image_seq_len` = t*t.

The sequence, per image: for each tile row, for each tile `<fake_token_around_image><row_i_col_j>`
+ t*t `<image>`; then `\\n` after the row; then `\\n<fake_token_around_image><global-img>` + t*t
`<image>` + `<fake_token_around_image>`. Views: 0 = the global view (last in the sequence), 1.. =
the tiles in reading order. Each token is s x s patches: `vision.{i}` is [s*s, d_v], row-major
inside the group (the connector's order), and its box covers them all. The vision blocks see the
batch's real tiles (all-zero padding tiles are dropped), each example's tiles then global view.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sightline.models.base import Adapter, Batch, ModuleNames, register
from sightline.models.layout import TokenLayout, ViewGrid

TINY_CHAT_TEMPLATE = (
    "<|im_start|>"
    "{%- for message in messages -%}"
    "{{- message['role'] | capitalize -}}:"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<end_of_utterance>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)


def _longest_edge_hw(h: int, w: int, max_len: int) -> tuple[int, int]:
    """HF's resize to `max_len` on the longest edge (aspect kept, the other side rounded up to even)."""
    aspect = w / h
    if w >= h:
        w, h = max_len, int(max_len / aspect)
        h += h % 2
    else:
        h, w = max_len, int(max_len * aspect)
        w += w % 2
    return max(h, 1), max(w, 1)


def _tile_multiple_hw(h: int, w: int, tile: int) -> tuple[int, int]:
    """HF's `resize_for_vision_encoder`: both sides up to multiples of the tile size."""
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    return h, w


def shuffled_vision_index(crop: int, patches: int, s: int) -> np.ndarray:
    """[t, t, s*s] rows (crop * p*p + patch) of each pixel-shuffled token's patches, row-major in the group."""
    t = patches // s
    r = np.arange(t)[:, None, None, None] * s + np.arange(s)[None, None, :, None]
    c = np.arange(t)[None, :, None, None] * s + np.arange(s)[None, None, None, :]
    return (crop * patches * patches + r * patches + c).reshape(t, t, s * s)


@register
class Idefics3Adapter(Adapter):
    family = "idefics3"
    architectures = ("Idefics3ForConditionalGeneration",)
    model_types = ("idefics3",)
    hf_class = "Idefics3ForConditionalGeneration"
    modules = ModuleNames(decoder="model.text_model", vision_tower="model.vision_model", projector="model.connector")

    @classmethod
    def build_tiny(cls, out_dir: str | Path, tile: int = 56, patch_size: int = 14, longest_edge: int = 168,
                   text: dict | None = None, vision: dict | None = None, seed: int = 0) -> Path:
        """A random Idefics3ForConditionalGeneration: 56-px tiles of 4 x 4 patches shuffled into 2 x 2 tokens,
        images resized to 168 px on the longest edge (up to 3 x 3 tiles)."""
        from transformers import Idefics3Config, Idefics3ImageProcessorPil, Idefics3Processor

        from sightline.models.testing import llama_text_config, make_tokenizer, save_tiny

        tok = make_tokenizer("<image>", extra_special=("<fake_token_around_image>", "<end_of_utterance>"))
        vision_cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=tile, patch_size=patch_size)
        vision_cfg.update(vision or {})
        config = Idefics3Config(text_config=llama_text_config(len(tok), **(text or {})), vision_config=vision_cfg,
                                image_token_id=tok.image_token_id, scale_factor=2, pad_token_id=tok.pad_token_id)
        ip = Idefics3ImageProcessorPil(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile},
                                       image_mean=[0.5] * 3, image_std=[0.5] * 3)
        proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=(tile // patch_size // 2) ** 2,
                                 chat_template=TINY_CHAT_TEMPLATE)
        return save_tiny(cls, config, proc, out_dir, seed)

    # ------------------------------------------------------------------ facts
    @property
    def scale(self) -> int:
        return int(self.config.scale_factor)

    @property
    def patches_side(self) -> int:
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    @property
    def patches_per_token(self) -> int:
        return self.scale**2

    def processor_images(self, images):
        return [[im] for im in images]

    def tiles(self, image_hw: tuple[int, int]) -> tuple[int, int, tuple[int, int]]:
        """(rows, cols, resized_hw) of one image's tiles; (0, 0, (M, M)) when it is the global view alone."""
        ip = self.processor.image_processor
        tile = int(ip.max_image_size["longest_edge"])
        h, w = image_hw
        if getattr(ip, "do_resize", True):
            h, w = _longest_edge_hw(h, w, int(ip.size["longest_edge"]))
        if not getattr(ip, "do_image_splitting", True):
            return 0, 0, (tile, tile)
        h, w = _tile_multiple_hw(h, w, tile)
        if h > tile or w > tile:
            return h // tile, w // tile, (h, w)
        return 0, 0, (h, w)

    # ------------------------------------------------------------------ grids
    def image_grids(self, inputs, example: int, image_sizes_hw):
        p, s = self.patches_side, self.scale
        t = p // s
        grids = []
        crop = 0  # vision rows of this example: its images' tiles, then their global views
        for k, (h, w) in enumerate(image_sizes_hw):
            nh, nw, (rh, rw) = self.tiles((h, w))
            tile_px = (rw / max(nw, 1), rh / max(nh, 1))  # resized px per tile
            sx, sy = w / rw, h / rh  # original px per resized px
            views = []
            for r in range(nh):
                for c in range(nw):
                    views.append(ViewGrid(k, 1 + r * nw + c, t, t, (h, w), (c * tile_px[0] * sx, r * tile_px[1] * sy),
                                          (tile_px[0] * sx / t, tile_px[1] * sy / t),
                                          vision_index=shuffled_vision_index(crop, p, s)))
                    crop += 1
            views.append(ViewGrid(k, 0, t, t, (h, w), (0.0, 0.0), (w / t, h / t),
                                  vision_index=shuffled_vision_index(crop, p, s)))
            crop += 1
            grids.append(views)
        return grids

    def vision_rows(self, batch: Batch, layout: TokenLayout) -> int:
        return len(layout.grids) * self.patches_side**2

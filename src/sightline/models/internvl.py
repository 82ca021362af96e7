"""InternVL 3 (`InternVLForConditionalGeneration`, the `-hf` checkpoints): tiles plus a thumbnail, pixel-shuffled.

The processor (GotOcr2's, `crop_to_patches`) picks the tile grid nh x nw (min..max tiles) whose aspect
ratio is closest to the image's, squashes the whole image onto that canvas and cuts it into 448-px
tiles, row-major; when there is more than one tile a thumbnail (the whole image squashed to one
tile) follows. The vision tower (CLS first, then p x p patches per crop) runs on every crop; the CLS
is dropped, each 2x2 group of patches is pixel-shuffled into one token (`downsample_ratio` 0.5)
and projected: t = p / 2 tokens per side. The sequence per image is `<img>` + (tiles + thumbnail)
* t*t `<IMG_CONTEXT>` + `</img>`, the crops back to back. Views: 0 = the thumbnail (or the single
tile), 1.. = the tiles in reading order. `vision.{i}` is a token's 4 patches [4, d_v], row-major.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sightline.models.base import Adapter, Batch, ModuleNames, register
from sightline.models.geometry import processor_size_hw
from sightline.models.layout import TokenLayout, ViewGrid

TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<IMG_CONTEXT>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _side(v) -> int:
    return int(v[0] if isinstance(v, (list, tuple)) else v)


@register
class InternVLAdapter(Adapter):
    family = "internvl"
    architectures = ("InternVLForConditionalGeneration",)
    model_types = ("internvl",)
    hf_class = "InternVLForConditionalGeneration"
    processor_class = "InternVLProcessor"
    modules = ModuleNames(vision_blocks="encoder.layer")

    @classmethod
    def build_tiny(cls, out_dir: str | Path, tile: int = 56, patch_size: int = 14, max_tiles: int = 6,
                   text: dict | None = None, vision: dict | None = None, seed: int = 0) -> Path:
        """A random InternVLForConditionalGeneration (InternViT-style tower, Qwen2 LM): 56-px tiles of 4 x 4
        patches, shuffled into 2 x 2 tokens; 1 to 6 tiles plus the thumbnail."""
        from transformers import GotOcr2ImageProcessorPil, InternVLConfig

        from sightline.models.processors import image_only_processor_class
        from sightline.models.testing import llama_text_config, make_tokenizer, save_tiny

        named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"}
        tok = make_tokenizer("<IMG_CONTEXT>", extra_special=("<|im_start|>", "<|im_end|>"),
                             named=named)
        vision_cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=[tile, tile], patch_size=[patch_size, patch_size])
        vision_cfg.update(vision or {})
        config = InternVLConfig(text_config=llama_text_config(len(tok), model_type="qwen2", **(text or {})),
                                vision_config=vision_cfg, image_token_id=tok.image_token_id,
                                image_seq_length=(tile // patch_size // 2) ** 2)
        ip = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1,
                                      max_patches=max_tiles)
        proc = image_only_processor_class(cls.processor_class)(
            image_processor=ip, tokenizer=tok, image_seq_length=(tile // patch_size // 2) ** 2,
            chat_template=TINY_CHAT_TEMPLATE)
        return save_tiny(cls, config, proc, out_dir, seed)

    # ------------------------------------------------------------------ facts
    @property
    def patches_side(self) -> int:
        vc = self.config.vision_config
        return _side(vc.image_size) // _side(vc.patch_size)

    @property
    def shuffle(self) -> int:
        return int(round(1 / self.config.downsample_ratio))

    @property
    def patches_per_token(self) -> int:
        return self.shuffle**2

    @property
    def vision_prefix(self) -> int:
        """Tower positions before the patches of each crop (the CLS), dropped by the "default" strategy."""
        return int(self.config.vision_feature_select_strategy == "default")

    def tiles(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of one image's tile grid; (1, 1) is the whole image as one crop (no thumbnail)."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        ip = self.processor.image_processor
        if not getattr(ip, "crop_to_patches", False) or ip.max_patches <= 1:
            return 1, 1
        th, tw = processor_size_hw(ip)
        cols, rows = get_optimal_tiled_canvas(tuple(image_hw), (th, tw), ip.min_patches, ip.max_patches)
        return int(rows), int(cols)

    # ------------------------------------------------------------------ grids
    def image_grids(self, inputs, example: int, image_sizes_hw):
        if self.config.vision_feature_layer != -1 and not isinstance(self.config.vision_feature_layer, int):
            raise NotImplementedError("InternVL with several vision feature layers is not described")
        p, s = self.patches_side, self.shuffle
        t = p // s
        seq = p * p + self.vision_prefix

        def index(crop):  # [t, t, s*s] rows of each token's patches, row-major in the group
            r = np.arange(t)[:, None, None, None] * s + np.arange(s)[None, None, :, None]
            c = np.arange(t)[None, :, None, None] * s + np.arange(s)[None, None, None, :]
            return (crop * seq + self.vision_prefix + r * p + c).reshape(t, t, s * s)

        grids = []
        crop = 0
        for k, (h, w) in enumerate(image_sizes_hw):
            nh, nw = self.tiles((h, w))
            views = []
            if nh * nw > 1:  # tiles of the image squashed onto an nh x nw canvas, then the thumbnail
                tw, th = w / nw, h / nh
                for r in range(nh):
                    for c in range(nw):
                        views.append(ViewGrid(k, 1 + r * nw + c, t, t, (h, w), (c * tw, r * th), (tw / t, th / t),
                                              vision_index=index(crop)))
                        crop += 1
            views.append(ViewGrid(k, 0, t, t, (h, w), (0.0, 0.0), (w / t, h / t), vision_index=index(crop)))
            crop += 1
            grids.append(views)
        return grids

    def vision_rows(self, batch: Batch, layout: TokenLayout) -> int:
        return len(layout.grids) * (self.patches_side**2 + self.vision_prefix)

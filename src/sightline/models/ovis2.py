"""Ovis2 (`Ovis2ForConditionalGeneration`): a thumbnail plus tiles, s x s patches merged per visual token.

With `crop_to_patches`, the processor picks the tile grid nh x nw that covers the image best (at
most `max_patches` tiles), squashes the image onto it and cuts 448-px tiles, row-major; when there
is more than one tile, a thumbnail (the whole image squashed to one tile) comes FIRST. Without it,
the image is one squashed crop. The vision transformer's p x p patches are merged in s x s groups
(`hidden_stride`) into one visual token, a probability over a visual vocabulary whose embedding
table gives the language-model input. The sequence per image: `<IMG_START>`, t*t `<IMG_ATOM>`
(`config.image_token_id`; the processor's prompt placeholder is `<image>`) for the thumbnail,
`<IMG_GRID>`, then the tiles' t*t `<IMG_ATOM>` each with `<IMG_COL>` between the tiles of a row and
`<IMG_ROW>` between rows, then `<IMG_END>` (the markers take learned "visual indicator"
embeddings). Views: 0 = the thumbnail (or the single crop), 1.. = the tiles in reading order.
`vision.{i}` is a token's s*s patches [s*s, d_v], row-major in the group.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sightline.models.base import Adapter, Batch, ModuleNames, register
from sightline.models.geometry import processor_size_hw
from sightline.models.layout import TokenLayout, ViewGrid

MARKERS = ("<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>")


@register
class Ovis2Adapter(Adapter):
    family = "ovis2"
    architectures = ("Ovis2ForConditionalGeneration",)
    model_types = ("ovis2",)
    hf_class = "Ovis2ForConditionalGeneration"
    modules = ModuleNames(vision_blocks="transformer.encoder.layers", projector="model.visual_embeddings_table")

    @classmethod
    def build_tiny(cls, out_dir: str | Path, tile: int = 56, patch_size: int = 14, max_tiles: int = 6,
                   text: dict | None = None, vision: dict | None = None, seed: int = 0) -> Path:
        """A random Ovis2ForConditionalGeneration (Qwen2 LM): 56-px tiles of 4 x 4 patches merged 2 x 2 into 2 x 2
        visual tokens over a visual vocabulary of 64; up to 6 tiles plus the thumbnail."""
        from transformers import Ovis2Config, Ovis2ImageProcessorPil, Ovis2Processor

        from sightline.models.testing import CHAT_TEMPLATE, llama_text_config, make_tokenizer, save_tiny

        tok = make_tokenizer("<IMG_ATOM>", extra_special=("<image>", *MARKERS))
        tok.chat_template = CHAT_TEMPLATE.replace("{{ IMAGE }}", "<image>")
        text_cfg = llama_text_config(len(tok), model_type="qwen2", **(text or {}))
        vision_cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=tile, patch_size=patch_size, vocab_size=64, hidden_stride=2)
        vision_cfg.update(vision or {})
        config = Ovis2Config(text_config=text_cfg, vision_config=vision_cfg, image_token_id=tok.image_token_id,
                             visual_indicator_token_ids=[tok.convert_tokens_to_ids(t) for t in MARKERS],
                             vocab_size=len(tok), hidden_size=text_cfg["hidden_size"])
        ip = Ovis2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True, max_patches=max_tiles,
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3)
        proc = Ovis2Processor(image_processor=ip, tokenizer=tok, image_seq_length=(tile // patch_size // 2) ** 2,
                              chat_template=tok.chat_template)
        return save_tiny(cls, config, proc, out_dir, seed)

    # ------------------------------------------------------------------ facts
    @property
    def patches_side(self) -> int:
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    @property
    def stride(self) -> int:
        return int(self.config.vision_config.hidden_stride)

    @property
    def patches_per_token(self) -> int:
        return self.stride**2

    @property
    def prompt_image_token(self) -> str:
        return self.processor.image_token

    def tiles(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of one image's tile grid, as the image processor chooses it."""
        from transformers.models.ovis2 import image_processing_pil_ovis2 as hf

        ip = self.processor.image_processor
        if not getattr(ip, "crop_to_patches", False) or ip.max_patches <= 1:
            return 1, 1
        th, tw = processor_size_hw(ip)
        if getattr(ip, "use_covering_area_grid", True):
            cols, rows = hf.get_min_tile_covering_grid(tuple(image_hw), target_patch_size=th,
                                                       max_image_tiles=ip.max_patches)
        else:
            cols, rows = hf.get_optimal_tiled_canvas(tuple(image_hw), (th, tw), ip.min_patches, ip.max_patches)
        return int(rows), int(cols)

    # ------------------------------------------------------------------ grids
    def image_grids(self, inputs, example: int, image_sizes_hw):
        p, s = self.patches_side, self.stride
        if p % s:
            raise NotImplementedError(f"{p} patches per side do not split into {s} x {s} groups (HF zero-pads them)")
        t = p // s

        def index(crop):  # [t, t, s*s] rows of each token's patches, row-major in the group
            r = np.arange(t)[:, None, None, None] * s + np.arange(s)[None, None, :, None]
            c = np.arange(t)[None, :, None, None] * s + np.arange(s)[None, None, None, :]
            return (crop * p * p + r * p + c).reshape(t, t, s * s)

        grids = []
        crop = 0
        for k, (h, w) in enumerate(image_sizes_hw):
            nh, nw = self.tiles((h, w))
            views = [ViewGrid(k, 0, t, t, (h, w), (0.0, 0.0), (w / t, h / t), vision_index=index(crop))]
            crop += 1
            if nh * nw > 1:
                tw, th = w / nw, h / nh
                for r in range(nh):
                    for c in range(nw):
                        views.append(ViewGrid(k, 1 + r * nw + c, t, t, (h, w), (c * tw, r * th), (tw / t, th / t),
                                              vision_index=index(crop)))
                        crop += 1
            grids.append(views)
        return grids

    def vision_rows(self, batch: Batch, layout: TokenLayout) -> int:
        return len(layout.grids) * self.patches_side**2

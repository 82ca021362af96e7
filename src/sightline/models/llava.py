"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one g x g grid per image, row-major, CLS dropped."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sightline.models.base import Adapter, Batch, ModuleNames, register
from sightline.models.geometry import clip_style_grid
from sightline.models.layout import TokenLayout, ViewGrid


@register
class LlavaAdapter(Adapter):
    family = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    model_types = ("llava",)
    hf_class = "LlavaForConditionalGeneration"
    modules = ModuleNames()  # HF's LLaVA layout (the defaults): model.language_model, model.vision_tower, ...

    @classmethod
    def build_tiny(
        cls,
        out_dir: str | Path,
        image_size: int = 56,
        patch_size: int = 14,
        text: dict | None = None,
        vision: dict | None = None,
        do_pad: bool = False,
        seed: int = 0,
    ) -> Path:
        """A random LlavaForConditionalGeneration (CLIP tower, Llama LM) with processor, saved to `out_dir`."""
        from sightline.models.testing import llava_config, llava_processor, make_tokenizer, save_tiny

        tok = make_tokenizer("<image>")
        config = llava_config("LlavaConfig", tok, image_size, patch_size, text, vision)
        return save_tiny(cls, config, llava_processor(tok, image_size, patch_size, do_pad), out_dir, seed)

    @property
    def grid_side(self) -> int:
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    @property
    def lead_tokens_per_image(self) -> int:
        """The "full" feature strategy keeps the CLS token as the first image token."""
        return int(self.config.vision_feature_select_strategy == "full")

    def image_grids(self, inputs, example: int, image_sizes_hw):
        g = self.grid_side
        grids = []
        for k, hw in enumerate(image_sizes_hw):
            origin, step = clip_style_grid(self.processor.image_processor, hw, g, g)
            first = 1  # row 0 of the vision sequence is CLS (CLIP); patches follow row-major
            vision_index = (k * (g * g + 1) + first + np.arange(g * g)).reshape(g, g)
            grids.append([ViewGrid(k, 0, g, g, hw, origin, step, vision_index=vision_index)])
        return grids

    def vision_rows(self, batch: Batch, layout: TokenLayout) -> int:
        g = self.grid_side
        return len({gr.image for gr in layout.grids}) * (g * g + 1)

"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one g x g grid per image, row-major, CLS dropped."""

from __future__ import annotations

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

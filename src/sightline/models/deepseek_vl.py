"""DeepSeek-VL (`DeepseekVLForConditionalGeneration`, the `-hf` checkpoints): one g x g SigLIP grid per image.

The processor resizes the image so its longest side is the tower's input (384 px, aspect kept, the
short side at least `min_size`), pads it to a centred square with the background colour, and
SigLIP (no CLS) cuts it into g x g patches, each projected (the `aligner` MLP) into one token,
row-major: `num_image_tokens` = g*g placeholders. Tokens over the padding have empty pixel boxes.
Janus (janus.py) lays images out the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sightline.models.base import Adapter, Batch, ModuleNames, register
from sightline.models.geometry import processor_size_hw
from sightline.models.layout import TokenLayout, ViewGrid


def padded_square_grid(image_hw: tuple[int, int], side: int, min_size: int, g: int):
    """(origin_xy, step_xy) of a g x g grid over an image resized to fit `side` px (aspect kept) and padded to a
    centred square, as DeepSeek-VL's / Janus' image processors do."""
    h, w = image_hw
    delta = side / max(h, w)
    nh, nw = max(round(h * delta), min_size), max(round(w * delta), min_size)
    m = max(nh, nw)
    top = (m - nh) // 2 if nw > nh else 0
    left = (m - nw) // 2 if nh > nw else 0
    sx, sy = w / nw, h / nh  # original px per resized px
    return (-left * sx, -top * sy), (m / g * sx, m / g * sy)


@register
class DeepseekVLAdapter(Adapter):
    family = "deepseek_vl"
    architectures = ("DeepseekVLForConditionalGeneration",)
    model_types = ("deepseek_vl",)
    hf_class = "DeepseekVLForConditionalGeneration"
    modules = ModuleNames(vision_tower="model.vision_model", projector="model.aligner")

    @classmethod
    def build_tiny(cls, out_dir: str | Path, image_size: int = 56, patch_size: int = 14, text: dict | None = None,
                   vision: dict | None = None, seed: int = 0) -> Path:
        """A random DeepseekVLForConditionalGeneration (SigLIP tower, Llama LM), 4 x 4 image tokens."""
        from transformers import DeepseekVLConfig, DeepseekVLImageProcessorPil, DeepseekVLProcessor

        from sightline.models.testing import llama_text_config, make_tokenizer, save_tiny, siglip_vision_config

        tok = make_tokenizer("<image_placeholder>")
        config = DeepseekVLConfig(text_config=llama_text_config(len(tok), **(text or {})),
                                  vision_config=siglip_vision_config(image_size, patch_size, **(vision or {})),
                                  image_token_id=tok.image_token_id)
        ip = DeepseekVLImageProcessorPil(size={"height": image_size, "width": image_size}, min_size=patch_size)
        proc = DeepseekVLProcessor(image_processor=ip, tokenizer=tok, num_image_tokens=(image_size // patch_size) ** 2,
                                   chat_template=tok.chat_template)
        return save_tiny(cls, config, proc, out_dir, seed)

    @property
    def grid_side(self) -> int:
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    def image_grids(self, inputs, example: int, image_sizes_hw):
        ip = self.processor.image_processor
        side = int(processor_size_hw(ip)[0])
        g = self.grid_side
        grids = []
        for k, hw in enumerate(image_sizes_hw):
            if getattr(ip, "do_pad", True):
                origin, step = padded_square_grid(hw, side, int(getattr(ip, "min_size", 14)), g)
            else:
                origin, step = (0.0, 0.0), (hw[1] / g, hw[0] / g)
            vi = (k * g * g + np.arange(g * g)).reshape(g, g)
            grids.append([ViewGrid(k, 0, g, g, tuple(hw), origin, step, vision_index=vi)])
        return grids

    def vision_rows(self, batch: Batch, layout: TokenLayout) -> int:
        return len({g.image for g in layout.grids}) * self.grid_side**2

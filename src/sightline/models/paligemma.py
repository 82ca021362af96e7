"""PaliGemma / PaliGemma 2 (`PaliGemmaForConditionalGeneration`): one g x g SigLIP grid per image, 1:1 with patches.

The processor squashes the image to the tower's square input (224 / 448 / 896 px; no crop, no pad),
SigLIP cuts it into g x g patches (no CLS) and a linear projector maps each patch to one token,
row-major. There is no chat template: the processor builds `<image>` * g*g + `<bos>` + prompt + `\\n`,
and the whole prefix (image and prompt) attends bidirectionally (prefix-LM; `token_type_ids` mark
the suffix). The default prompt is the bare task text after the image ("caption en", "What is shown?").
PaliGemma 2's Gemma 2 language model norms each write after the attention / MLP (`attn_out` /
`mlp_out` are those norms' outputs); PaliGemma 1's Gemma has no such norms.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sightline.models.base import Adapter, Batch, ModuleNames, register
from sightline.models.layout import TokenLayout, ViewGrid

GEMMA2_MODULES = ModuleNames(attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm")


@register
class PaliGemmaAdapter(Adapter):
    family = "paligemma"
    architectures = ("PaliGemmaForConditionalGeneration",)
    model_types = ("paligemma",)
    hf_class = "PaliGemmaForConditionalGeneration"

    @classmethod
    def build_tiny(cls, out_dir: str | Path, image_size: int = 56, patch_size: int = 14, text: dict | None = None,
                   vision: dict | None = None, seed: int = 0) -> Path:
        """A random PaliGemmaForConditionalGeneration (SigLIP tower, Gemma LM), 4 x 4 image tokens."""
        from transformers import PaliGemmaConfig, PaliGemmaProcessor, SiglipImageProcessorPil

        from sightline.models.testing import make_tokenizer, save_tiny, siglip_vision_config

        tok = make_tokenizer("<image>")
        text_cfg = dict(model_type="gemma", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        )
        text_cfg.update(text or {})
        hidden = text_cfg["hidden_size"]
        config = PaliGemmaConfig(
            text_config=text_cfg,
            vision_config=siglip_vision_config(image_size, patch_size, **{"projection_dim": hidden, **(vision or {})}),
            image_token_index=tok.image_token_id, projection_dim=hidden, hidden_size=hidden, pad_token_id=tok.pad_token_id)
        ip = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
        ip.image_seq_length = (image_size // patch_size) ** 2
        proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
        return save_tiny(cls, config, proc, out_dir, seed)

    @property
    def modules(self) -> ModuleNames:  # type: ignore[override]
        """Gemma 2 (PaliGemma 2) norms its writes; Gemma (PaliGemma 1) does not."""
        return GEMMA2_MODULES if self.text_config.model_type == "gemma2" else ModuleNames()

    @property
    def grid_side(self) -> int:
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    def render_prompt(self, prompt: str | None = "", prefix: str | None = None, raw: bool = False) -> str:
        """PaliGemma has no chat template: [prefix] + `<image>` + prompt (the processor adds `<bos>` and `\\n`)."""
        if raw:
            return super().render_prompt(prompt, prefix, raw=True)
        return f"{prefix or ''}{self.image_token}{prompt or ''}"

    def image_grids(self, inputs, example: int, image_sizes_hw):
        g = self.grid_side
        grids = []
        for k, (h, w) in enumerate(image_sizes_hw):
            vi = (k * g * g + np.arange(g * g)).reshape(g, g)  # SigLIP: no CLS, patches row-major
            grids.append([ViewGrid(k, 0, g, g, (h, w), (0.0, 0.0), (w / g, h / g), vision_index=vi)])
        return grids

    def vision_rows(self, batch: Batch, layout: TokenLayout) -> int:
        return len({g.image for g in layout.grids}) * self.grid_side**2

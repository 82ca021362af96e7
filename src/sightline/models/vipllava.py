"""VipLLaVA (`VipLlavaForConditionalGeneration`): LLaVA-1.5's layout, features of several CLIP layers concatenated.

One g x g grid per image, row-major, CLS dropped (always: VipLLaVA has no feature-select strategy).
What differs from LLaVA is only what the projector reads: the CLS-less hidden states of several
vision layers (`vision_feature_layer`, e.g. -2, -5, -8, -11, 6) concatenated along the features,
through a layer-normed MLP. `vision.{i}` is still one layer's patch at each token.
"""

from __future__ import annotations

from pathlib import Path

from sightline.models.base import register
from sightline.models.llava import LlavaAdapter


@register
class VipLlavaAdapter(LlavaAdapter):
    family = "vipllava"
    architectures = ("VipLlavaForConditionalGeneration",)
    model_types = ("vipllava",)
    hf_class = "VipLlavaForConditionalGeneration"

    @classmethod
    def build_tiny(cls, out_dir: str | Path, image_size: int = 56, patch_size: int = 14, text: dict | None = None,
                   vision: dict | None = None, seed: int = 0) -> Path:
        """A random VipLlavaForConditionalGeneration (CLIP tower of 3 layers, Llama LM), features of layers -2 and 1."""
        import transformers

        from sightline.models.testing import clip_vision_config, llama_text_config, llava_processor, make_tokenizer, save_tiny

        tok = make_tokenizer("<image>")
        config = transformers.VipLlavaConfig(
            text_config=llama_text_config(len(tok), **(text or {})),
            vision_config=clip_vision_config(image_size, patch_size, **{"num_hidden_layers": 3, **(vision or {})}),
            image_token_index=tok.image_token_id,
            vision_feature_layer=[-2, 1],
            pad_token_id=tok.pad_token_id,
        )
        return save_tiny(cls, config, llava_processor(tok, image_size, patch_size), out_dir, seed)

    @property
    def lead_tokens_per_image(self) -> int:
        return 0  # the CLS is always dropped

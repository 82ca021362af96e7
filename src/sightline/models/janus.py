"""Janus / Janus-Pro (`JanusForConditionalGeneration`) for understanding: DeepSeek-VL's layout (deepseek_vl.py).

The image is resized to fit the tower's square input (384 px, aspect kept), padded to a centred
square, and its g x g SigLIP-style patches become g*g tokens, row-major, through the `aligner` MLP,
between `<begin_of_image>` and `<end_of_image>`. The VQ image tokenizer and generation head serve
image generation only and are not sites.
"""

from __future__ import annotations

from pathlib import Path

from sightline.models.base import register
from sightline.models.deepseek_vl import DeepseekVLAdapter


@register
class JanusAdapter(DeepseekVLAdapter):
    family = "janus"
    architectures = ("JanusForConditionalGeneration",)
    model_types = ("janus",)
    hf_class = "JanusForConditionalGeneration"

    @classmethod
    def build_tiny(cls, out_dir: str | Path, image_size: int = 56, patch_size: int = 14, text: dict | None = None,
                   vision: dict | None = None, seed: int = 0) -> Path:
        """A random JanusForConditionalGeneration (Janus vision tower, Llama LM, a minimal VQ model), 4 x 4 image tokens."""
        from transformers import JanusConfig, JanusImageProcessorPil, JanusProcessor

        from sightline.models.testing import llama_text_config, make_tokenizer, save_tiny

        tok = make_tokenizer("<image_placeholder>", named={"boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"})
        hidden = (text or {}).get("hidden_size", 64)
        vision_cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
                          patch_size=patch_size, mlp_ratio=2.0, projection_dim=hidden, depth=2)
        vision_cfg.update(vision or {})
        vq_cfg = dict(embed_dim=8, num_embeddings=16, latent_channels=32, base_channels=32, channel_multiplier=[1, 1],
                      num_res_blocks=1, projection_dim=hidden, image_token_embed_dim=hidden, num_hidden_layers=1)
        config = JanusConfig(text_config=llama_text_config(len(tok), **(text or {})), vision_config=vision_cfg,
                             vq_config=vq_cfg, image_token_id=tok.image_token_id)
        ip = JanusImageProcessorPil(size={"height": image_size, "width": image_size}, min_size=patch_size)
        proc = JanusProcessor(image_processor=ip, tokenizer=tok, num_image_tokens=(image_size // patch_size) ** 2,
                              chat_template=tok.chat_template)
        return save_tiny(cls, config, proc, out_dir, seed)

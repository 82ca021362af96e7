"""GLM-4.1V / GLM-4V (`Glm4vForConditionalGeneration`): Qwen2-VL's merged 2x2 grid, post-norms in the blocks.

Layout as Qwen2-VL (qwen2_vl.py): the whole image resized (`smart_resize`, multiples of 28 px), one
token per 2x2 group of 14-px patches, row-major, between `<|begin_of_image|>` and `<|end_of_image|>`;
the vision blocks see each group's patches contiguously (the 2x2 downsampling conv after the last
block reads them so). `vision.{i}` is a token's 4 patches [4, d_v].

The decoder blocks norm each write before adding it (`post_self_attn_layernorm`,
`post_mlp_layernorm`): `attn_out` / `mlp_out` are those norms' outputs, what the stream receives.
"""

from __future__ import annotations

from pathlib import Path

from sightline.models.base import ModuleNames, register
from sightline.models.qwen2_vl import Qwen2VLAdapter

TINY_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|begin_of_image|><|image|><|end_of_image|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)
TINY_SPECIAL = ("[gMASK]", "<sop>", "<|begin_of_image|>", "<|end_of_image|>", "<|video|>", "<|begin_of_video|>",
                "<|end_of_video|>")


@register
class Glm4vAdapter(Qwen2VLAdapter):
    family = "glm4v"
    architectures = ("Glm4vForConditionalGeneration",)
    model_types = ("glm4v",)
    hf_class = "Glm4vForConditionalGeneration"
    processor_class = "Glm4vProcessor"
    windowed = False
    marker_keys = ("image_start_token_id", "image_end_token_id")
    modules = ModuleNames(vision_tower="model.visual", vision_blocks="blocks", projector="model.visual.merger",
                          attn_out="post_self_attn_layernorm", mlp_out="post_mlp_layernorm")

    @classmethod
    def build_tiny(cls, out_dir: str | Path, min_tokens: int = 4, max_tokens: int = 64, text: dict | None = None,
                   vision: dict | None = None, seed: int = 0) -> Path:
        """A random Glm4vForConditionalGeneration with its processor (images only), saved to `out_dir`."""
        from transformers import Glm4vConfig, Glm4vImageProcessorPil

        from sightline.models.processors import image_only_processor_class
        from sightline.models.testing import make_tokenizer, save_tiny

        tok = make_tokenizer("<|image|>", extra_special=TINY_SPECIAL)
        tok.chat_template = TINY_CHAT_TEMPLATE
        ids = {t: tok.convert_tokens_to_ids(t) for t in TINY_SPECIAL}
        text_cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 2],
                                         "partial_rotary_factor": 0.5},  # head_dim 16, 8 rotated
                        pad_token_id=tok.pad_token_id)
        text_cfg.update(text or {})
        vision_cfg = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, image_size=56,
                          spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text_cfg["hidden_size"])
        vision_cfg.update(vision or {})
        config = Glm4vConfig(text_config=text_cfg, vision_config=vision_cfg, image_token_id=tok.image_token_id,
                             video_token_id=ids["<|video|>"], image_start_token_id=ids["<|begin_of_image|>"],
                             image_end_token_id=ids["<|end_of_image|>"], video_start_token_id=ids["<|begin_of_video|>"],
                             video_end_token_id=ids["<|end_of_video|>"])
        side = 28
        # images have temporal_patch_size frames' worth of pixels in GLM's budget: twice the area
        ip = Glm4vImageProcessorPil(size={"shortest_edge": 2 * min_tokens * side * side,
                                          "longest_edge": 2 * max_tokens * side * side})
        proc = image_only_processor_class(cls.processor_class)(image_processor=ip, tokenizer=tok,
                                                               chat_template=TINY_CHAT_TEMPLATE)
        return save_tiny(cls, config, proc, out_dir, seed)

    @property
    def vision_hidden_size(self) -> int:
        return self.config.vision_config.hidden_size

"""Qwen3.5 (`Qwen3_5ForConditionalGeneration`): Qwen3-VL's image layout, a hybrid linear-attention language model.

Images as Qwen3-VL (qwen3_vl.py) without deepstack: the whole image resized to multiples of 32 px,
one token per 2x2 group of 16-px patches, row-major, between `<|vision_start|>` and `<|vision_end|>`;
`vision.{i}` is a token's 4 patches [4, d_v].

The language model interleaves Gated DeltaNet (linear attention) blocks with softmax-attention
blocks (`layer_types`, every fourth by default). Linear-attention blocks have no keys, values or KV
cache and no attention mask: `keys.{L}`, `values.{L}` and `keys_prerope.{L}` exist only on the
attention layers (`adapter.kv_layers`; asking for another layer is a UserError naming them),
attention edits apply only there, and `attn_out.{L}` of a linear block is its DeltaNet's output.
"""

from __future__ import annotations

from sightline.models.base import ModuleNames, register
from sightline.models.qwen3_vl import Qwen3VLAdapter


@register
class Qwen3_5Adapter(Qwen3VLAdapter):
    family = "qwen3_5"
    architectures = ("Qwen3_5ForConditionalGeneration",)
    model_types = ("qwen3_5",)
    hf_class = "Qwen3_5ForConditionalGeneration"
    processor_class = "Qwen3VLProcessor"
    resid_at_block_input = False
    modules = ModuleNames(vision_tower="model.visual", vision_blocks="blocks", projector="model.visual.merger",
                          linear_attention="linear_attn")

    @classmethod
    def _tiny_text_extra(cls) -> dict:
        # block 0 linear attention, block 1 softmax attention; head_dim 32 with a quarter rotated (M-RoPE 2+1+1)
        return dict(head_dim=32, layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=2,
                    linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "mrope_section": [2, 1, 1],
                                     "mrope_interleaved": True, "partial_rotary_factor": 0.25})

    @classmethod
    def _tiny_vision_config(cls, text_hidden: int, window_size: int) -> dict:
        return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                    temporal_patch_size=2, out_hidden_size=text_hidden, num_position_embeddings=16)

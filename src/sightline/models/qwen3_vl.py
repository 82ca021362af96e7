"""Qwen3-VL and Qwen3-VL-MoE: Qwen2-VL's merged 2x2 grid with 16-px patches, and deepstack.

Layout as Qwen2-VL (qwen2_vl.py): the image resized to multiples of patch * merge = 32 px, one token
per 2x2 group of 16-px patches, row-major, between `<|vision_start|>` and `<|vision_end|>`; the
vision blocks see every group's patches contiguously (no window order). `vision.{i}` is a token's
4 patches [4, d_v].

Deepstack: the outputs of some vision blocks (`deepstack_visual_indexes`), each through its own
merger, are ADDED to the image positions of the stream after each of the first decoder blocks.
HF's `hidden_states[L]` is block L-1's output before that addition; sightline's `resid.{L}` is what
enters block L, so it includes it (`resid_at_block_input`). The language model has q/k norms:
`keys_prerope` is after `k_norm`, before the (interleaved M-)RoPE.
"""

from __future__ import annotations

from sightline.models.base import ModuleNames, register
from sightline.models.qwen2_vl import Qwen2VLAdapter


@register
class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    architectures = ("Qwen3VLForConditionalGeneration",)
    model_types = ("qwen3_vl",)
    hf_class = "Qwen3VLForConditionalGeneration"
    processor_class = "Qwen3VLProcessor"
    windowed = False
    resid_at_block_input = True
    modules = ModuleNames(vision_tower="model.visual", vision_blocks="blocks", projector="model.visual.merger")

    @classmethod
    def _tiny_text_extra(cls) -> dict:
        return dict(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                                                  "mrope_interleaved": True})

    @classmethod
    def _tiny_vision_config(cls, text_hidden: int, window_size: int) -> dict:
        # deepstack from vision block 0 into the stream after decoder block 0
        return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                    temporal_patch_size=2, out_hidden_size=text_hidden, num_position_embeddings=16,
                    deepstack_visual_indexes=[0])

    @property
    def vision_hidden_size(self) -> int:
        return self.config.vision_config.hidden_size


@register
class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE: the same layout; the decoder's MLPs are sparse mixtures of experts (`mlp_out` is their sum)."""

    family = "qwen3_vl_moe"
    architectures = ("Qwen3VLMoeForConditionalGeneration",)
    model_types = ("qwen3_vl_moe",)
    hf_class = "Qwen3VLMoeForConditionalGeneration"
    processor_class = "Qwen3VLProcessor"

    @classmethod
    def _tiny_text_extra(cls) -> dict:
        return {**super()._tiny_text_extra(), "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                "decoder_sparse_step": 1}

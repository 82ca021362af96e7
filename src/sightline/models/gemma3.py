"""Gemma 3 (`Gemma3ForConditionalGeneration`): one average-pooled SigLIP grid per image, row-major.

The processor squashes the image to the tower's square input (896 px; no crop, no pad), SigLIP cuts
it into p x p patches (64 x 64), and the projector average-pools k x k patches (k = p / t) into a
t x t grid (`mm_tokens_per_image` = t*t = 256 tokens), normed and projected. The prompt's
`<start_of_image>` becomes `\\n\\n<start_of_image>` + t*t `<image_soft_token>` + `<end_of_image>\\n\\n`;
features sit on `<image_soft_token>` (`config.image_token_id`). Each token covers k x k patches:
`vision.{i}` is [k*k, d_v], the pooled patches row-major, and its pixel box covers them all.
Pan-and-scan crops (`do_pan_and_scan`, off by default) are not described.

The language model: embeddings scaled by sqrt(d) for TEXT tokens only (image features enter
unscaled: `projector` is exactly the projector's output there); q/k norms (`keys_prerope` after
`k_norm`); post-norms on both writes (`attn_out` / `mlp_out` are `post_attention_layernorm` /
`post_feedforward_layernorm` outputs); image tokens attend to each other bidirectionally; sliding-window
layers keep only the last window of keys in HF's cache, so captures record the whole prefill
(`DynamicSlidingWindowLayer.activate_past_recording`): `keys.{L}` holds every position, exactly the
keys the layer attended with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sightline.models.base import Adapter, Batch, ModuleNames, register
from sightline.models.layout import TokenLayout, ViewGrid

TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<start_of_image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)


def pooled_vision_index(image: int, patches: int, tokens: int) -> np.ndarray:
    """[t, t, k*k] rows of each pooled token's patches in image `image`'s vision sequence (p*p per image)."""
    k = patches // tokens
    r = np.arange(tokens)[:, None, None, None] * k + np.arange(k)[None, None, :, None]
    c = np.arange(tokens)[None, :, None, None] * k + np.arange(k)[None, None, None, :]
    return (image * patches * patches + r * patches + c).reshape(tokens, tokens, k * k)


@register
class Gemma3Adapter(Adapter):
    family = "gemma3"
    architectures = ("Gemma3ForConditionalGeneration",)
    model_types = ("gemma3",)
    hf_class = "Gemma3ForConditionalGeneration"
    modules = ModuleNames(attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm",
                          k_norm_heads_first=True)

    @classmethod
    def build_tiny(cls, out_dir: str | Path, image_size: int = 56, patch_size: int = 14, tokens_per_image: int = 4,
                   sliding_window: int = 8, text: dict | None = None, vision: dict | None = None, seed: int = 0) -> Path:
        """A random Gemma3ForConditionalGeneration: 4 x 4 SigLIP patches pooled 2 x 2 into 2 x 2 tokens; LM layer 0
        sliding (window 8, shorter than the prompts), layer 1 global."""
        from transformers import Gemma3Config, Gemma3ImageProcessorPil, Gemma3Processor

        from sightline.models.testing import alternate_sliding_layers, make_tokenizer, save_tiny, siglip_vision_config

        named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
        tok = make_tokenizer("<image_soft_token>", extra_special=("<start_of_turn>", "<end_of_turn>"), named=named)
        tok.chat_template = TINY_CHAT_TEMPLATE
        text_cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                        sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention"],
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        )
        text_cfg.update(text or {})
        alternate_sliding_layers(text_cfg, text)
        config = Gemma3Config(
            text_config=text_cfg, vision_config=siglip_vision_config(image_size, patch_size, **(vision or {})),
            mm_tokens_per_image=tokens_per_image, image_token_index=tok.image_token_id,
            boi_token_index=tok.convert_tokens_to_ids(named["boi_token"]),
            eoi_token_index=tok.convert_tokens_to_ids(named["eoi_token"]))
        ip = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size},
                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)
        proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=tokens_per_image,
                               chat_template=TINY_CHAT_TEMPLATE)
        return save_tiny(cls, config, proc, out_dir, seed,
                         randomize=("model.multi_modal_projector.mm_input_projection_weight",))

    # ------------------------------------------------------------------ facts
    @property
    def patches_side(self) -> int:
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    @property
    def tokens_side(self) -> int:
        return int(round(self.config.mm_tokens_per_image**0.5))

    @property
    def patches_per_token(self) -> int:
        return (self.patches_side // self.tokens_side) ** 2

    @property
    def prompt_image_token(self) -> str:
        return self.processor.boi_token

    def processor_images(self, images):
        return [[im] for im in images]  # the processor counts images per sample

    # ------------------------------------------------------------------ grids
    def image_grids(self, inputs, example: int, image_sizes_hw):
        if getattr(self.processor.image_processor, "do_pan_and_scan", False):
            raise NotImplementedError("Gemma 3 pan-and-scan crops are not described; load with do_pan_and_scan=False")
        t, p = self.tokens_side, self.patches_side
        grids = []
        for k, (h, w) in enumerate(image_sizes_hw):
            # the image is squashed to the square input: the pooled grid tiles the original exactly
            grids.append([ViewGrid(k, 0, t, t, (h, w), (0.0, 0.0), (w / t, h / t),
                                   vision_index=pooled_vision_index(k, p, t))])
        return grids

    def vision_rows(self, batch: Batch, layout: TokenLayout) -> int:
        return len({g.image for g in layout.grids}) * self.patches_side**2

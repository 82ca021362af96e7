"""Aya Vision (`AyaVisionForConditionalGeneration`): InternVL's tiles + thumbnail, pixel-shuffled SigLIP, Cohere 2 LM.

The image processor is GotOcr2's, as InternVL's (internvl.py): the nh x nw tile grid closest to the
image's aspect ratio (min..max tiles), the whole image squashed onto it and cut into 364-px tiles,
then a global thumbnail when there is more than one tile. SigLIP (no CLS) gives p x p patches per
crop; the projector pixel-shuffles each 2x2 group (`downsample_factor`) into one token: t = p / 2.
The prompt's `<image>` becomes `<|START_OF_IMG|>`, then per tile the plain text `TILE_i` + t*t
`<|IMG_PATCH|>` (the image token, `config.image_token_id`), then `TILE_GLOBAL` + t*t `<|IMG_PATCH|>`,
then `<|END_OF_IMG|>`. Views: 0 = the global thumbnail, 1.. = the tiles in reading order.
`vision.{i}` is a token's 4 patches [4, d_v], row-major in the group.

Cohere 2's sliding-window layers use RoPE, its global layers none (`keys` = `keys_prerope` there);
its blocks run attention and MLP in parallel on one normed input, both writes adding to the stream.
"""

from __future__ import annotations

from pathlib import Path

from sightline.models.base import ModuleNames, register
from sightline.models.internvl import InternVLAdapter


@register
class AyaVisionAdapter(InternVLAdapter):
    family = "aya_vision"
    architectures = ("AyaVisionForConditionalGeneration",)
    model_types = ("aya_vision",)
    hf_class = "AyaVisionForConditionalGeneration"
    processor_class = ""
    modules = ModuleNames()

    @classmethod
    def build_tiny(cls, out_dir: str | Path, tile: int = 56, patch_size: int = 14, max_tiles: int = 6,
                   sliding_window: int = 8, text: dict | None = None, vision: dict | None = None, seed: int = 0) -> Path:
        """A random AyaVisionForConditionalGeneration (SigLIP tower, Cohere 2 LM: layer 0 sliding with RoPE,
        layer 1 global without): 56-px tiles of 4 x 4 patches shuffled into 2 x 2 tokens, 1 to 6 tiles + global."""
        from transformers import AyaVisionConfig, AyaVisionProcessor, GotOcr2ImageProcessorPil

        from sightline.models.testing import (
            CHAT_TEMPLATE,
            alternate_sliding_layers,
            make_tokenizer,
            save_tiny,
            siglip_vision_config,
        )

        tok = make_tokenizer("<|IMG_PATCH|>", extra_special=("<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>",
                                                              "<|IMG_LINE_BREAK|>"))
        tok.chat_template = CHAT_TEMPLATE.replace("{{ IMAGE }}", "<image>")
        text_cfg = dict(model_type="cohere2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention"],
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        )
        text_cfg.update(text or {})
        alternate_sliding_layers(text_cfg, text)
        config = AyaVisionConfig(text_config=text_cfg, vision_config=siglip_vision_config(tile, patch_size, **(vision or {})),
                                 image_token_index=tok.image_token_id, downsample_factor=2)
        ip = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1,
                                      max_patches=max_tiles, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        proc = AyaVisionProcessor(image_processor=ip, tokenizer=tok, patch_size=patch_size, img_size=tile,
                                  downsample_factor=2, chat_template=tok.chat_template)
        return save_tiny(cls, config, proc, out_dir, seed)

    @property
    def shuffle(self) -> int:
        return int(self.config.downsample_factor)

    @property
    def prompt_image_token(self) -> str:
        return self.processor.image_token

    def rotates_keys(self, layer: int) -> bool:
        tc = self.text_config
        if tc.model_type != "cohere2":
            return True
        return tc.layer_types[layer] == "sliding_attention"

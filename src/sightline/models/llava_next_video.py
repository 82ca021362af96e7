"""LLaVA-NeXT-Video (`LlavaNextVideoForConditionalGeneration`) on images: exactly LLaVA-NeXT's anyres layout.

For an image the model is LLaVA-NeXT (llava_next.py): base view g x g, then the unpadded
high-resolution map with one `image_newline` per row; the video resampler (average pooling) runs on
video frames only. The processor owns a video processor and passes its parts positionally, video
first, so the images-only processor (`processors.image_only_processor_class`) passes them by keyword.
"""

from __future__ import annotations

from pathlib import Path

from sightline.models.base import register
from sightline.models.llava_next import TINY_PINPOINTS, LlavaNextAdapter


@register
class LlavaNextVideoAdapter(LlavaNextAdapter):
    family = "llava_next_video"
    architectures = ("LlavaNextVideoForConditionalGeneration",)
    model_types = ("llava_next_video",)
    hf_class = "LlavaNextVideoForConditionalGeneration"
    processor_class = "LlavaNextVideoProcessor"

    @classmethod
    def build_tiny(cls, out_dir: str | Path, image_size: int = 56, patch_size: int = 14, text: dict | None = None,
                   vision: dict | None = None, seed: int = 0) -> Path:
        """A random LlavaNextVideoForConditionalGeneration (CLIP tower, Llama LM), images-only processor."""
        from transformers import LlavaNextImageProcessor

        from sightline.models.processors import image_only_processor_class
        from sightline.models.testing import llava_config, make_tokenizer, save_tiny

        pinpoints = [[a * image_size // 56, b * image_size // 56] for a, b in TINY_PINPOINTS]
        tok = make_tokenizer("<image>", extra_special=("<video>",))
        config = llava_config("LlavaNextVideoConfig", tok, image_size, patch_size, text, vision,
                              image_grid_pinpoints=pinpoints, video_token_id=tok.convert_tokens_to_ids("<video>"))
        ip = LlavaNextImageProcessor(size={"shortest_edge": image_size},
                                     crop_size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints)
        proc = image_only_processor_class(cls.processor_class)(
            image_processor=ip, tokenizer=tok, patch_size=patch_size, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, chat_template=tok.chat_template)
        return save_tiny(cls, config, proc, out_dir, seed)

"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's anyres layout, SigLIP, anyres_max.

The grids are LLaVA-NeXT's (llava_next.py): base view g x g without newline, then the unpadded
high-resolution map with one `image_newline` per row. What differs: with
`vision_aspect_ratio="anyres_max_N"`, HF bilinearly shrinks an unpadded map of more than about
N crops' worth of tokens (ratio = sqrt(rows*cols / (N*g*g)) > 1.1) to
(int(rows // ratio), int(cols // ratio)); those tokens are blends of patches (`interpolated=True`,
vision index -1), and their pixel boxes are the same window cut into fewer, larger cells (the
footprint `F.interpolate(mode="bilinear", align_corners=False)` assigns each output cell).

The processor owns a video processor, which cannot be built without torchvision; an image-only
subclass of HF's processor is used there (see `ImageOnlyOnevisionProcessor`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sightline.models.base import register
from sightline.models.layout import ViewGrid
from sightline.models.llava_next import AnyresPlan, LlavaNextAdapter, spans_grid

# Tiny checkpoints (`build_tiny`): OneVision's pinpoints scaled down (384 -> 56), up to 3 x 3 tiles
# of 4 x 4 tokens.
TINY_PINPOINTS = [[56 * i, 56 * j] for i in (1, 2, 3) for j in (1, 2, 3)]


def max_crops(vision_aspect_ratio: str) -> int:
    """N of "anyres_max_N", parsed as HF does."""
    return int(str(vision_aspect_ratio).strip("anyres_max_"))


def interpolated_shape(rows: int, cols: int, side: int, vision_aspect_ratio: str) -> tuple[int, int] | None:
    """The (rows, cols) HF interpolates an unpadded rows x cols map to, or None when it keeps it."""
    ratio = math.sqrt(rows * cols / (max_crops(vision_aspect_ratio) * side**2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return None


def resample_spans(spans: np.ndarray, n_out: int) -> np.ndarray:
    """Pixel spans of the n_out cells that bilinear resizing (align_corners=False) cuts a map axis
    into: cell i covers source grid coordinates [i * n / n_out, (i + 1) * n / n_out)."""
    n = len(spans)
    edges = np.arange(n_out + 1) * (n / n_out)

    def at(u, k):  # pixel of continuous source coordinate u, measured inside source token k
        return spans[k, 0] + (u - k) * (spans[k, 1] - spans[k, 0])

    k_start = np.minimum(np.floor(edges[:-1]).astype(int), n - 1)
    k_end = np.maximum(np.ceil(edges[1:]).astype(int) - 1, 0)
    return np.stack([at(edges[:-1], k_start), at(edges[1:], k_end)], axis=1)


@register
class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    model_types = ("llava_onevision",)
    hf_class = "LlavaOnevisionForConditionalGeneration"
    processor_class = "LlavaOnevisionProcessor"

    @classmethod
    def build_tiny(
        cls,
        out_dir: str | Path,
        image_size: int = 56,
        patch_size: int = 14,
        image_grid_pinpoints: list | None = None,
        vision_aspect_ratio: str = "anyres_max_4",
        text: dict | None = None,
        vision: dict | None = None,
        seed: int = 0,
    ) -> Path:
        """A random LlavaOnevisionForConditionalGeneration (SigLIP tower, Qwen2 LM) with processor.

        `anyres_max_4` with up to 3 x 3 tiles of 4 x 4 tokens: maps of more than ~4.8 tiles' worth of
        tokens are interpolated (e.g. a square image on 3 x 3 tiles), smaller ones are not.
        """
        from transformers import LlavaOnevisionConfig, LlavaOnevisionImageProcessor

        from sightline.models.processors import image_only_processor_class
        from sightline.models.testing import llama_text_config, make_tokenizer, save_tiny, siglip_vision_config

        pinpoints = image_grid_pinpoints or [[a * image_size // 56, b * image_size // 56] for a, b in TINY_PINPOINTS]
        tok = make_tokenizer("<image>", extra_special=("<video>",))
        config = LlavaOnevisionConfig(
            text_config=llama_text_config(len(tok), model_type="qwen2", **(text or {})),
            vision_config=siglip_vision_config(image_size, patch_size, **(vision or {})),
            image_token_index=tok.image_token_id,
            video_token_index=tok.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio=vision_aspect_ratio,
            projector_hidden_act="gelu",
            pad_token_id=tok.pad_token_id,
        )
        ip = LlavaOnevisionImageProcessor(
            size={"height": image_size, "width": image_size},
            image_grid_pinpoints=pinpoints,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        proc = image_only_processor_class(cls.processor_class)(
            image_processor=ip,
            tokenizer=tok,
            num_image_tokens=(image_size // patch_size) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio=vision_aspect_ratio,
            chat_template=tok.chat_template,
        )
        return save_tiny(cls, config, proc, out_dir, seed)

    @property
    def vision_aspect_ratio(self) -> str:
        return getattr(self.config, "vision_aspect_ratio", None) or "anyres_max_9"

    def image_grids(self, inputs, example: int, image_sizes_hw):
        if len(image_sizes_hw) > 1:
            # HF tiles only single-image examples; several images each become one padded square
            # crop followed by a single newline token, a layout this adapter does not describe
            raise NotImplementedError("LLaVA-OneVision layouts are supported for one image per example")
        return super().image_grids(inputs, example, image_sizes_hw)

    def map_grid(self, k: int, p: AnyresPlan, crop_offset: int = 0) -> ViewGrid:
        """The source map, or its anyres_max bilinear shrink (interpolated, no vision rows)."""
        src = self.source_map_grid(k, p, crop_offset)
        shape = interpolated_shape(src.rows, src.cols, p.side, self.vision_aspect_ratio)
        if shape is None:
            return src
        rows, cols = shape
        xs, ys = src.spans()
        return spans_grid(
            k, 1, p.image_hw, resample_spans(xs, cols), resample_spans(ys, rows), src.step_xy, newline=True,
            interpolated=True, vision_index=np.full((rows, cols), -1, np.int64),
        )

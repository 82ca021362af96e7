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

import numpy as np

from sightline.models.base import register
from sightline.models.layout import ViewGrid
from sightline.models.llava_next import AnyresPlan, LlavaNextAdapter, spans_grid


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

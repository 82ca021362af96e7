"""Pixel geometry of image processors: where a processed pixel came from in the original image.

Each function mirrors, on sizes only, the steps a transformers image processor applies (pad to
square, resize, centre crop) and returns the affine map of a token grid onto original pixels as
(origin_xy, step_xy) for `ViewGrid`. The resize rounding is HF's own (`get_resize_output_image_size`).
"""

from __future__ import annotations

import numpy as np


def _size_dict(size) -> dict:
    if size is None:
        return {}
    if isinstance(size, dict):
        return dict(size)
    return {k: getattr(size, k) for k in ("height", "width", "shortest_edge", "longest_edge") if getattr(size, k, None)}


def resized_hw(size, h: int, w: int) -> tuple[int, int]:
    """Output (height, width) of an HF resize with `size` for an h x w image."""
    from transformers.image_transforms import get_resize_output_image_size
    from transformers.image_utils import ChannelDimension

    s = _size_dict(size)
    if s.get("height") and s.get("width"):
        return int(s["height"]), int(s["width"])
    if s.get("shortest_edge") and not s.get("longest_edge"):
        fake = np.broadcast_to(np.zeros((), np.uint8), (3, h, w))  # no pixels allocated
        out = get_resize_output_image_size(
            fake, size=s["shortest_edge"], default_to_square=False, input_data_format=ChannelDimension.FIRST
        )
        return int(out[0]), int(out[1])
    raise ValueError(f"unsupported resize size {s}")


def clip_style_grid(image_processor, image_hw: tuple[int, int], rows: int, cols: int):
    """Affine (origin_xy, step_xy) of a rows x cols token grid over a CLIP-style processed image.

    Mirrors LlavaImageProcessor / CLIPImageProcessor: optional pad-to-square (centred), resize,
    optional centre crop; the token grid tiles the final processed image evenly.
    """
    h, w = image_hw
    pad_x = pad_y = 0.0
    ph, pw = h, w
    if getattr(image_processor, "do_pad", False):
        m = max(h, w)
        pad_y = (m - h) // 2 if w > h else 0
        pad_x = (m - w) // 2 if h > w else 0
        ph = pw = m
    rh, rw = (resized_hw(image_processor.size, ph, pw) if getattr(image_processor, "do_resize", True) else (ph, pw))
    sy, sx = rh / ph, rw / pw  # resized pixels per padded pixel
    top = left = 0
    fh, fw = rh, rw
    if getattr(image_processor, "do_center_crop", False):
        crop = _size_dict(image_processor.crop_size)
        ch, cw = int(crop["height"]), int(crop["width"])
        if ch <= rh and cw <= rw:
            top, left = int((rh - ch) / 2.0), int((rw - cw) / 2.0)
        else:  # HF pads when the crop is larger than the image
            top = -((ch - rh) // 2) if ch > rh else int((rh - ch) / 2.0)
            left = -((cw - rw) // 2) if cw > rw else int((rw - cw) / 2.0)
        fh, fw = ch, cw
    # processed pixel p -> padded pixel (p + left) / sx -> original pixel minus the pad
    origin = (left / sx - pad_x, top / sy - pad_y)
    step = (fw / cols / sx, fh / rows / sy)
    return origin, step


def processor_size_hw(image_processor) -> tuple[int, int]:
    """(height, width) of an image processor's `size`, whether a dict or a SizeDict."""
    size = image_processor.size
    return (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)

"""The token layout of one image in a model's prompt: which position is which image, view, row, col and pixel box."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class InspectConfig:
    """What `sightline inspect` looks at."""

    model: str
    """local checkpoint folder or hub id"""
    image: str
    """the image file to lay out"""
    prompt: str | None = None
    """text after the image (default: the image alone)"""
    prefix: str | None = None
    """text placed before the image in the user turn"""
    raw_prompt: bool = False
    """feed --prompt as is, not through the model's chat template"""
    model_dtype: str = "auto"
    """auto (bfloat16 on GPU, float32 on CPU), float32, float16, bfloat16"""
    device: str = "auto"
    """auto, cpu, cuda, cuda:1, ..."""
    device_map: str | None = None
    """e.g. "auto" to spread a large model over GPUs (accelerate)"""
    revision: str | None = None
    """hub revision (branch, tag or commit)"""
    trust_remote_code: bool = False
    """run code shipped with the checkpoint (off unless you ask)"""
    json: bool = False
    """print JSON instead of text"""


def inspect_layout(cfg: InspectConfig) -> dict[str, Any]:
    """Load the model, lay out one image with the prompt, and return the layout's facts (JSON-able)."""
    from sightline.data import load_image
    from sightline.models import load_model
    from sightline.runtime import resolve_placement

    device, dtype = resolve_placement(cfg.device, cfg.model_dtype, cfg.device_map)
    image = load_image(cfg.image)
    ad = load_model(cfg.model, dtype=dtype, device=device, device_map=cfg.device_map, revision=cfg.revision,
                    trust_remote_code=cfg.trust_remote_code)
    text = ad.render_prompt(cfg.prompt, prefix=cfg.prefix, raw=cfg.raw_prompt)
    lay = ad.prepare([image], [text]).layouts[0]
    img_pos = lay.image_positions
    return {"model": ad.describe(), "image": cfg.image, "image_size_hw": [image.height, image.width], "text": text,
            "image_positions": [int(img_pos[0]), int(img_pos[-1])] if len(img_pos) else [], **lay.summary()}


def format_layout(info: dict[str, Any]) -> str:
    """The text `sightline inspect` prints for `inspect_layout`'s result."""
    m = info["model"]
    h, w = info["image_size_hw"]
    t = info["tokens"]
    lines = [
        f"model      {m['name']} ({m['family']}, {m['n_layers']} layers, {m['n_kv_heads']} KV heads x {m['head_dim']})",
        f"image      {info['image']}  {w}x{h} px",
        f"text       {info['text']!r}",
        f"sequence   {info['seq_len']} tokens: {t['image']} image, {t['image_newline']} newline, "
        f"{t['text']} text, {t['special']} special",
    ]
    if info["image_positions"]:
        lo, hi = info["image_positions"]
        lines.append(f"image at   positions {lo}..{hi} ({t['image'] + t['image_newline']} image tokens)")
    for g in info["grids"]:
        extra = (" + newline per row" if g["newline"] else "") + (" (interpolated)" if g["interpolated"] else "")
        px, py = g["pixels_per_token_xy"]
        lines.append(f"  image {g['image']} view {g['view']}: {g['rows']}x{g['cols']} grid{extra}, from position "
                     f"{g['first_position']}, {g['n_tokens']} tokens, {px:g}x{py:g} px per token")
    return "\n".join(lines)

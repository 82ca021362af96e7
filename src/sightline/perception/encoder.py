"""An external vision encoder (a CLIP or SigLIP vision checkpoint): the baseline "vision encoder before
multimodal training" that the perception readouts compare a VLM's image tokens with.

`Encoder.load(path)` loads only the vision part of a Hugging Face CLIP/SigLIP folder (a full
CLIPModel/SiglipModel folder or a vision-only CLIPVisionModel/SiglipVisionModel one) with the image
processor saved beside it. `Encoder.features(images)` gives, per image, the patch tokens of one hidden
layer (CLS dropped where the model has one) and a `ViewGrid` that maps the patch grid back onto the
ORIGINAL image's pixels through exactly what the processor did (CLIP: resize the shortest side, then
centre crop; SigLIP: resize to a square, aspect not kept), the same geometry the LLaVA adapter uses.
`grid_layout(grid)` wraps a grid so that `mask_to_tokens` / `tokens_to_pixels` / `point_to_token` take it;
token (r, c) is row r * cols + c of the features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sightline.errors import UserError
from sightline.models.geometry import clip_style_grid
from sightline.models.layout import ViewGrid, find_grid

VISION_MODELS = {  # config model_type -> the transformers class that holds its vision part
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
}
# processors whose geometry `clip_style_grid` mirrors (resize [+ centre crop]; no padding, no tiling)
PROCESSORS = ("CLIPImageProcessor", "CLIPImageProcessorPil", "SiglipImageProcessor", "SiglipImageProcessorPil")


class GridLayout:
    """One grid as the layout `mask_to_tokens`, `tokens_to_pixels` and `point_to_token` take: its
    tokens sit at positions 0 .. rows*cols-1, row-major, i.e. the rows of `Encoder.features`."""

    def __init__(self, grid: ViewGrid):
        self.grids = [grid]
        self.grid_start = [0]

    def grid(self, image: int = 0, view: int = 0) -> ViewGrid:
        """The grid (KeyError for another image or view)."""
        return find_grid(self.grids, image, view)

    def grid_positions(self, image: int = 0, view: int = 0) -> np.ndarray:
        """Feature rows of the grid's tokens as [rows, cols]."""
        g = self.grid(image, view)
        return np.arange(g.rows * g.cols).reshape(g.rows, g.cols)


def grid_layout(grid: ViewGrid) -> GridLayout:
    """A layout holding just `grid`, for `mask_to_tokens(grid_layout(grid), mask_hw)` and friends."""
    return GridLayout(grid)


class Encoder:
    """A CLIP/SigLIP vision tower with its image processor: patch features of one layer and their grid."""

    def __init__(self, model, image_processor, layer: int = -1, path: str = ""):
        self.model = model.eval()
        self.image_processor = image_processor
        self.path = str(path)
        n_layers = model.config.num_hidden_layers
        if not -(n_layers + 1) <= layer <= n_layers:
            raise UserError(f"encoder layer {layer} out of range for {self.path or 'the encoder'} "
                            f"({n_layers} layers: choose {-(n_layers + 1)} .. {n_layers}, -1 = last)")
        self.layer = layer
        self.patch_size = int(model.config.patch_size)
        self.image_size = int(model.config.image_size)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, dtype: str = "float32", layer: int = -1,
             progress: bool = True) -> Encoder:
        """The vision part of a local CLIP/SigLIP checkpoint folder and its image processor.

        `layer` indexes the hidden states as HF's `vision_feature_layer` does (0 = the embeddings,
        -1 = the last layer, -2 = the second last). No remote code, no downloads."""
        import transformers
        from transformers import AutoConfig, AutoImageProcessor

        from sightline.runtime import resolve_placement

        folder = Path(path)
        what = f"--encoder {path}"
        if not (folder / "config.json").is_file():
            raise UserError(f"{what}: not a checkpoint folder (no config.json); pass a local CLIP or SigLIP "
                            "vision checkpoint folder")
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - any unreadable config is the user's folder
            raise UserError(f"{what}: config.json cannot be read ({type(e).__name__}); pass a CLIP or SigLIP "
                            "vision checkpoint folder") from None
        kind = getattr(config, "model_type", None)
        if kind not in VISION_MODELS:
            raise UserError(f"{what}: a {kind!r} checkpoint, not a CLIP or SigLIP vision model; pass a "
                            "CLIPModel/CLIPVisionModel or SiglipModel/SiglipVisionModel folder")
        if not any((folder / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
            raise UserError(f"{what}: no preprocessor_config.json; save the model's image processor into the "
                            "folder (image_processor.save_pretrained(PATH))")
        try:
            processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{what}: its image processor config cannot be loaded ({type(e).__name__}: {e}); "
                            "save a CLIP or SigLIP image processor into the folder") from None
        if type(processor).__name__ not in PROCESSORS:
            raise UserError(f"{what}: image processor {type(processor).__name__} is not a CLIP or SigLIP one; "
                            "save a CLIPImageProcessor or SiglipImageProcessor config into the folder")
        dev, dt = resolve_placement(device or "auto", dtype)
        from sightline.models.base import quiet_loading

        with quiet_loading(progress):
            model = getattr(transformers, VISION_MODELS[kind]).from_pretrained(
                folder, local_files_only=True, trust_remote_code=False, dtype=getattr(torch, dt))
        return cls(model.to(dev), processor, layer=layer, path=str(path))

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """What the image processor makes of the images: [n, 3, H, W] float32."""
        pixels = self.image_processor([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise UserError(f"--encoder {self.path}: its image processor makes {tuple(pixels.shape[-2:])} pixel "
                            f"images but the model takes {self.image_size}; fix preprocessor_config.json")
        return pixels

    def grid(self, image_size_hw: tuple[int, int], image: int = 0) -> ViewGrid:
        """The patch grid of an image of this (height, width), in its original pixels."""
        g = self.image_size // self.patch_size
        origin, step = clip_style_grid(self.image_processor, tuple(image_size_hw), g, g)
        first = self._n_prefix()
        return ViewGrid(image, 0, g, g, tuple(int(v) for v in image_size_hw), origin, step,
                        vision_index=(first + np.arange(g * g)).reshape(g, g))

    def _n_prefix(self) -> int:
        """Tokens before the patches in the vision sequence: 1 (CLS) for CLIP, 0 for SigLIP."""
        return int(any(n.endswith("class_embedding") for n, _ in self.model.named_parameters()))

    @torch.no_grad()
    def features(self, images: list[Image.Image], batch_size: int = 32) -> list[tuple[torch.Tensor, ViewGrid]]:
        """Per image, the chosen layer's patch tokens [rows*cols, D] (row-major, CLS dropped; float32 on
        the CPU) and their grid on the original image (`grid_layout(grid)` for `mask_to_tokens`)."""
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        first = self._n_prefix()
        out = []
        for i in range(0, len(images), batch_size):
            chunk = list(images[i : i + batch_size])
            pixels = self.pixel_values(chunk).to(device=device, dtype=dtype)
            hidden = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[self.layer]
            if hidden.shape[1] != first + (self.image_size // self.patch_size) ** 2:  # a bug, not the user's
                raise RuntimeError(f"vision sequence of {hidden.shape[1]} tokens, expected {first} + the patches")
            for im, h in zip(chunk, hidden[:, first:].float().cpu()):
                out.append((h, self.grid((im.height, im.width))))
        return out

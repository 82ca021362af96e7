"""Qwen2.5-VL and Qwen2-VL: one dynamic-resolution grid per image, 2x2 patches merged per token.

The processor resizes each image (`smart_resize`) to multiples of patch * merge = 28 px and cuts
it into 14-px patches, `image_grid_thw = [1, gh, gw]`; every 2x2 group of patches becomes one
language token, row-major over the (gh/2) x (gw/2) merged grid, between `<|vision_start|>` and
`<|vision_end|>`. The whole image is resized (no crop, no pad), so the grid tiles the original
image exactly: step = (W / cols, H / rows).

The vision blocks run on the patches of ALL images of the batch flattened, [n_patches, d_v],
each merged group's patches contiguous. Qwen2.5-VL additionally permutes merged groups into
window order before the blocks (window attention) and undoes it after the merger; `vision.{i}`
gathers through that permutation, so a token's capture is its own 2x2 patches
[merge**2, d_v] in (row, col) order, whatever order the blocks see them in.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from sightline.models.base import Adapter, Batch, ModuleNames, register
from sightline.models.layout import TokenLayout, ViewGrid

# Tiny checkpoints (`build_tiny`): Qwen's chat template and markers, for a locally trained tokenizer.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
TINY_SPECIAL = ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>")


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def window_order(rows: int, cols: int, window: int) -> np.ndarray:
    """Merged-token indices (row-major over rows x cols) in the order window attention sees them.

    Mirrors transformers' `get_vision_window_index` for one image with t = 1: windows of
    `window` x `window` merged tokens, visited row-major, tokens row-major inside each window;
    edge windows are partial.
    """
    idx = np.arange(rows * cols).reshape(rows, cols)
    out = [
        idx[r : r + window, c : c + window].reshape(-1)
        for r in range(0, rows, window)
        for c in range(0, cols, window)
    ]
    return np.concatenate(out)


@register
class Qwen2_5_VLAdapter(Adapter):
    """Qwen2.5-VL (the family's current generation); `Qwen2VLAdapter` covers Qwen2-VL."""

    family = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    model_types = ("qwen2_5_vl",)
    hf_class = "Qwen2_5_VLForConditionalGeneration"
    processor_class = "Qwen2_5_VLProcessor"
    windowed = True  # vision blocks see merged groups in window order
    marker_keys = ("vision_start_token_id", "vision_end_token_id")  # config keys of the markers around an image
    modules = ModuleNames(vision_tower="model.visual", vision_blocks="blocks", projector="model.visual.merger")

    @classmethod
    def build_tiny(
        cls,
        out_dir: str | Path,
        min_tokens: int = 4,
        max_tokens: int = 64,
        window_size: int = 56,
        text: dict | None = None,
        vision: dict | None = None,
        seed: int = 0,
    ) -> Path:
        """A random model of this family with its processor (images only), saved to `out_dir`.

        Images become between `min_tokens` and `max_tokens` merged tokens (2x2 .. 8x8 by default).
        Qwen2.5-VL's windows are `window_size` px = 2x2 merged tokens, so windows split every grid
        larger than that; block 1 is a full-attention block, block 0 a window block.
        """
        import transformers
        from transformers import Qwen2VLImageProcessorPil

        from sightline.models.processors import image_only_processor_class
        from sightline.models.testing import make_tokenizer, save_tiny

        tok = make_tokenizer("<|image_pad|>", extra_special=TINY_SPECIAL)
        tok.chat_template = TINY_CHAT_TEMPLATE
        ids = {t: tok.convert_tokens_to_ids(t) for t in TINY_SPECIAL}
        text_cfg = dict(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},  # head_dim 16
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        text_cfg.update(cls._tiny_text_extra())
        text_cfg.update(text or {})
        vision_cfg = {**cls._tiny_vision_config(text_cfg["hidden_size"], window_size), **(vision or {})}
        config = getattr(transformers, cls.hf_class.replace("ForConditionalGeneration", "Config"))(
            text_config=text_cfg,
            vision_config=vision_cfg,
            image_token_id=tok.image_token_id,
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        patch = vision_cfg["patch_size"]
        side = patch * 2  # patch * merge: one merged token
        ip = Qwen2VLImageProcessorPil(min_pixels=min_tokens * side * side, max_pixels=max_tokens * side * side,
                                      patch_size=patch, merge_size=2)
        proc = image_only_processor_class(cls.processor_class)(
            image_processor=ip, tokenizer=tok, chat_template=TINY_CHAT_TEMPLATE)
        return save_tiny(cls, config, proc, out_dir, seed)

    @classmethod
    def _tiny_text_extra(cls) -> dict:
        return {}

    @classmethod
    def _tiny_vision_config(cls, text_hidden: int, window_size: int) -> dict:
        return dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=window_size, fullatt_block_indexes=[1], out_hidden_size=text_hidden,
        )

    # ------------------------------------------------------------------ facts
    @property
    def vision_hidden_size(self) -> int:
        return self.config.vision_config.hidden_size

    @property
    def merge(self) -> int:
        """Patches merged per token along each side (2)."""
        return int(self.config.vision_config.spatial_merge_size)

    @property
    def window_tokens(self) -> int:
        """Side of an attention window in merged tokens (HF: window_size // merge // patch)."""
        vc = self.config.vision_config
        return vc.window_size // self.merge // vc.patch_size

    def vision_site_shape(self) -> tuple[int, ...]:
        """`vision.{i}` holds each token's merge x merge patches, row-major: [merge**2, d_v]."""
        return (self.merge**2, self.vision_hidden_size)

    # ------------------------------------------------------------------ inputs
    def render_prompt(self, prompt: str | None = "", prefix: str | None = None, raw: bool = False) -> str:
        """As the base, but a raw prompt without the image gets Qwen's own markers around it."""
        prompt = prompt or ""
        if raw and self.image_token not in prompt:
            start, end = (self.tokenizer.convert_ids_to_tokens(int(getattr(self.config, k))) for k in self.marker_keys)
            image = f"{start}{self.image_token}{end}"
            prompt = f"{image}\n{prompt}" if prompt else image
        return super().render_prompt(prompt, prefix, raw)

    def prepare(self, images, texts) -> Batch:
        batch = super().prepare(images, texts)
        # get_rope_index needs the modality of every position; the processor returns it, but a
        # processor configured not to would silently give the model 1-D positions.
        if "mm_token_type_ids" not in batch.inputs and self._forward_takes("mm_token_type_ids"):
            ids = batch.inputs["input_ids"]
            types = (ids == self.image_token_id).to(ids.dtype)
            video = getattr(self.config, "video_token_id", None)
            if video is not None:
                types = types.masked_fill(ids == video, 2)
            batch.inputs["mm_token_type_ids"] = types
        return batch

    def _forward_takes(self, name: str) -> bool:
        return name in inspect.signature(self.model.model.forward).parameters

    def _first_image(self, inputs, example: int) -> int:
        """Index into `image_grid_thw` of the example's first image (images of earlier examples
        are counted by their placeholder tokens)."""
        ids = _numpy(inputs["input_ids"])
        n_before = int((ids[:example] == self.image_token_id).sum())
        tokens = np.cumsum(_numpy(inputs["image_grid_thw"]).prod(-1) // self.merge**2)
        first = int(np.searchsorted(tokens, n_before, side="right"))
        if n_before and (first == 0 or tokens[first - 1] != n_before):
            raise ValueError(f"image placeholders before example {example} do not match image_grid_thw")
        return first

    def image_grids(self, inputs, example: int, image_sizes_hw):
        m = self.merge
        thw = _numpy(inputs["image_grid_thw"])
        first = self._first_image(inputs, example)
        grids = []
        patches_before = 0  # patch rows of this example's earlier images, in the blocks' hidden states
        for k, (h, w) in enumerate(image_sizes_hw):
            t, gh, gw = (int(v) for v in thw[first + k])
            if t != 1:
                raise ValueError(f"image {k} of example {example} has {t} temporal patches; images have 1")
            rows, cols = gh // m, gw // m
            # the image is resized as a whole to (gh, gw) patches: the grid tiles it exactly
            step = (w / cols, h / rows)
            order = window_order(rows, cols, self.window_tokens) if self.windowed else np.arange(rows * cols)
            slot = np.empty(rows * cols, np.int64)
            slot[order] = np.arange(rows * cols)  # where each merged token sits in the blocks' order
            # merged group j's patches are the processor's rows j*m*m .. j*m*m + m*m - 1, in
            # (row, col) order inside the group; the window permutation moves whole groups
            vision_index = patches_before + slot[:, None] * m * m + np.arange(m * m)[None, :]
            grids.append(
                [ViewGrid(k, 0, rows, cols, (h, w), (0.0, 0.0), step,
                          vision_index=vision_index.reshape(rows, cols, m * m))]
            )
            patches_before += rows * cols * m * m
        return grids

    # ------------------------------------------------------------------ vision features
    def vision_gather_index(self, batch: Batch, positions: list[np.ndarray]) -> np.ndarray:
        """Rows into the vision blocks' hidden states [n_patches_in_batch, d_v], as a hook on a
        block sees them (window order for Qwen2.5-VL): [n_selected, merge**2], -1 off images."""
        mm = self.merge**2
        out = []
        offset = 0
        for layout, pos in zip(batch.layouts, positions):
            per_pos = np.full((len(layout), mm), -1, np.int64)
            for g in layout.grids:
                p = layout.grid_positions(g.image, g.view).reshape(-1)
                per_pos[p] = g.vision_index.reshape(-1, mm) + offset
            out.append(per_pos[np.asarray(pos, dtype=np.int64)])
            offset += self.vision_rows(batch, layout)
        return np.concatenate(out) if out else np.zeros((0, mm), np.int64)

    def vision_rows(self, batch: Batch, layout: TokenLayout) -> int:
        return sum(g.rows * g.cols for g in layout.grids) * self.merge**2


@register
class Qwen2VLAdapter(Qwen2_5_VLAdapter):
    """Qwen2-VL: the same layout, full attention in every vision block (no window order)."""

    family = "qwen2_vl"
    architectures = ("Qwen2VLForConditionalGeneration",)
    model_types = ("qwen2_vl",)
    hf_class = "Qwen2VLForConditionalGeneration"
    processor_class = "Qwen2VLProcessor"
    windowed = False

    @classmethod
    def _tiny_vision_config(cls, text_hidden: int, window_size: int) -> dict:
        return dict(
            depth=2, embed_dim=32, hidden_size=text_hidden, mlp_ratio=2, num_heads=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2,
        )

    @property
    def vision_hidden_size(self) -> int:
        return self.config.vision_config.embed_dim  # Qwen2-VL's `hidden_size` is the merger's output

    @property
    def window_tokens(self) -> int:
        return 0

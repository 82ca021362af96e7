"""Tiny checkpoints of every supported family, built from config with a locally trained tokenizer.

Used by the tests (HF-equality, layout properties), the benchmarks (a ~60M LLaVA) and the model
organism. Nothing is downloaded: the tokenizer is a byte-level BPE trained in milliseconds, the
weights are random, and `save_pretrained` writes an ordinary Hugging Face folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ IMAGE }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

CORPUS = [
    "What is shown in this image? A red circle on the left and a blue square.",
    "Describe this image in detail. There are two shapes: a small green triangle and a star.",
    "Is there a star? yes no. How many objects are there? one two three four.",
    "the quick brown fox jumps over the lazy dog 0123456789 , . ? ! : ; ' \" ( )",
]

TINY_BUILDERS: dict[str, Callable] = {}


def tiny_builder(family: str):
    """Register a function `build(out_dir, **overrides) -> Path` for a family."""

    def deco(fn):
        TINY_BUILDERS[family] = fn
        return fn

    return deco


def make_tokenizer(
    image_token: str = "<image>",
    extra_special: tuple[str, ...] = (),
    vocab_size: int = 400,
    corpus: list[str] | None = None,
):
    """A byte-level BPE tokenizer with the chat markers and the image token as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", image_token, "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
                *extra_special]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus or CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": image_token},
        additional_special_tokens=specials[5:],
    )
    fast.chat_template = CHAT_TEMPLATE.replace("{{ IMAGE }}", image_token)
    return fast


def llama_text_config(vocab_size: int, **over) -> dict:
    """A small Llama text config as a dict (hidden 64, 2 layers, GQA 4/2 heads by default)."""
    cfg = dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    cfg.update(over)
    return cfg


def clip_vision_config(image_size: int = 56, patch_size: int = 14, **over) -> dict:
    """A small CLIP vision config as a dict."""
    cfg = dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    cfg.update(over)
    return cfg


@tiny_builder("llava")
def build_tiny_llava(
    out_dir: str | Path,
    image_size: int = 56,
    patch_size: int = 14,
    text: dict | None = None,
    vision: dict | None = None,
    do_pad: bool = False,
    seed: int = 0,
) -> Path:
    """A random LlavaForConditionalGeneration with processor, saved to `out_dir`."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessor,
        LlavaProcessor,
    )

    out = Path(out_dir)
    tok = make_tokenizer("<image>")
    config = LlavaConfig(
        text_config=llama_text_config(**{"vocab_size": len(tok), **(text or {})}),
        vision_config=clip_vision_config(image_size, patch_size, **(vision or {})),
        image_token_id=tok.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # do_pad: LLaVA-1.5's own "pad to square" preprocessing (LlavaImageProcessor), else CLIP's crop
    ip = (LlavaImageProcessor if do_pad else CLIPImageProcessor)(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        **({"do_pad": True} if do_pad else {}),
    )
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, as in llava-hf/llava-1.5-7b-hf
        chat_template=tok.chat_template,
    )
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def build_tiny(family: str, out_dir: str | Path, **over) -> Path:
    """Build and save a tiny checkpoint of `family` (one of TINY_BUILDERS)."""
    return TINY_BUILDERS[family](out_dir, **over)


# ---------------------------------------------------------------- LLaVA-NeXT / LLaVA-OneVision
# Tiles of 56 px with patch 14 give 4 x 4 tokens per crop. The pinpoints are the real models' sets
# scaled down (LLaVA-NeXT: 336 -> 56; OneVision: 384 -> 56, up to 3 x 3 tiles), so images of
# 20..300 px take 1 to 9 tiles and every unpad direction occurs.
NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
ONEVISION_PINPOINTS = [[56 * i, 56 * j] for i in (1, 2, 3) for j in (1, 2, 3)]


def siglip_vision_config(image_size: int = 56, patch_size: int = 14, **over) -> dict:
    """A small SigLIP vision config as a dict (no pooling head, as in LLaVA-OneVision)."""
    cfg = dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    cfg.update(over)
    return cfg


@tiny_builder("llava_next")
def build_tiny_llava_next(
    out_dir: str | Path,
    image_size: int = 56,
    patch_size: int = 14,
    image_grid_pinpoints: list | None = None,
    text: dict | None = None,
    vision: dict | None = None,
    seed: int = 0,
) -> Path:
    """A random LlavaNextForConditionalGeneration (CLIP tower, Llama LM) with processor, saved to `out_dir`."""
    import torch
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    out = Path(out_dir)
    pinpoints = image_grid_pinpoints or [[a * image_size // 56, b * image_size // 56] for a, b in NEXT_PINPOINTS]
    tok = make_tokenizer("<image>")
    config = LlavaNextConfig(
        text_config=llama_text_config(**{"vocab_size": len(tok), **(text or {})}),
        vision_config=clip_vision_config(image_size, patch_size, **(vision or {})),
        image_token_id=tok.image_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    ip = LlavaNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    proc = LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, as in llava-hf/llava-v1.6-*-hf
        chat_template=tok.chat_template,
    )
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


@tiny_builder("llava_onevision")
def build_tiny_llava_onevision(
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
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor

    from sightline.models.processors import image_only_processor_class

    out = Path(out_dir)
    pinpoints = image_grid_pinpoints or [[a * image_size // 56, b * image_size // 56] for a, b in ONEVISION_PINPOINTS]
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
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    ip = LlavaOnevisionImageProcessor(
        size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    proc = image_only_processor_class("LlavaOnevisionProcessor")(
        image_processor=ip,
        tokenizer=tok,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        chat_template=tok.chat_template,
    )
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------- Qwen2.5-VL / Qwen2-VL
QWEN_CHAT_TEMPLATE = (
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
QWEN_SPECIAL = ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>")


def _build_tiny_qwen(
    family: str,
    out_dir: str | Path,
    min_tokens: int = 4,
    max_tokens: int = 64,
    window_size: int = 56,
    text: dict | None = None,
    vision: dict | None = None,
    seed: int = 0,
) -> Path:
    """A random Qwen2.5-VL / Qwen2-VL with its processor (images only), saved to `out_dir`.

    Images become between `min_tokens` and `max_tokens` merged tokens (2x2 .. 8x8 by default).
    Qwen2.5-VL's windows are `window_size` px = 2x2 merged tokens, so windows split every grid
    larger than that; block 1 is a full-attention block, block 0 a window block.
    """
    import torch
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    from sightline.models.processors import image_only_processor_class

    out = Path(out_dir)
    tok = make_tokenizer("<|image_pad|>", extra_special=QWEN_SPECIAL)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
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
    text_cfg.update(text or {})
    if family == "qwen2_5_vl":
        vision_cfg = dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=window_size, fullatt_block_indexes=[1],
            out_hidden_size=text_cfg["hidden_size"],
        )
        config_cls, model_cls, proc_name = "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"
    else:
        vision_cfg = dict(
            depth=2, embed_dim=32, hidden_size=text_cfg["hidden_size"], mlp_ratio=2, num_heads=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2,
        )
        config_cls, model_cls, proc_name = "Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"
    vision_cfg.update(vision or {})
    config = getattr(transformers, config_cls)(
        text_config=text_cfg,
        vision_config=vision_cfg,
        image_token_id=tok.image_token_id,
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    side = 28  # patch * merge: one merged token
    ip = Qwen2VLImageProcessorPil(min_pixels=min_tokens * side * side, max_pixels=max_tokens * side * side)
    proc = image_only_processor_class(proc_name)(image_processor=ip, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


@tiny_builder("qwen2_5_vl")
def build_tiny_qwen2_5_vl(out_dir: str | Path, **over) -> Path:
    """A random Qwen2_5_VLForConditionalGeneration (window + full vision blocks), saved to `out_dir`."""
    return _build_tiny_qwen("qwen2_5_vl", out_dir, **over)


@tiny_builder("qwen2_vl")
def build_tiny_qwen2_vl(out_dir: str | Path, **over) -> Path:
    """A random Qwen2VLForConditionalGeneration, saved to `out_dir`."""
    return _build_tiny_qwen("qwen2_vl", out_dir, **over)

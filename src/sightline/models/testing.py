"""Tiny checkpoints of every supported family, built from config: `build_tiny(family, out_dir)` and shared helpers.

Each family's builder is its adapter's `build_tiny` classmethod (in the family file); this module
holds what they share: a locally trained tokenizer, small text and vision configs, the LLaVA
processor, and saving. Used by the tests (HF-equality, layout properties), the benchmarks (a ~60M
LLaVA) and the model organism. Nothing is downloaded: the tokenizer is a byte-level BPE trained in
milliseconds, the weights are random, and `save_pretrained` writes an ordinary Hugging Face folder.
"""

from __future__ import annotations

from pathlib import Path

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


def tiny_families() -> list[str]:
    """Families whose adapter can build a tiny checkpoint."""
    from sightline.models.base import Adapter, supported

    return [f for f, cls in supported().items() if cls.build_tiny.__func__ is not Adapter.build_tiny.__func__]


def build_tiny(family: str, out_dir: str | Path, **over) -> Path:
    """Build and save a tiny checkpoint of `family` (its adapter's `build_tiny`)."""
    from sightline.models.base import supported

    return supported()[family].build_tiny(out_dir, **over)


def save_tiny(adapter_cls, config, processor, out_dir: str | Path, seed: int = 0, randomize: tuple[str, ...] = ()) -> Path:
    """Instantiate `adapter_cls.hf_class` from `config` with seeded random weights; save it and `processor`.

    randomize: parameter names HF initialises to zeros (Gemma 3's projection) that get N(0, 1/fan_in) here,
    so that the image matters to the tiny model.
    """
    import torch
    import transformers

    out = Path(out_dir)
    torch.manual_seed(seed)
    model = getattr(transformers, adapter_cls.hf_class)(config).eval()
    with torch.no_grad():
        for name in randomize:
            p = model.get_parameter(name)
            p.normal_(0.0, p.shape[0] ** -0.5)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def make_tokenizer(
    image_token: str = "<image>",
    extra_special: tuple[str, ...] = (),
    vocab_size: int = 400,
    corpus: list[str] | None = None,
    named: dict[str, str] | None = None,
):
    """A byte-level BPE tokenizer with the chat markers and the image token as special tokens.

    named: more special tokens the processor reads by attribute (e.g. {"boi_token": "<start_of_image>"}).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    named = dict(named or {})
    specials = ["<pad>", "<s>", "</s>", "<unk>", image_token, "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
                *extra_special, *dict.fromkeys(t for t in named.values() if t not in extra_special and t != image_token)]
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
        extra_special_tokens={"image_token": image_token, **named},
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


def _small_vision_config(model_type: str, image_size: int, patch_size: int, **over) -> dict:
    cfg = dict(model_type=model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               image_size=image_size, patch_size=patch_size)
    cfg.update(over)
    return cfg


def clip_vision_config(image_size: int = 56, patch_size: int = 14, **over) -> dict:
    """A small CLIP vision config as a dict."""
    return _small_vision_config("clip_vision_model", image_size, patch_size, **{"projection_dim": 32, **over})


def siglip_vision_config(image_size: int = 56, patch_size: int = 14, **over) -> dict:
    """A small SigLIP vision config as a dict (no pooling head, as in LLaVA-OneVision)."""
    return _small_vision_config("siglip_vision_model", image_size, patch_size, **{"vision_use_head": False, **over})


def llava_config(config_class: str, tok, image_size: int = 56, patch_size: int = 14, text: dict | None = None,
                 vision: dict | None = None, **extra):
    """A LLaVA-style config (`config_class`: LlavaConfig, LlavaNextConfig) with a small CLIP tower and Llama LM."""
    import transformers

    return getattr(transformers, config_class)(
        text_config=llama_text_config(**{"vocab_size": len(tok), **(text or {})}),
        vision_config=clip_vision_config(image_size, patch_size, **(vision or {})),
        image_token_id=tok.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tok.pad_token_id,
        **extra,
    )


def llava_processor(tok, image_size: int, patch_size: int, do_pad: bool = False):
    """LLaVA-1.5's processor for `image_size`-px CLIP inputs (CLS kept by the tower, dropped by the strategy).

    do_pad: LLaVA-1.5's own "pad to square" preprocessing (LlavaImageProcessor), else CLIP's centre crop.
    """
    import transformers

    ip = getattr(transformers, "LlavaImageProcessor" if do_pad else "CLIPImageProcessor")(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        **({"do_pad": True} if do_pad else {}),
    )
    return transformers.LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, as in llava-hf/llava-1.5-7b-hf
        chat_template=tok.chat_template,
    )


def alternate_sliding_layers(text_cfg: dict, text: dict | None) -> None:
    """Unless `text` sets layer_types: sliding, global, sliding, ... over however many layers `text_cfg` has."""
    if "layer_types" not in (text or {}):
        text_cfg["layer_types"] = [("sliding_attention", "full_attention")[i % 2]
                                   for i in range(text_cfg["num_hidden_layers"])]

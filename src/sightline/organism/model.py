"""The model organism's architecture: a small LLaVA-1.5 (CLIP-style ViT, MLP projector, Llama LM).

It is an ordinary `LlavaForConditionalGeneration` with a locally trained tokenizer and a
`LlavaProcessor`, so it loads through the same adapter code as a real checkpoint. 112-px images in
14-px patches give an 8 x 8 grid of image tokens; the vision feature is the last layer's (no
layer is left unused).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

IMAGE_SIZE = 112
PATCH_SIZE = 14


@dataclass(frozen=True)
class OrganismArch:
    """Sizes of the organism's parts (defaults are the shipped model's)."""

    image_size: int = IMAGE_SIZE
    """image side in pixels"""
    patch_size: int = PATCH_SIZE
    """ViT patch side in pixels"""
    vision_hidden: int = 128
    """vision tower width"""
    vision_layers: int = 3
    """vision tower blocks"""
    vision_heads: int = 4
    """vision attention heads"""
    lm_hidden: int = 128
    """language model width"""
    lm_layers: int = 4
    """language model decoder blocks"""
    lm_heads: int = 4
    """language model attention heads"""
    lm_kv_heads: int = 2
    """language model KV heads (GQA)"""
    lm_intermediate: int = 384
    """language model MLP width"""
    vocab_size: int = 512
    """BPE vocabulary size asked for (the trained tokenizer may hold fewer)"""

    def to_dict(self) -> dict:
        return asdict(self)


def tokenizer_corpus(n_scenes: int = 400, seed: int = 12345) -> list[str]:
    """Questions and answers of the synthetic world, to train the organism's BPE on."""
    from sightline.data.synthetic import ANSWERS, questions, render_scene

    corpus = list(ANSWERS)
    for i in range(n_scenes):
        for q in questions(render_scene(seed + i)):
            corpus.append(q.question)
            corpus.append(q.answer)
    return corpus


def build_organism(arch: OrganismArch = OrganismArch(), seed: int = 0):
    """(model, processor) with random weights, ready to train."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from sightline.models.testing import llava_processor, make_tokenizer

    tok = make_tokenizer("<image>", vocab_size=arch.vocab_size, corpus=tokenizer_corpus())
    config = LlavaConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=len(tok),
            hidden_size=arch.lm_hidden,
            intermediate_size=arch.lm_intermediate,
            num_hidden_layers=arch.lm_layers,
            num_attention_heads=arch.lm_heads,
            num_key_value_heads=arch.lm_kv_heads,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.convert_tokens_to_ids("<|end|>"),
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=arch.vision_hidden,
            intermediate_size=4 * arch.vision_hidden,
            num_hidden_layers=arch.vision_layers,
            num_attention_heads=arch.vision_heads,
            image_size=arch.image_size,
            patch_size=arch.patch_size,
            projection_dim=arch.vision_hidden,
        ),
        image_token_id=tok.image_token_id,
        image_seq_length=(arch.image_size // arch.patch_size) ** 2,  # metadata only: LlavaProcessor counts patches
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    proc = llava_processor(tok, arch.image_size, arch.patch_size)
    return model, proc


def save_organism(model, processor, out: str | Path) -> Path:
    """Save as an ordinary HF folder (safetensors weights)."""
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    from sightline.report.files import set_file_modes

    set_file_modes(out)  # save_pretrained writes the weights 0600; the rest of the folder is 0644
    return out

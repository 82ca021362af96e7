"""The adapter contract: what sightline needs to know about one VLM family, and the shared code.

A family adapter is a small table of facts (which HF class; `modules`: where the decoder layers,
attention, MLP, vision tower and projector are, as attribute paths) plus `image_grids`, the one
function that truly differs: how the processor's output for one example becomes token grids on the
original image. Everything else (loading, prompts, batching, layouts) is shared here. Adapters are
found by importing every module of `sightline.models` (see `supported`): adding a family is adding
one file with a `@register`ed adapter and its `build_tiny` checkpoint builder.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from sightline.errors import UserError
from sightline.models.layout import TokenLayout, ViewGrid

if TYPE_CHECKING:
    from PIL import Image

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class ModuleNames:
    """Where a family's modules sit, as dotted attribute paths: the facts the site table resolves.

    Paths are relative to the object named in each comment. The defaults are HF's LLaVA layout
    (and Llama / Qwen2 language models); a family overrides only what differs.
    """

    decoder: str = "model.language_model"  # from the model: the language model's decoder
    layers: str = "layers"  # from the decoder: its blocks, in order
    attention: str = "self_attn"  # from a block: the attention module (gets `attention_mask`)
    # from a block: the recurrent / linear-attention mixer some blocks have INSTEAD of `attention`
    # (Qwen3.5's Gated DeltaNet): its output is `attn_out`; it has no KV cache and no attention mask
    linear_attention: str | None = None
    k_proj: str = "k_proj"  # from the attention module: keys before any norm and rotation
    k_norm: str | None = "k_norm"  # from the attention module: a norm on keys before RoPE, used where present
    k_norm_heads_first: bool = False  # the k-norm sees [B, n_kv, S, hd] (Gemma 3), not [B, S, n_kv, hd]
    v_proj: str = "v_proj"  # from the attention module: values (what the cache stores)
    mlp: str = "mlp"  # from a block: the MLP, whose output is `mlp_out`
    # from a block: the module whose output the block adds to the stream, where a norm follows the
    # attention / MLP inside the block (Gemma 2/3, GLM-4V); None: the attention module / the MLP itself
    attn_out: str | None = None
    mlp_out: str | None = None
    vision_tower: str = "model.vision_tower"  # from the model
    vision_blocks: str = "encoder.layers"  # from the vision tower: its transformer blocks, in order
    projector: str = "model.multi_modal_projector"  # from the model: vision features -> LM inputs


def module_at(root, path: str):
    """The submodule at a dotted attribute path (`encoder.layers`), None where a part is missing."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _module(root, path: str, what: str):
    obj = module_at(root, path)
    if obj is None:
        raise ValueError(f"{type(root).__name__} has no {what} at {path!r}; the adapter's `modules` table is wrong")
    return obj


@dataclass
class Batch:
    """Model inputs for a batch of (image, prompt) examples, with the facts sightline needs."""

    inputs: dict[str, Any]  # tensors for model(**inputs)
    texts: list[str]  # the exact text fed for each example (image placeholder unexpanded)
    layouts: list[TokenLayout]
    lengths: list[int]  # real (unpadded) length of each sequence; padding is on the right
    image_sizes_hw: list[list[tuple[int, int]]] = field(default_factory=list)  # original sizes per example

    def __len__(self) -> int:
        return len(self.texts)


class Adapter:
    """Base class of every family adapter. Subclasses fill the ClassVars and `image_grids`."""

    family: ClassVar[str] = ""
    architectures: ClassVar[tuple[str, ...]] = ()  # HF `config.architectures` names
    model_types: ClassVar[tuple[str, ...]] = ()  # HF `config.model_type` values
    hf_class: ClassVar[str] = ""  # transformers class used to load
    # HF processor class owning a video processor: loaded images-only (works without torchvision)
    processor_class: ClassVar[str] = ""
    modules: ClassVar[ModuleNames] = ModuleNames()  # where the modules sit (the site table's facts)
    # The decoder adds to the stream BETWEEN blocks (Qwen3-VL's deepstack adds vision features to
    # the image positions after its first blocks), so `resid.{L}` (0 < L < n_layers) is read at
    # block L's input, not at block L-1's output (which is what HF's `hidden_states[L]` holds).
    resid_at_block_input: ClassVar[bool] = False

    def __init__(self, model, processor, name: str = "", revision: str | None = None):
        self.model = model
        self.processor = processor
        self.name = name
        self.revision = revision
        self.tokenizer = getattr(processor, "tokenizer", processor)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load_processor(cls, path: str, revision: str | None = None, trust_remote_code: bool = False):
        """The family's processor: AutoProcessor, or the images-only `processor_class` where set."""
        if cls.processor_class:
            from sightline.models.processors import image_only_processor_class

            klass = image_only_processor_class(cls.processor_class)
            return klass.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: str = "float32",
        device: str | None = None,
        device_map: str | dict | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ) -> Adapter:
        """Load model and processor from a local folder or a hub id."""
        import torch
        import transformers

        klass = getattr(transformers, cls.hf_class)
        torch_dtype = getattr(torch, DTYPES[dtype])
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "revision": revision, "trust_remote_code": trust_remote_code}
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = klass.from_pretrained(path, **kwargs)
        if device_map is None and device is not None:
            model = model.to(device)
        model.eval()
        processor = cls.load_processor(path, revision=revision, trust_remote_code=trust_remote_code)
        return cls(model, processor, name=str(path), revision=revision)

    @classmethod
    def build_tiny(cls, out_dir: str | Path, **overrides) -> Path:
        """Build a tiny random checkpoint of this family from config and save it to `out_dir` (tests)."""
        raise NotImplementedError(f"no tiny checkpoint builder for {cls.family}")

    # ------------------------------------------------------------------ facts
    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def decoder(self):
        """The language model's decoder (holds the blocks and the final norm)."""
        return _module(self.model, self.modules.decoder, "decoder")

    @property
    def decoder_layers(self):
        return _module(self.decoder, self.modules.layers, "decoder layers")

    def attention(self, layer: int):
        """Attention module of decoder block `layer` (a UserError on a linear-attention block, which has none)."""
        block = self.decoder_layers[layer]
        if self.modules.linear_attention and module_at(block, self.modules.attention) is None:
            raise UserError(f"decoder layer {layer} is linear attention (no keys, values or attention mask); "
                            f"attention layers are {', '.join(map(str, self.kv_layers))}")
        return _module(block, self.modules.attention, "attention")

    @property
    def kv_layers(self) -> list[int]:
        """Decoder layers with softmax attention and a KV cache (all of them unless some are linear attention)."""
        if not self.modules.linear_attention:
            return list(range(self.n_layers))
        return [i for i, b in enumerate(self.decoder_layers) if module_at(b, self.modules.attention) is not None]

    def mlp(self, layer: int):
        """MLP of decoder block `layer`."""
        return _module(self.decoder_layers[layer], self.modules.mlp, "MLP")

    def attn_write(self, layer: int):
        """The module whose output is block `layer`'s attention write into the stream (`attn_out`)."""
        if self.modules.attn_out is None:
            if layer not in self.kv_layers:
                return _module(self.decoder_layers[layer], self.modules.linear_attention, "linear attention")
            return self.attention(layer)
        return _module(self.decoder_layers[layer], self.modules.attn_out, "attention output norm")

    def mlp_write(self, layer: int):
        """The module whose output is block `layer`'s MLP write into the stream (`mlp_out`)."""
        if self.modules.mlp_out is None:
            return self.mlp(layer)
        return _module(self.decoder_layers[layer], self.modules.mlp_out, "MLP output norm")

    def prerope_keys_module(self, layer: int):
        """The module whose output is block `layer`'s keys before RoPE: the k-norm where the LM has one."""
        attn = self.attention(layer)
        norm = module_at(attn, self.modules.k_norm) if self.modules.k_norm else None
        return norm if norm is not None else _module(attn, self.modules.k_proj, "k projection")

    def rotates_keys(self, layer: int) -> bool:
        """Whether block `layer` applies RoPE to its keys (Cohere 2's global layers do not: `keys` = `keys_prerope`)."""
        return True

    def prerope_keys_heads_first(self, layer: int) -> bool:
        """Whether `prerope_keys_module(layer)` outputs [B, n_kv, S, hd] rather than [B, S, n_kv * hd]."""
        return self.modules.k_norm_heads_first and self.prerope_keys_module(layer) is not _module(
            self.attention(layer), self.modules.k_proj, "k projection")

    @property
    def vision_tower(self):
        return _module(self.model, self.modules.vision_tower, "vision tower")

    @property
    def vision_layers(self):
        """The vision encoder's transformer blocks, in order."""
        tower = self.vision_tower
        tower = getattr(tower, "vision_model", tower)  # transformers 4.x nests the transformer one deeper
        return _module(tower, self.modules.vision_blocks, "vision blocks")

    @property
    def projector(self):
        """The module mapping vision features to language-model inputs."""
        return _module(self.model, self.modules.projector, "projector")

    @property
    def n_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def n_vision_layers(self) -> int:
        return len(self.vision_layers)

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vision_hidden_size(self) -> int:
        return self.config.vision_config.hidden_size

    @property
    def n_kv_heads(self) -> int:
        tc = self.text_config
        return getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads

    @property
    def n_heads(self) -> int:
        """Query heads per attention layer of the language model."""
        return self.text_config.num_attention_heads

    @property
    def head_dim(self) -> int:
        tc = self.text_config
        return getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads

    @property
    def image_token_id(self) -> int:
        cfg = self.config
        tid = getattr(cfg, "image_token_id", None)
        if tid is None:
            tid = getattr(cfg, "image_token_index")
        return int(tid)

    @property
    def image_token(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self.image_token_id)

    @property
    def prompt_image_token(self) -> str:
        """The image placeholder a prompt holds before the processor expands it (Gemma 3: `<start_of_image>`)."""
        return self.image_token

    @property
    def attn_implementation(self) -> str:
        """The language model's attention implementation ("sdpa", "eager", "flash_attention_2", ...)."""
        return str(self.attention(self.kv_layers[0]).config._attn_implementation)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def special_ids(self) -> set[int]:
        """Ids of special tokens (chat markers, bos/eos), the image placeholder excluded."""
        tok = self.tokenizer
        ids = set(tok.all_special_ids)
        ids |= {i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
        return ids - {self.image_token_id}

    @property
    def lead_tokens_per_image(self) -> int:
        """Image-placeholder tokens before each image's grids that map to no grid (e.g. a kept CLS)."""
        return 0

    @property
    def patches_per_token(self) -> int:
        """Vision patches one language token is made of (pixel shuffle / merge / pooling: k > 1).

        With k > 1, `ViewGrid.vision_index` is [rows, cols, k] and a `vision.{i}` capture holds each
        token's k patches [k, d_v] in the order the family documents (row-major inside the group).
        """
        return 1

    def vision_site_shape(self) -> tuple[int, ...]:
        """Per-token shape of a `vision.{i}` capture: [d_v], or [k, d_v] for tokens of k patches."""
        k = self.patches_per_token
        return (self.vision_hidden_size,) if k == 1 else (k, self.vision_hidden_size)

    def describe(self) -> dict:
        """JSON-able facts about the loaded model, for manifests and `inspect`."""
        return {
            "name": self.name,
            "revision": self.revision,
            "family": self.family,
            "architecture": type(self.model).__name__,
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "n_vision_layers": self.n_vision_layers,
            "vision_hidden_size": self.vision_hidden_size,
            "image_token_id": self.image_token_id,
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
        }

    # ------------------------------------------------------------------ prompts
    def render_prompt(self, prompt: str | None = "", prefix: str | None = None, raw: bool = False) -> str:
        """The exact text fed for one image and prompt, image placeholder unexpanded.

        Default: the model's own chat template on one user turn holding [prefix text], the image,
        then the prompt, with the generation prompt added (as `processor.apply_chat_template`).
        `raw=True` feeds `prompt` as is, adding the image placeholder at the start if it has none.
        """
        prompt = prompt or ""
        tok = self.prompt_image_token
        if raw:
            text = prompt if tok in prompt else f"{tok}\n{prompt}" if prompt else tok
            return (prefix or "") + text
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise UserError(
                f"model {self.name} has no chat template; pass a raw prompt (--raw-prompt) that contains {tok!r}"
            )
        content: list[dict] = []
        if prefix:
            content.append({"type": "text", "text": prefix})
        content.append({"type": "image"})
        if prompt:
            content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    # ------------------------------------------------------------------ inputs
    def processor_kwargs(self) -> dict:
        """Extra keyword arguments for the processor call (family-specific)."""
        return {}

    def processor_images(self, images: list[Image.Image]):
        """The images argument of the processor call, one image per example (nested where the processor wants it)."""
        return images

    def prepare(self, images: list[Image.Image], texts: list[str]) -> Batch:
        """Run the processor on one image per text and build every sequence's TokenLayout.

        Sequences are padded on the right, so real tokens keep positions 0..len-1 and, with causal
        attention, are computed exactly as they would be alone.
        """
        if len(images) != len(texts):
            raise ValueError("one image per text")
        tok = self.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "right"
        try:
            inputs = self.processor(
                images=self.processor_images(images), text=texts, return_tensors="pt", padding=True,
                padding_side="right",  # also over a processor's own default (InternVL pads on the left)
                **self.processor_kwargs()
            )
        finally:
            tok.padding_side = old_side
        # PaliGemma's processor adds training labels; a forward given them would compute a loss for nothing
        inputs.pop("labels", None)
        ids = inputs["input_ids"].numpy()
        mask = inputs["attention_mask"].numpy() if "attention_mask" in inputs else np.ones_like(ids)
        lengths = mask.sum(1).astype(int).tolist()
        special = self.special_ids
        layouts = []
        sizes = []
        for i, im in enumerate(images):
            hw = (im.height, im.width)
            grids = self.image_grids(inputs, i, [hw])
            layouts.append(
                TokenLayout.build(ids[i, : lengths[i]], self.image_token_id, grids, special, self.lead_tokens_per_image)
            )
            sizes.append([hw])
        return Batch(dict(inputs), list(texts), layouts, lengths, sizes)

    def image_grids(self, inputs, example: int, image_sizes_hw: list[tuple[int, int]]) -> list[list[ViewGrid]]:
        """Token grids of each image of one example, in sequence order (family-specific)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ vision features
    def vision_gather_index(self, batch: Batch, positions: list[np.ndarray]) -> np.ndarray:
        """Rows into the vision encoder's flattened hidden states [n_crops * seq, d] for each chosen
        position of each example (concatenated), -1 where the position has no vision patch.

        The default covers towers that run crop by crop ([n_crops, seq, d]) with crops of the batch
        concatenated in example order; `ViewGrid.vision_index` holds per-image indices.
        """
        k = self.patches_per_token
        shape = () if k == 1 else (k,)
        out = []
        offset = 0
        for layout, pos in zip(batch.layouts, positions):
            per_pos = np.full((len(layout), *shape), -1, np.int64)
            for g in layout.grids:
                if g.vision_index is None:
                    continue
                p = layout.grid_positions(g.image, g.view).reshape(-1)
                vi = g.vision_index.reshape(-1, *shape)
                per_pos[p] = np.where(vi >= 0, vi + offset, -1)
            out.append(per_pos[np.asarray(pos, dtype=np.int64)])
            offset += self.vision_rows(batch, layout)
        return np.concatenate(out) if out else np.zeros((0, *shape), np.int64)

    def vision_rows(self, batch: Batch, layout: TokenLayout) -> int:
        """Rows one example contributes to the flattened vision hidden states."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make an adapter findable by architecture and model_type."""
    _REGISTRY[cls.family] = cls
    return cls


def _load_families() -> None:
    """Import every module of `sightline.models`: each family file registers its adapters."""
    import sightline.models as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")


def supported() -> dict[str, type[Adapter]]:
    """family name -> adapter class."""
    _load_families()
    return dict(_REGISTRY)


def adapter_for_config(config) -> type[Adapter]:
    """The adapter class for an HF config; UserError listing the supported families otherwise."""
    return _adapter_for(list(getattr(config, "architectures", None) or []), getattr(config, "model_type", ""))


def _adapter_for(archs: list[str], mtype: str) -> type[Adapter]:
    fams = supported()
    for cls in fams.values():
        if any(a in cls.architectures for a in archs) or mtype in cls.model_types:
            return cls
    listing = ", ".join(f"{c.family} ({'/'.join(c.architectures)})" for c in fams.values())
    raise UserError(f"unsupported architecture {archs or mtype!r}; sightline supports: {listing}")


# What a local checkpoint folder needs, checked before any weights are read (one clear line each).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_folder(path: str | os.PathLike) -> Path:
    """A local checkpoint folder, checked for config, weights and processor files before loading.

    Raises UserError naming what is missing and the fix; returns the folder.
    """
    p = Path(path).expanduser()
    if p.is_file():
        raise UserError(f"--model {path} is a file; pass the checkpoint folder that holds it ({p.parent})")
    if not p.is_dir():
        raise UserError(f"model folder {path} does not exist; pass a local checkpoint folder or a hub id")
    names = {e.name for e in p.iterdir()}
    fix = "pass a complete Hugging Face checkpoint folder (save_pretrained of the model and its processor)"
    if "config.json" not in names:
        what = "is empty" if not names else "has no config.json"
        raise UserError(f"model folder {path} {what}; {fix}")
    try:  # the family first: an unsupported model says so, whatever else is missing
        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{p / 'config.json'} is not readable JSON ({_first_line(e)}); {fix}") from None
    if not isinstance(config, dict):
        raise UserError(f"{p / 'config.json'} is not a model config; {fix}")
    _adapter_for(list(config.get("architectures") or []), config.get("model_type", ""))
    if not any(n in names for n in WEIGHT_FILES) and not any(n.endswith((".safetensors", ".bin")) for n in names):
        raise UserError(f"model folder {path} has no weights (model.safetensors, pytorch_model.bin or a sharded "
                        f"index); {fix}")
    index = next((p / n for n in WEIGHT_FILES if n.endswith(".index.json") and n in names), None)
    if index is not None:
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            raise UserError(f"{index} is not a readable weights index; {fix}") from None
        missing = sorted(s for s in shards if s not in names)
        if missing:
            raise UserError(f"model folder {path} lacks weight shard {missing[0]}"
                            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "") + f"; {fix}")
    if not any(n in names for n in IMAGE_PROCESSOR_FILES) or not any(n in names for n in TOKENIZER_FILES):
        which = "image processor (preprocessor_config.json)" if not any(n in names for n in IMAGE_PROCESSOR_FILES) \
            else "tokenizer (tokenizer.json / tokenizer_config.json)"
        raise UserError(f"model folder {path} has no {which} files; copy them from the original checkpoint "
                        "(processor.save_pretrained) into the folder")
    return p


def looks_local(name_or_path: str) -> bool:
    """Whether a --model value means a local folder (a path, or something that exists) rather than a hub id."""
    return (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
            or os.path.exists(os.path.expanduser(name_or_path)))


@contextmanager
def quiet_loading(progress: bool) -> Iterator[None]:
    """Within the block, transformers' own progress bars (e.g. "Loading weights") are off unless `progress`."""
    if progress:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_model(
    name_or_path: str,
    dtype: str = "float32",
    device: str | None = None,
    device_map: str | dict | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> Adapter:
    """Load any supported VLM (local folder or hub id) wrapped in its family adapter.

    A local folder is checked first (`check_model_folder`), so a missing piece is one line, not a
    traceback after the weights have loaded. `progress=False` silences transformers' loading bar.
    """
    from transformers import AutoConfig

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of float32, float16, bfloat16")
    if looks_local(name_or_path):
        check_model_folder(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {name_or_path}: {_first_line(e)}") from None
    cls = adapter_for_config(config)
    try:
        with quiet_loading(progress):
            return cls.from_pretrained(
                name_or_path, dtype=dtype, device=device, device_map=device_map, revision=revision,
                trust_remote_code=trust_remote_code,
            )
    except OSError as e:  # a hub id whose files are missing or cannot be fetched (offline, no access)
        raise UserError(f"cannot load model {name_or_path}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

"""Representations on one axis: named per-token features of an image, all read in one forward.

A representation (`Rep`) is what a readout sees for each token of an image's grid:

    values.L      image VALUE tokens of layer L, every KV head concatenated  [n, n_kv_heads * head_dim]
    values.L.hH   one KV head h of them                                      [n, head_dim]
    keys.L        keys as cached (post-RoPE), heads concatenated; keys.L.hH one head
    resid.L       the residual stream entering block L                       [n, hidden_size]
    projector     what enters the language model at the image positions     [n, hidden_size]
    vision.i      the model's own vision tower, layer i, at the image tokens' patches
    encoder       an external vision encoder (`sightline.perception.encoder`), on its own grid

`Featurizer(adapter, reps, ...)(images, texts)` runs ONE forward per batch capturing every site
the reps need and returns per image an `ImageFeatures`: {rep: float32 [rows * cols, D]} in the
row-major order of the chosen view's grid (view 0 = the base view), the grid itself, and for text
tasks each rep's QUERY feature: the text (class name, referring expression) is placed in the prompt
after the image and its LAST token's value (key, residual) at the same layer and head is read; the
projector's query is that token's input embedding (= resid.0). With `query_alone` the text is run
through the language model on its own instead. `vision.i` and `encoder` have no text query.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sightline.errors import UserError

REP_KINDS = ("values", "keys", "resid", "projector", "vision", "encoder")
HEADED = ("values", "keys")
TEXT_QUERY_KINDS = ("values", "keys", "resid", "projector")  # reps that have a text query feature
_REP = re.compile(r"^(values|keys|resid|vision)\.(\d+)(?:\.h(\d+))?$")

# every live ImageFeatures (a weak set): lets a caller check that features are freed as a run streams
LIVE: weakref.WeakSet = weakref.WeakSet()


@dataclass(frozen=True)
class Rep:
    """One named representation: kind, layer (None for projector / encoder) and KV head (None: all)."""

    kind: str
    layer: int | None = None
    head: int | None = None

    @property
    def name(self) -> str:
        """`values.2.h1`, `keys.0`, `resid.3`, `projector`, `vision.1`, `encoder`."""
        if self.layer is None:
            return self.kind
        return f"{self.kind}.{self.layer}" + ("" if self.head is None else f".h{self.head}")

    @property
    def site(self) -> str | None:
        """The capture site it is read from (None for the external encoder)."""
        if self.kind == "encoder":
            return None
        return self.kind if self.layer is None else f"{self.kind}.{self.layer}"

    @property
    def has_text_query(self) -> bool:
        """Whether a text query feature exists for it (not for vision layers or the encoder)."""
        return self.kind in TEXT_QUERY_KINDS

    @classmethod
    def parse(cls, name: str) -> Rep:
        """A rep from its name (`values.2.h1`); UserError naming the forms otherwise."""
        name = name.strip()
        if name in ("projector", "encoder"):
            return cls(name)
        m = _REP.match(name)
        if not m or (m.group(3) is not None and m.group(1) not in HEADED):
            raise UserError(f"unknown representation {name!r}; use values, keys, resid, projector, vision, encoder "
                            "or exact names like values.2, values.2.h1, keys.0.h0, resid.3, vision.1")
        return cls(m.group(1), int(m.group(2)), None if m.group(3) is None else int(m.group(3)))

    def sort_key(self) -> tuple:
        """Kinds in REP_KINDS order, then layer, then the concatenated heads before each head."""
        return (REP_KINDS.index(self.kind), -1 if self.layer is None else self.layer,
                -1 if self.head is None else self.head)


def _int_list(spec: str, what: str, n: int) -> list[int]:
    from sightline.capture import parse_layers

    return parse_layers(spec, n, what)


def parse_reps(reps: Sequence[str], layers: str, heads: str, *, n_layers: int, n_kv_heads: int,
               n_vision_layers: int, kv_layers: Sequence[int] | None = None, vision_layers: str = "all",
               encoder: bool = False) -> list[Rep]:
    """Expand `--reps` with `--layers` / `--heads` / `--vision-layers` into exact, validated reps.

    A bare kind takes every chosen layer: values/keys layers 0..n_layers-1 (those with a KV cache),
    resid 0..n_layers (n_layers = the last block's output), vision 0..n_vision_layers. `heads`: `all`
    (the concatenation and every KV head), `concat` (the concatenation only), `each` (every head, no
    concatenation) or a list `0,1` (the concatenation and those heads). An exact name is kept as is.
    `encoder` says whether an external encoder is available. One UserError line for anything wrong.
    """
    items = [r.strip() for r in reps for r in str(r).split(",") if r.strip()]
    if not items:
        raise UserError("no representations given; e.g. --reps values,keys,resid,projector")
    kv = list(range(n_layers)) if kv_layers is None else list(kv_layers)
    h = str(heads).strip().lower()
    if h in ("all", ""):
        head_set: list[int | None] = [None, *range(n_kv_heads)]
    elif h in ("concat", "none"):
        head_set = [None]
    elif h == "each":
        head_set = list(range(n_kv_heads))
    else:
        head_set = [None, *_int_list(heads, "KV head", n_kv_heads)]
    out: list[Rep] = []
    for item in items:
        if item in ("projector", "encoder"):
            if item == "encoder" and not encoder:
                raise UserError("representation 'encoder' needs an external encoder: pass --encoder PATH "
                                "(a CLIP/SigLIP vision checkpoint folder)")
            out.append(Rep(item))
        elif item in ("values", "keys"):
            chosen = [L for L in _int_list(layers, f"{item} layer", n_layers + 1) if L < n_layers and L in kv]
            if not chosen:
                raise UserError(f"no {item} in --layers {layers}: layers with keys and values are "
                                f"{', '.join(map(str, kv))}")
            out.extend(Rep(item, L, hh) for L in chosen for hh in head_set)
        elif item == "resid":
            out.extend(Rep("resid", L) for L in _int_list(layers, "resid layer", n_layers + 1))
        elif item == "vision":
            out.extend(Rep("vision", L) for L in _int_list(vision_layers, "vision layer", n_vision_layers + 1))
        else:
            rep = Rep.parse(item)
            limit = {"values": n_layers, "keys": n_layers, "resid": n_layers + 1,
                     "vision": n_vision_layers + 1}[rep.kind]
            if not 0 <= rep.layer < limit:
                raise UserError(f"representation {rep.name} out of range: {rep.kind} layers are 0..{limit - 1}")
            if rep.kind in HEADED and rep.layer not in kv:
                raise UserError(f"representation {rep.name} does not exist: layer {rep.layer} has no keys or values")
            if rep.head is not None and not 0 <= rep.head < n_kv_heads:
                raise UserError(f"representation {rep.name} out of range: KV heads are 0..{n_kv_heads - 1}")
            out.append(rep)
    return sorted(dict.fromkeys(out), key=Rep.sort_key)


class _GridLayout:
    """The one grid of an external encoder's features, with TokenLayout's `grid()` (for mask_to_tokens)."""

    def __init__(self, grid):
        self.grids = [grid]

    def grid(self, image: int = 0, view: int = 0):
        """The grid (whatever image / view is asked: there is one)."""
        return self.grids[0]


@dataclass(eq=False)
class ImageFeatures:
    """One image's features: per rep [rows * cols, D] float32 (row-major over `grid`), the queries.

    `grid` / `layout` are the model's grid of the chosen view and the sequence's TokenLayout;
    `encoder_grid` is the external encoder's own grid (None without one). `layout_of(rep)` gives the
    layout to move masks onto that rep's tokens and back (`mask_to_tokens`, `tokens_to_pixels`).
    """

    feats: dict[str, torch.Tensor]
    grid: Any  # ViewGrid
    layout: Any  # TokenLayout
    view: int = 0
    image: int = 0  # the image's index inside its own sequence (always 0: one image per sequence)
    query: dict[str, torch.Tensor] = field(default_factory=dict)  # rep -> [D] (text tasks)
    encoder_grid: Any = None

    def __post_init__(self):
        LIVE.add(self)

    def grid_of(self, rep: str):
        """The ViewGrid a rep's rows follow."""
        return self.encoder_grid if rep == "encoder" else self.grid

    def layout_of(self, rep: str):
        """A layout whose `grid(0, view)` is that rep's grid."""
        return _GridLayout(self.encoder_grid) if rep == "encoder" else self.layout


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


class Featurizer:
    """Per-image features of every rep, from one forward per batch (see the module docstring).

    `prompt` is the text after the image for image-only tasks (default: the image alone);
    `query_prompt` places a task's text after the image (`{text}` is replaced by it); `prefix` is
    text before the image (a call's `prefixes` give each image its own instead). `encoder`: a loaded `sightline.perception.encoder.Encoder` (for the
    `encoder` rep). `dtype`: the features' dtype (float32).
    """

    def __init__(self, adapter, reps: Sequence[Rep], *, encoder=None, prompt: str = "", query_prompt: str = "{text}",
                 prefix: str | None = None, view: int = 0, query_alone: bool = False, batch_size: int = 8):
        if "{text}" not in query_prompt:
            raise UserError(f"--query-prompt {query_prompt!r} must contain {{text}} (where the class name or "
                            "expression goes)")
        self.adapter = adapter
        self.reps = list(reps)
        self.encoder = encoder
        self.prompt = prompt or ""
        self.query_prompt = query_prompt
        self.prefix = prefix or None
        self.view = view
        self.query_alone = query_alone
        self.batch_size = max(1, int(batch_size))
        if any(r.kind == "encoder" for r in self.reps) and encoder is None:
            raise UserError("representation 'encoder' needs an external encoder: pass --encoder PATH")
        self.sites = sorted({r.site for r in self.reps if r.site is not None})
        self.text_sites = sorted({r.site for r in self.reps if r.has_text_query})
        self.n_forwards = 0  # forward passes run (images + text-alone queries)

    def __call__(self, images: Sequence, texts: Sequence[str] | None = None,
                 prefixes: Sequence[str | None] | None = None) -> list[ImageFeatures]:
        """Features of `images` (PIL), with each one's query text (`texts`, None: no query) and text before the
        image (`prefixes`, None: the featurizer's `prefix` for all; an empty or None item: no prefix)."""
        if prefixes is not None and len(prefixes) != len(images):
            raise ValueError(f"{len(prefixes)} prefixes for {len(images)} images")
        out: list[ImageFeatures] = []
        for start in range(0, len(images), self.batch_size):
            chunk = list(images[start:start + self.batch_size])
            tchunk = None if texts is None else list(texts[start:start + self.batch_size])
            pchunk = None if prefixes is None else list(prefixes[start:start + self.batch_size])
            out.extend(self._batch(chunk, tchunk, pchunk))
        return out

    # ------------------------------------------------------------------------------------------
    def _render(self, text: str | None, prefix: str | None) -> tuple[str, str | None]:
        """(the full prompt text, the prompt text up to the end of the query; None without a query)."""
        ad = self.adapter
        if text is None or self.query_alone:
            return ad.render_prompt(self.prompt, prefix=prefix), None
        content = self.query_prompt.replace("{text}", text)
        end_in_content = self.query_prompt.index("{text}") + len(text)
        rendered = ad.render_prompt(content, prefix=prefix)
        at = rendered.rfind(content)
        if at < 0:  # a template that rewrites the text: fall back on the text itself
            at, end_in_content = rendered.rfind(text), len(text)
            if at < 0:
                raise UserError(f"the model's chat template does not keep the query text {text!r} as is")
        return rendered, rendered[: at + end_in_content]

    def _query_position(self, ids: np.ndarray, length: int, full: str, head: str) -> int:
        """Sequence position of the query's last token: count the tokens of the prompt up to it, shifted by
        what the processor adds (the image placeholder's expansion, a BOS)."""
        tok = self.adapter.tokenizer
        n_full = len(tok(full, add_special_tokens=False)["input_ids"])
        head_ids = tok(head, add_special_tokens=False)["input_ids"]
        pos = len(head_ids) - 1 + (length - n_full)
        if 0 <= pos < length and int(ids[pos]) == int(head_ids[-1]):
            return pos
        hits = np.flatnonzero(ids[:length] == head_ids[-1])
        if not len(hits):
            raise RuntimeError(f"cannot find the query's last token in the sequence of {full!r}")
        return int(hits[-1])

    def _batch(self, images: list, texts: list[str] | None, prefixes: list[str | None] | None = None
               ) -> list[ImageFeatures]:
        from sightline.capture import Capture

        ad = self.adapter
        # an empty prefix is no prefix: the same text, hence the same features bit for bit
        pre = [self.prefix] * len(images) if prefixes is None else [p or None for p in prefixes]
        rendered = [self._render(None if texts is None else texts[i], pre[i]) for i in range(len(images))]
        feats: list[dict[str, torch.Tensor]] = [{} for _ in images]
        queries: list[dict[str, torch.Tensor]] = [{} for _ in images]
        layouts, grids = [None] * len(images), [None] * len(images)
        if self.sites:
            batch = ad.prepare(images, [r[0] for r in rendered])
            ids = batch.inputs["input_ids"].numpy()
            positions, n_grid, qpos = [], [], []
            for i, layout in enumerate(batch.layouts):
                try:
                    g = layout.grid(0, self.view)
                except KeyError:
                    raise UserError(f"--view {self.view}: this model gives image {i} no view {self.view}; "
                                    f"its views are {sorted({gg.view for gg in layout.grids})}") from None
                layouts[i], grids[i] = layout, g
                p = layout.grid_positions(0, self.view).reshape(-1)
                q = []
                if rendered[i][1] is not None:
                    q = [self._query_position(ids[i], batch.lengths[i], rendered[i][0], rendered[i][1])]
                positions.append(np.concatenate([p, np.asarray(q, dtype=np.int64)]).astype(np.int64))
                n_grid.append(len(p))
                qpos.append(bool(q))
            got = Capture(ad, self.sites, dtype=torch.float32).run(batch, positions)
            self.n_forwards += 1
            for i, sites in enumerate(got):
                for rep in self.reps:
                    if rep.site is None:
                        continue
                    t = sites[rep.site]
                    feats[i][rep.name] = self._select(rep, t[: n_grid[i]])
                    if qpos[i] and rep.has_text_query:
                        queries[i][rep.name] = self._select(rep, t[n_grid[i]:])[0]
            del got
        if texts is not None and self.query_alone and self.text_sites:
            for i, q in enumerate(self._text_alone(texts)):
                for rep in self.reps:
                    if rep.has_text_query:
                        queries[i][rep.name] = self._select(rep, q[rep.site])[0]
        enc_grids = [None] * len(images)
        if any(r.kind == "encoder" for r in self.reps):
            for i, (f, g) in enumerate(self.encoder.features(images)):
                feats[i]["encoder"] = _flat(torch.as_tensor(f)).float()
                enc_grids[i] = g
        return [ImageFeatures(feats[i], grids[i], layouts[i], self.view, 0, queries[i], enc_grids[i])
                for i in range(len(images))]

    def _select(self, rep: Rep, t: torch.Tensor) -> torch.Tensor:
        """A site's captured rows [n, ...] as the rep's features [n, D] (one head, or all flattened)."""
        if rep.head is not None:
            t = t[:, rep.head]
        t = _flat(t).float()
        if torch.isnan(t).any():  # vision rows of tokens without one patch: zero, not NaN
            t = torch.nan_to_num(t)
        return t.contiguous()

    def _text_alone(self, texts: list[str]) -> list[dict[str, torch.Tensor]]:
        """Each query text run through the language model alone (its chat template, no image): the site
        values at its last token."""
        from sightline.capture import Capture
        from sightline.models import Batch

        ad = self.adapter
        tok = ad.tokenizer
        fulls, heads = [], []
        for t in texts:
            content = self.query_prompt.replace("{text}", t)
            template = getattr(ad.processor, "chat_template", None) or getattr(tok, "chat_template", None)
            full = content
            if template:
                full = ad.processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "text", "text": content}]}],
                    add_generation_prompt=True, tokenize=False)
            at = full.rfind(content)
            fulls.append(full)
            heads.append(full[: at + self.query_prompt.index("{text}") + len(t)])
        old = tok.padding_side
        tok.padding_side = "right"
        try:
            enc = tok(fulls, return_tensors="pt", padding=True)
        finally:
            tok.padding_side = old
        lengths = enc["attention_mask"].sum(1).tolist()
        ids = enc["input_ids"].numpy()
        pos = [np.asarray([self._query_position(ids[i], lengths[i], fulls[i], heads[i])]) for i in range(len(texts))]
        batch = Batch(dict(enc), fulls, [], lengths)
        got = Capture(ad, self.text_sites, dtype=torch.float32).run(batch, pos)
        self.n_forwards += 1
        return got


def random_weights_like(adapter, seed: int = 0):
    """The same architecture with random weights (built from the model's config, `seed`), wrapped in the same
    adapter class with the same processor: the control every readout is scored on as well."""
    import transformers

    cfg = adapter.model.config
    param = next(adapter.model.parameters())
    devices = {p.device for p in adapter.model.parameters()}
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = getattr(transformers, type(adapter).hf_class)(cfg)
    finally:
        torch.random.set_rng_state(state)
    model = model.to(dtype=param.dtype, device=param.device if len(devices) == 1 else "cpu").eval()
    return type(adapter)(model, adapter.processor, name=f"{adapter.name} (random weights, seed {seed})",
                         revision=adapter.revision)


def parameter_count(adapter) -> int:
    """Parameters of the loaded model."""
    return int(sum(p.numel() for p in adapter.model.parameters()))

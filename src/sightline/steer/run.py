"""The steering job: sweep source->target pairs x layers x scales k over a dataset and write what changed.

`run_steering(SteerConfig(...))` loads the model, the directions (see `sightline.steer.vectors` for
the format) and an image dataset (ImageNet layout: one subfolder per class; the images of each
source class are steered), and for every (source, target, layer, k) measures efficacy, the flip rate
of the free answer, the damage, and (with `judge`, the default) the judged swaps: each free answer judged by
the unsteered model as a four-way choice and scored for coherence (see `sightline.steer.measure`). It
writes into `out`:

    config.json          the config it ran with
    results.json         every number: per pair, per layer, per k; a summary with the best (layer, k)
    generations.jsonl    every free and damage answer, one JSON line each (clean ones have site null)
    figures/steer_resid.L.png    efficacy and damage against k at that layer
    figures/steer_overview.png   flip rate and efficacy against k, one line per layer
    figures/steer_judged.png     judged-target/-source rates and coherence of the free answers against k
    index.html           what the run found, and the figures

The folder is written under OUT.partial and renamed when complete: never half-written (docs/outputs.md).

Prompts (each may contain {src} and {tgt}, the two class words):
- efficacy_prompt: the paper's forced choice, `Reply either "{src}" or "{tgt}" in lowercase
  depending on what is shown in the image. Do not output any other text.`, metric `prob`.
- open_prompt: "What is shown in this image?" (the paper's first open prompt).
- caption_prompt: "Describe this image in detail."; the caption scored is the dataset's (a jsonl
  `caption` field) or else the clean model's own greedy answer to this prompt.
- damage questions: a jsonl `questions` field, [{"question": ..., "answer": ...}, ...].
On a dataset exported by `sightline.data.synthetic` (a `world.json` beside it, e.g. from
`export_imagefolder(..., attribute="shape")`), the defaults become the world's own questions, which
the model organism answers: efficacy and the free answer use the world's question about the folder
attribute ("What shape is shown?"; efficacy metric `share`, the target's share of probability among
the two class words' first tokens, since the organism was never taught the forced-choice prompt),
damage asks the world's questions about the other attributes (steering shape: "What colour is the
<shape>?"), and the caption is the world's ("Describe the image." -> "a small red star").
The world's question forms are also used on a plain image folder whose classes are the world's shapes,
colours or sizes when the model is the shipped organism or the directions come from a store of the
synthetic world (the paper's prompts are out of the organism's language: it answers them "zero"):
"What shape is shown?", or "What colour is the <shape>?" with the shape the clean model names; the
caption is the clean model's own answer to "Describe the image.", and there are no damage questions.

The best (layer, k): among the steered points (k != 0) whose damage is acceptable (damage accuracy at
most `max_damage_drop` below the clean one where there are damage questions; without them, caption NLL over
the words other than the class words at most `max_caption_nll_increase` nats/token above it), the highest flip rate (the highest efficacy when nothing flips), ties to the smaller k; None,
with the reason in `best_note`, when no point qualifies.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sightline.config import ConfigIO, to_dict
from sightline.errors import UserError
from sightline.report.files import RunFolder, RunResult, check_output, dumps, write_json

PAPER_SCALES: tuple[float, ...] = tuple(round(float(k), 4) for k in np.linspace(0, 30, 20))
PAPER_EFFICACY_PROMPT = ('Reply either "{src}" or "{tgt}" in lowercase depending on what is shown in the image. '
                         'Do not output any other text.')
PAPER_OPEN_PROMPT = "What is shown in this image?"
PAPER_CAPTION_PROMPT = "Describe this image in detail."
WORLD_CAPTION_PROMPT = "Describe the image."
EFFICACY_METRICS = ("prob", "share")


def parse_scales(spec: str | None) -> tuple[float, ...]:
    """`--scales`: "0,2,4.5" (a list), "0:30:20" (numpy linspace(0, 30, 20)), or None/"" (the paper's)."""
    if spec is None or not str(spec).strip():
        return PAPER_SCALES
    text = str(spec).strip()
    try:
        if ":" in text:
            lo, hi, num = text.split(":")
            if int(num) < 1:
                raise ValueError
            return tuple(round(float(k), 6) for k in np.linspace(float(lo), float(hi), int(num)))
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--scales {spec!r}: give numbers like 0,2,4,8 or start:stop:count like 0:30:20") from None


def parse_pairs(spec: str | None) -> tuple[str, ...]:
    """`--pairs`: "hay:pizza,cat:dog" -> ("hay:pizza", "cat:dog"); empty: () (each class to the next)."""
    return tuple(p.strip() for p in str(spec or "").split(",") if p.strip())


@dataclass(frozen=True)
class SteerConfig(ConfigIO):
    """Everything a steering run depends on (saved as OUT/config.json). Prompts left None take the
    paper's defaults, or the synthetic world's questions on a synthetic dataset (module docstring)."""

    model: str
    """Model folder or Hugging Face id (the directions must come from this model)."""
    directions: str
    """Directions .safetensors, a folder holding one (a probe run), or an ActivationStore folder."""
    data: str
    """Image folder with class subfolders, or a .jsonl manifest whose examples carry a class."""
    out: str = "steer"
    """Output folder (config.json, results.json, figures/, index.html, generations.jsonl)."""
    pairs: tuple[str, ...] = field(default=(), metadata={"parse": parse_pairs})
    """source:target class pairs, comma-separated; empty: each class to the next (sorted, wrapping)."""
    layers: str = "auto"
    """resid layers to steer: auto (every layer the directions hold), all, 0,4,8 or 4-12."""
    scales: tuple[float, ...] = field(default=PAPER_SCALES, metadata={"parse": parse_scales})
    """Values of k: a list 0,2,4 or start:stop:count (default 0:30:20, the paper's, with unit vectors)."""
    normalize: str = "unit"
    """Vector scale: unit (paper), resid (k=1 = the mean image-token residual norm) or none."""
    positions: str = "image"
    """Where k*v is added in the prompt: image, text, all or last."""
    mode: str = "prefill"
    """prefill (paper: edit the prefill, decode from the edited cache) or every_step."""
    images_per_class: int = 20
    """Source images steered per pair (the first ones in dataset order)."""
    efficacy_prompt: str | None = None
    """Forced-choice prompt with {src} and {tgt}; None: the paper's (or the world's question)."""
    efficacy_metric: str | None = None
    """prob (paper) or share; None: prob, or share on synthetic data."""
    open_prompt: str | None = None
    """Free-answer question; None: 'What is shown in this image?' (or the world's question)."""
    caption_prompt: str | None = None
    """Prompt whose caption NLL measures damage; None: the paper's (or the world's)."""
    damage_qtypes: tuple[str, ...] = ()
    """Synthetic data: question types asked for damage; empty: the world's rule (the other attributes)."""
    max_damage_drop: float = 0.1
    """The best (layer, k) may lower the damage questions' accuracy by at most this much (absolute, from the
    clean accuracy)."""
    max_caption_nll_increase: float = 1.0
    """Where there are no damage questions, the best (layer, k) may raise the caption NLL by at most this many nats
    per token, counted over the caption's tokens other than the class words (`caption_nll_increase_other`: renaming the object is the intended effect,
    not damage; the full caption's increase is reported beside it as `caption_nll_increase`)."""
    class_words: str | None = None
    """JSON file {class folder: word used in prompts}; default: the folder name with _ as space."""
    label: str = "label"
    """Store field (dotted path) holding the class, when the directions come from a store."""
    data_label: str = "label"
    """Dataset field (dotted path into the JSONL fields) holding each image's class."""
    judge: bool = True
    """Judge every free answer as a four-way choice (source, target, two distractor classes) by the unsteered model
    and score its coherence (NLL per token under the unsteered model); --no-judge skips both."""
    judge_prompt: str | None = None
    """The judge's prompt, with {answer} (the free answer), optionally {question} (its prompt) and {options} (the
    four classes as "A. word" lines, read as letters; without it the choice is read over the class words); None:
    the default (sightline.steer.measure.JUDGE_PROMPT), or '{answer} {question}' on the synthetic world."""
    judge_seed: int = 0
    """Seed of each item's two distractor classes and of the order of its options."""
    max_new_tokens: int = 24
    """Tokens generated per answer at most."""
    batch_size: int = 16
    """Prompts per forward."""
    model_dtype: str = "auto"
    """auto (bfloat16 on GPU, float32 on CPU), float32, float16 or bfloat16."""
    device: str = "auto"
    """auto (CUDA if available), cpu, cuda:0."""
    device_map: str | None = None
    """accelerate device map (e.g. auto) for a model larger than one GPU; overrides --device."""
    revision: str | None = None
    """Model revision on the Hub."""
    trust_remote_code: bool = False
    """Allow the model's own code from the Hub."""
    overwrite: bool = False
    """Replace an existing output folder."""
    progress: bool = True
    """Show progress bars."""



@dataclass
class Item:
    """One steered image and what is asked about it."""

    image: Any
    path: str
    label: str
    open_prompt: str | None = None  # per-image open question (synthetic data), else the config's
    questions: list[tuple[str, str]] = field(default_factory=list)  # (question, answer) for damage
    caption: str | None = None


HEADLINE_KEYS = ("pairs", "sites", "scales", "images_per_pair", "best_site", "best_scale", "flip_rate", "efficacy",
                 "damage_accuracy", "caption_nll_increase", "judged_target_rate", "coherence", "clean_flip_rate",
                 "clean_efficacy", "clean_damage_accuracy", "clean_judged_target_rate", "clean_coherence",
                 "efficacy_metric", "normalize", "seconds", "best_note", "chance", "warnings")


def headline(result) -> dict:
    """The few numbers of a run worth a summary line (the best (layer, k) and the clean baseline), from a
    run's RunResult, its results.json, or its summary."""
    s = getattr(result, "summary", None)
    if s is None:
        s = result.get("summary", result)
    if "best_site" not in s:  # a results dict from before the summary carried the headline
        s = _headline_of(result)
    return {k: s.get(k) for k in HEADLINE_KEYS}


def _headline_of(result: dict) -> dict:
    s = result["summary"]
    best = s.get("best") or {}
    return {
        "pairs": [f"{p['source']}:{p['target']}" for p in result["pairs"]],
        "sites": list(s["per_layer"]),
        "scales": list(next(iter(s["per_layer"].values()))["scales"]) if s["per_layer"] else [],
        "images_per_pair": [p["n_images"] for p in result["pairs"]],
        "best_site": best.get("site"),
        "best_scale": best.get("scale"),
        "flip_rate": best.get("flip_rate"),
        "efficacy": best.get("efficacy"),
        "damage_accuracy": best.get("damage_accuracy"),
        "caption_nll_increase": best.get("caption_nll_increase"),
        "judged_target_rate": best.get("judged_target_rate"),
        "coherence": best.get("coherence"),
        "clean_flip_rate": s["clean"]["flip_rate"],
        "clean_efficacy": s["clean"]["efficacy"],
        "clean_damage_accuracy": s["clean"]["damage_accuracy"],
        "clean_judged_target_rate": s["clean"].get("judged_target_rate"),
        "clean_coherence": s["clean"].get("coherence"),
        "efficacy_metric": result.get("efficacy_metric"),
        "normalize": result.get("normalize"),
        "seconds": result.get("seconds"),
        "best_note": s.get("best_note"),
        # efficacy "share" is the target's share of two words: 0.5 is a coin; flips have the clean rate instead
        "chance": {"efficacy": 0.5 if result.get("efficacy_metric") == "share" else None,
                   "flip_rate": s["clean"]["flip_rate"]},
        "warnings": list(result.get("warnings") or []),
    }


# ------------------------------------------------------------------------------------------ inputs
def _label_of(ex, spec: str) -> str | None:
    from sightline.steer.vectors import lookup

    value = lookup(ex.to_json(), spec)
    return None if value is None else str(value)


def _items(dataset, ids: list[int], labels: list[str | None], world, attribute: str,
           damage_qtypes: tuple[str, ...]) -> list[Item]:
    from sightline.data import load_image

    out = []
    for i in ids:
        ex = dataset[i]
        item = Item(load_image(ex.path), ex.path, str(labels[i]))
        meta = ex.meta or {}
        if world is not None:
            from sightline.data.synthetic import caption, questions

            scene_i = meta.get("scene")
            if scene_i is None:
                try:
                    scene_i = int(Path(ex.path).stem)
                except ValueError:
                    raise UserError(f"cannot tell which synthetic scene {ex.path} is (no 'scene' field and the "
                                    "file name is not a scene number)") from None
            scene = world.scene(int(scene_i))
            qs = questions(scene, (attribute, *damage_qtypes))
            own = [q for q in qs if q.qtype == attribute]
            if own:
                item.open_prompt = own[0].question
            item.questions = [(q.question, q.answer) for q in qs if q.qtype in damage_qtypes]
            item.caption = caption(scene)
        if isinstance(meta.get("questions"), list):
            item.questions = [(str(q["question"]), str(q["answer"])) for q in meta["questions"]]
        if isinstance(meta.get("caption"), str):
            item.caption = meta["caption"]
        out.append(item)
    return out


def _pairs(cfg: SteerConfig, classes: list[str]) -> list[tuple[str, str]]:
    if not cfg.pairs:
        if len(classes) < 2:
            raise UserError(f"dataset {cfg.data} has {len(classes)} class(es); steering needs two or more")
        return [(classes[i], classes[(i + 1) % len(classes)]) for i in range(len(classes))]
    out = []
    for p in cfg.pairs:
        src, sep, tgt = p.partition(":")
        if not sep or not src or not tgt or src == tgt:
            raise UserError(f"pair {p!r} must look like source:target with two different classes, e.g. circle:star")
        for c in (src, tgt):
            if c not in classes:
                raise UserError(f"class {c!r} of pair {p} is not in dataset {cfg.data}; classes: {', '.join(classes)}")
        out.append((src, tgt))
    return out


def _check(cfg: SteerConfig) -> None:
    from sightline.steer.generate import MODES, POSITION_CHOICES
    from sightline.steer.vectors import NORMALIZATIONS

    if cfg.normalize not in NORMALIZATIONS:
        raise UserError(f"--normalize must be one of {', '.join(NORMALIZATIONS)}, not {cfg.normalize!r}")
    if cfg.mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, not {cfg.mode!r}")
    if cfg.positions not in POSITION_CHOICES:
        raise UserError(f"--positions must be one of {', '.join(POSITION_CHOICES)}, not {cfg.positions!r}")
    if cfg.efficacy_metric is not None and cfg.efficacy_metric not in EFFICACY_METRICS:
        raise UserError(f"--efficacy-metric must be prob or share, not {cfg.efficacy_metric!r}")
    if not cfg.scales or not all(np.isfinite(cfg.scales)):
        raise UserError("--scales needs one or more finite numbers, e.g. 0,2,4,8")
    if cfg.images_per_class < 1 or cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        raise UserError("--images-per-class, --batch-size and --max-new-tokens must be at least 1")
    if cfg.judge_prompt is not None:
        from sightline.steer.measure import JUDGE_FIELDS

        try:
            cfg.judge_prompt.format(**{k: "x" for k in JUDGE_FIELDS})
        except (KeyError, IndexError, ValueError):
            raise UserError(f"--judge-prompt {cfg.judge_prompt!r} may use only {{answer}}, {{question}} and "
                            "{options} as fields (write {{ and }} for braces)") from None
        if "{answer}" not in cfg.judge_prompt:
            raise UserError(f"--judge-prompt {cfg.judge_prompt!r} must show the answer it judges: put {{answer}} in it")
    for name in ("efficacy_prompt", "open_prompt", "caption_prompt"):
        text = getattr(cfg, name)
        if text is not None:
            try:
                text.format(src="a", tgt="b")
            except (KeyError, IndexError, ValueError):
                raise UserError(f"--{name.replace('_', '-')} {text!r} may use only {{src}} and {{tgt}} "
                                "as fields (write {{ and }} for braces)") from None


def _class_words(cfg: SteerConfig, classes: list[str]) -> dict[str, str]:
    words = {c: c.replace("_", " ") for c in classes}
    if cfg.class_words:
        p = Path(cfg.class_words)
        try:
            given = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read --class-words {p}: {e} (a JSON object {{class: word}})") from None
        if not isinstance(given, dict):
            raise UserError(f"--class-words {p} must hold a JSON object {{class: word}}")
        words.update({str(k): str(v) for k, v in given.items()})
    return words


# ------------------------------------------------------------------------------------------ output
def _mean(x) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return round(float(x.mean()), 6) if len(x) else None


# ------------------------------------------------------------------------------------------ the job
@dataclass
class _Data:
    """The dataset as steering sees it: classes, the images of each, and what the world says about them."""

    dataset: Any
    world: Any  # a synthetic World, or None
    attribute: str  # the synthetic attribute the classes are (shape, colour, size)
    labels: list[str | None]  # class of each example
    classes: list[str]
    by_class: dict[str, list[int]]  # class -> example ids (each image once)
    damage_qtypes: tuple[str, ...]


def _open_data(cfg: SteerConfig, damage_rule: Mapping[str, Sequence[str]] | None = None) -> _Data:
    from sightline.data import open_dataset
    from sightline.data.synthetic import world_facts

    dataset = open_dataset(cfg.data)
    facts = world_facts(dataset.root)
    world, winfo = (facts.world, facts.info) if facts is not None else (None, None)
    rule = {k: tuple(v) for k, v in (damage_rule if damage_rule is not None
                                     else facts.damage_rule if facts is not None else {}).items()}
    labels = [_label_of(ex, cfg.data_label) for ex in dataset]
    if all(v is None for v in labels):
        raise UserError(f"no image of {cfg.data} has a class {cfg.data_label!r}: use an image folder with class "
                        "subfolders, or name the field with --data-label (e.g. facts.objects.0.shape)")
    last = cfg.data_label.rsplit(".", 1)[-1]
    attribute = (winfo or {}).get("attribute") or (last if last in rule else "shape")
    if world is not None and attribute not in rule:
        raise UserError(f"synthetic dataset {cfg.data} is foldered by {attribute!r}; steering needs shape, colour "
                        "or size folders (export_imagefolder(..., attribute='shape'))")
    by_class: dict[str, list[int]] = {}
    seen = set()
    for i, ex in enumerate(dataset):  # an image listed twice (one manifest line per question) counts once
        if labels[i] is not None and ex.path not in seen:
            seen.add(ex.path)
            by_class.setdefault(labels[i], []).append(i)
    damage = tuple(cfg.damage_qtypes) or (rule[attribute] if world is not None else ())
    return _Data(dataset, world, attribute, labels, sorted(by_class), by_class, damage)


def _sites_and_directions(cfg: SteerConfig, adapter) -> tuple[list[str], dict]:
    """The resid sites to steer and the directions (UserError if they do not fit the model)."""
    from sightline.capture import parse_layers
    from sightline.steer.vectors import direction_layers, load_directions

    top = adapter.n_layers + 1  # resid.0 .. resid.{n_layers}
    wanted = None if cfg.layers == "auto" else parse_layers(cfg.layers, top, "resid layer")
    directions = load_directions(cfg.directions, None if wanted is None else [f"resid.{L}" for L in wanted],
                                 cfg.label, cfg.progress)
    layers = wanted if wanted is not None else [L for L in direction_layers(directions) if L < top]
    if not layers:
        raise UserError(f"directions {cfg.directions} hold no resid.L directions for this {adapter.n_layers}-layer "
                        "model; compute them at resid sites (e.g. extract --sites resid)")
    d = adapter.hidden_size
    bad = [k for k, v in directions.items() if k.startswith("resid.") and v.shape[0] != d]
    if bad:
        raise UserError(f"direction {bad[0]} has {directions[bad[0]].shape[0]} dims but {cfg.model} has hidden "
                        f"size {d}: use directions computed on this model")
    return [f"resid.{L}" for L in layers], directions


def _world_language(cfg: SteerConfig, data: _Data) -> str | None:
    """Why a dataset without world.json should still be asked the world's questions, or None: its classes are
    the world's shapes, colours or sizes, and the model is the shipped organism or the directions come from a
    store of the synthetic world. Sets data.attribute."""
    from sightline.data.synthetic import COLOURS, SHAPES, SIZES, world_facts

    if data.world is not None:
        return None
    attribute = next((a for a, vocab in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES))
                      if set(data.classes) <= set(vocab)), None)
    if attribute is None:
        return None
    why = None
    try:
        from sightline.organism import checkpoint_path

        if Path(cfg.model).expanduser().resolve() == checkpoint_path().resolve():
            why = "the model is the shipped organism"
    except (UserError, OSError):
        pass
    if why is None and (Path(cfg.directions) / "manifest.json").is_file():
        from sightline.store import ActivationStore

        try:
            root = (ActivationStore.open(cfg.directions).manifest.get("dataset") or {}).get("root")
        except UserError:
            root = None
        if root and world_facts(root) is not None:
            why = "the directions come from a store of the synthetic world"
    if why is not None:
        data.attribute = attribute
    return why


def _world_questions(adapter, items: list[Item], attribute: str, cfg: SteerConfig) -> None:
    """Each image's open question in the world's own form: "What shape is shown?", or "What colour is the
    <shape>?" with the shape the clean model names (a plain folder does not say it)."""
    from sightline.data.synthetic import SHAPES
    from sightline.steer.generate import steered_generate

    ask = "What shape is shown?"
    if attribute == "shape":
        for it in items:
            it.open_prompt = it.open_prompt or ask
        return
    shapes = steered_generate(adapter, [it.image for it in items], [ask] * len(items),
                              max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    for it, said in zip(items, shapes):
        shape = next((w for w in SHAPES if said.strip().lower().startswith(w)), "object")
        it.open_prompt = it.open_prompt or f"What {attribute} is the {shape}?"


def _held_out_warning(cfg: SteerConfig, data: _Data) -> list[str]:
    if not Path(cfg.directions).is_dir():
        return []
    from sightline.store import ActivationStore

    try:
        root = (ActivationStore.open(cfg.directions).manifest.get("dataset") or {}).get("root")
    except UserError:
        return []
    if root and Path(root).resolve() == Path(data.dataset.root).resolve():
        return ["the steered images are the images the directions were computed from (not held out)"]
    return []


def run_steering(cfg: SteerConfig, damage_rule: Mapping[str, Sequence[str]] | None = None,
                 adapter=None) -> RunResult:
    """Run the sweep and write `cfg.out` (see the module docstring and docs/outputs.md).

    `damage_rule` maps the steered attribute of a synthetic dataset to the question types that measure
    damage; None: the world's own rule (`sightline.data.synthetic.DAMAGE_QTYPES`). `adapter`: the model of
    `cfg.model` already loaded (Python callers that run several analyses); None loads it."""
    import torch

    from sightline.models import load_model
    from sightline.runtime import resolve_placement
    from sightline.steer.measure import JUDGE_PROMPT, WORLD_JUDGE_PROMPT
    from sightline.steer.vectors import mean_image_norms, normalize, steering_vector

    _check(cfg)
    out = check_output(cfg.out, cfg.overwrite, UserError)
    t0 = time.perf_counter()
    data = _open_data(cfg, damage_rule)
    pairs = _pairs(cfg, data.classes)
    words = _class_words(cfg, data.classes)
    world_reason = _world_language(cfg, data)  # a plain folder of the world's images, for a model that speaks it
    synthetic = data.world is not None or world_reason is not None
    efficacy_metric = cfg.efficacy_metric or ("share" if synthetic else "prob")
    prompts = {  # None: each image's own world question
        "efficacy": cfg.efficacy_prompt or (None if synthetic else PAPER_EFFICACY_PROMPT),
        "open": cfg.open_prompt or (None if synthetic else PAPER_OPEN_PROMPT),
        "caption": cfg.caption_prompt or (WORLD_CAPTION_PROMPT if synthetic else PAPER_CAPTION_PROMPT),
        "judge": (cfg.judge_prompt or (WORLD_JUDGE_PROMPT if synthetic else JUDGE_PROMPT)) if cfg.judge else None,
    }

    if adapter is None:
        device, model_dtype = resolve_placement(cfg.device, cfg.model_dtype, cfg.device_map)
        adapter = load_model(cfg.model, dtype=model_dtype, device=device, device_map=cfg.device_map,
                             revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, progress=cfg.progress)
    sites, directions = _sites_and_directions(cfg, adapter)

    items_of: dict[str, list[Item]] = {}
    for src, _ in pairs:
        if src not in items_of:
            ids = data.by_class.get(src, [])[: cfg.images_per_class]
            if not ids:
                raise UserError(f"class {src!r} has no images in {cfg.data}")
            items_of[src] = _items(data.dataset, ids, data.labels, data.world, data.attribute, data.damage_qtypes)
            if world_reason is not None and prompts["open"] is None:
                _world_questions(adapter, items_of[src], data.attribute, cfg)
    ref_norms = None
    if cfg.normalize == "resid":
        every = [it for its in items_of.values() for it in its]
        ref_norms = mean_image_norms(adapter, [it.image for it in every],
                                     [it.open_prompt or _fmt(prompts["open"], "", "") for it in every],
                                     sites, cfg.batch_size)
    vectors = {}  # every vector before any sweep: a missing direction fails at once
    for src, tgt in pairs:
        for site in sites:
            raw = steering_vector(directions, site, src, tgt)
            vectors[src, tgt, site] = raw, normalize(raw, cfg.normalize, None if ref_norms is None else ref_norms[site])

    with RunFolder(out, overwrite=cfg.overwrite) as tmp:
        write_json(tmp / "config.json", to_dict(cfg))
        with torch.no_grad():
            result = _sweep(cfg, adapter, vectors, pairs, words, items_of, sites, prompts, efficacy_metric, tmp,
                            data.classes)
        result.update({
            "model": adapter.describe(),
            "data": {"root": str(data.dataset.root), "kind": data.dataset.kind, "classes": data.classes,
                     "synthetic_attribute": data.attribute if synthetic else None},
            "prompts": {**prompts, "damage_qtypes": list(data.damage_qtypes), "world_language": world_reason},
            "efficacy_metric": efficacy_metric,
            "normalize": cfg.normalize,
            "ref_norms": ref_norms,
            "warnings": _held_out_warning(cfg, data) + result.get("warnings", []),
            "seconds": round(time.perf_counter() - t0, 2),
        })
        result["summary"].update(_headline_of(result))
        from sightline.report.steer import plot_judged, plot_layer, plot_overview

        for site in sites:
            plot_layer(result, site, tmp / "figures" / f"steer_{site}.png")
        plot_overview(result, tmp / "figures" / "steer_overview.png")
        if cfg.judge:
            plot_judged(result, tmp / "figures" / "steer_judged.png")
        result = {"summary": result.pop("summary"), **result}
        write_json(tmp / "results.json", result)
        _write_page(tmp, cfg, result)
    return RunResult(out, result["summary"])


def _write_page(folder: Path, cfg: SteerConfig, result: dict) -> None:
    """index.html of a steering run: what it found, the overview, every figure."""
    from sightline.report.html import Section, figure_images, write_page

    h = headline(result)
    if h["best_site"] is not None:
        found = (f"The best edit, {h['best_site']} at k = {h['best_scale']:g}, flips the free answer to the target "
                 f"in {h['flip_rate']:.0%} of images (clean: {h['clean_flip_rate'] or 0:.0%}); efficacy "
                 f"({h['efficacy_metric']}) {h['efficacy'] if h['efficacy'] is not None else float('nan'):.3g}, "
                 f"unrelated-question accuracy {h['damage_accuracy']} (clean {h['clean_damage_accuracy']}).")
        if h.get("judged_target_rate") is not None:
            found += (f" The unsteered model, judging each answer as a four-way choice beside a blank image, picks the "
                      f"target for {h['judged_target_rate']:.0%} of them "
                      f"(clean {h['clean_judged_target_rate'] or 0:.0%}); "
                      f"their coherence is {_nats(h['coherence'])} (clean answers {_nats(h['clean_coherence'])}).")
    else:
        found = (h.get("best_note") or "No (layer, k) kept the damage within its bounds").capitalize() + "."
    import html

    sections = [Section("Warnings", html="".join(f"<p><b>Warning:</b> {html.escape(w)}</p>" for w in h["warnings"]))]
    sections = sections if h["warnings"] else []
    sections += [
        Section("What this run found",
                f"Steered {len(h['pairs'])} pair(s) ({', '.join(h['pairs'])}) at {', '.join(h['sites'])} over "
                f"{len(h['scales'])} values of k, {cfg.normalize} vectors, {cfg.mode} edits. " + found,
                figures={k: h[k] for k in ("best_site", "best_scale", "flip_rate", "efficacy", "damage_accuracy",
                                           "caption_nll_increase", "judged_target_rate", "coherence",
                                           "clean_flip_rate", "clean_damage_accuracy", "clean_judged_target_rate",
                                           "clean_coherence")},
                images=[("figures/steer_overview.png", "flip rate, efficacy and damage against k, per layer")]),
        Section("Figures", images=figure_images(folder)),
        Section("Files", links=[("results.json", "results.json"), ("config.json", "config.json"),
                                ("generations.jsonl", "generations.jsonl")]),
    ]
    write_page(folder / "index.html", "Steering", f"{cfg.model} · {cfg.data}", sections)


def _nats(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g} nats/token"


def _fmt(template: str | None, src: str, tgt: str) -> str | None:
    return None if template is None else template.format(src=src, tgt=tgt)


def _sweep(cfg, adapter, vectors, pairs, words, items_of, sites, prompts, efficacy_metric, tmp, classes) -> dict:
    from tqdm.auto import tqdm

    from sightline.steer.generate import steered_generate
    from sightline.steer.measure import (
        answer_logprobs,
        caption_nlls,
        efficacy_from_logprobs,
        first_answer_token,
        judge_answers,
        judge_options,
        mentions,
        word_token_ids,
    )
    kw = dict(positions=cfg.positions, mode=cfg.mode, batch_size=cfg.batch_size)
    class_ids = word_token_ids(adapter, sorted(set(words.values())))  # left out of the collateral caption NLL
    scales = [float(k) for k in cfg.scales]
    n_k = len(scales)
    warnings: list[str] = []
    clean_of: dict[str, dict] = {}
    out_pairs = []
    gen_path = tmp / "generations.jsonl"
    bar = tqdm(total=len(pairs) * len(sites), desc="steer", unit="layer", disable=not cfg.progress,
               dynamic_ncols=True)
    with open(gen_path, "w", encoding="utf-8") as gen_file:

        def log(**rec):
            gen_file.write(dumps(rec, indent=None) + "\n")

        for src, tgt in pairs:
            items = items_of[src]
            n = len(items)
            ws, wt = words[src], words[tgt]
            images = [it.image for it in items]
            open_prompts = [it.open_prompt or _fmt(prompts["open"], ws, wt) for it in items]
            eff_prompts = [_fmt(prompts["efficacy"], ws, wt) or it.open_prompt for it in items]
            cap_prompt = _fmt(prompts["caption"], ws, wt)
            dq = [(i, q, a) for i, it in enumerate(items) for q, a in it.questions]
            if any(p is None for p in open_prompts + eff_prompts):
                raise UserError(f"no open question for some images of class {src!r}: pass --open-prompt")

            if src not in clean_of:  # what does not depend on the target or the edit
                captions = [it.caption for it in items]
                if any(c is None for c in captions):  # no reference caption: the clean model's own
                    own = steered_generate(adapter, images, [cap_prompt] * n, max_new_tokens=cfg.max_new_tokens,
                                           batch_size=cfg.batch_size)
                    captions = [c if c is not None else o for c, o in zip(captions, own)]
                dmg = steered_generate(adapter, [images[i] for i, _, _ in dq], [q for _, q, _ in dq],
                                       max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size) if dq else []
                clean_of[src] = {
                    "captions": captions,
                    "caption_nll": caption_nlls(adapter, images, [cap_prompt] * n, captions, batch_size=cfg.batch_size,
                                                exclude_ids=class_ids),
                    "damage_correct": np.array([mentions(g, a) for g, (_, _, a) in zip(dmg, dq)], dtype=float),
                    "damage_answers": dmg,
                }
            clean = clean_of[src]
            captions = clean["captions"]

            tok_ids = [[first_answer_token(adapter, p, w) for w in (ws, wt)] for p in eff_prompts]
            same = [i for i, (a, b) in enumerate(tok_ids) if a == b]
            if same:
                warnings.append(f"{src}->{tgt}: the two class words start with the same token; efficacy is NaN")
            # efficacy for each row: its own prompt's (source, target) token ids
            uniq = sorted({tuple(t) for t in tok_ids})

            def efficacy(site=None, v=None, ks=(0.0,)):
                rows_img, rows_k = np.repeat(np.arange(n), len(ks)), np.tile(np.asarray(ks, float), n)
                ids = sorted({t for pair in uniq for t in pair})
                lp = answer_logprobs(adapter, [images[i] for i in rows_img], [eff_prompts[i] for i in rows_img],
                                     ids, site, v, rows_k, **kw)
                col = {t: j for j, t in enumerate(ids)}
                two = np.stack([lp[r, [col[tok_ids[i][0]], col[tok_ids[i][1]]]] for r, i in enumerate(rows_img)])
                eff = efficacy_from_logprobs(two)
                bad = np.isin(rows_img, same)
                return {m: np.where(bad, np.nan, e).reshape(n, len(ks)) for m, e in eff.items()}

            def free(site=None, v=None, ks=(0.0,)):
                rows_img, rows_k = np.repeat(np.arange(n), len(ks)), np.tile(np.asarray(ks, float), n)
                ans = steered_generate(adapter, [images[i] for i in rows_img], [open_prompts[i] for i in rows_img],
                                       site, v, rows_k, max_new_tokens=cfg.max_new_tokens, **kw)
                return ans, rows_img, rows_k

            options = judge_options([words[c] for c in classes], ws, wt, n, cfg.judge_seed)

            seen: dict[tuple[int, str], tuple] = {}  # (image, answer) -> (picked, coherence, coherence_other)

            def judged(ans, rows_img) -> dict:
                """Per row: the class the judge picks (None: not judged), target/source (0/1), coherence. Each
                distinct (image, answer) is judged and scored once per pair (answers repeat across k and layers)."""
                if prompts["judge"] is None:
                    return {}
                todo = list(dict.fromkeys((int(i), a) for i, a in zip(rows_img, ans) if (int(i), a) not in seen))
                if todo:
                    idx, texts = [i for i, _ in todo], [a for _, a in todo]
                    choice, _ = judge_answers(adapter, [images[i] for i in idx], texts, [open_prompts[i] for i in idx],
                                              [options[i] for i in idx], prompts["judge"], cfg.batch_size)
                    same = (f"{src}->{tgt}: some options of the judgement start with the same token; those answers "
                            "count as judged neither source nor target")
                    if any(c < 0 and a.strip() for c, a in zip(choice, texts)) and same not in warnings:
                        warnings.append(same)
                    coh, coh_other = caption_nlls(adapter, [images[i] for i in idx], [open_prompts[i] for i in idx],
                                                  texts, batch_size=cfg.batch_size, exclude_ids=class_ids)
                    for r, key in enumerate(todo):
                        seen[key] = (options[key[0]][choice[r]] if choice[r] >= 0 else None, coh[r], coh_other[r])
                got = [seen[int(i), a] for i, a in zip(rows_img, ans)]
                picked = [g[0] for g in got]
                return {"picked": picked, "target": np.array([p == wt for p in picked], float),
                        "source": np.array([p == ws for p in picked], float),
                        "coherence": np.array([g[1] for g in got]), "coherence_other": np.array([g[2] for g in got])}

            # clean reference for this pair
            e0 = efficacy()
            ans0, rows0, _ = free()
            j0 = judged(ans0, rows0)
            if not any(mentions(a, ws) or mentions(a, wt) for a in ans0):
                warnings.append(f"{src}->{tgt}: no clean answer to the open question ({open_prompts[0]!r}) names "
                                f"{ws!r} or {wt!r} (it answers e.g. {ans0[0]!r}), so the flip rate measures nothing; "
                                "pass --open-prompt (and --efficacy-prompt) with a question the model answers with "
                                "a class word")
            for i, a in enumerate(ans0):
                log(source=src, target=tgt, site=None, scale=None, path=items[i].path, kind="open",
                    prompt=open_prompts[i], answer=a, flipped=bool(_flip(a, ws, wt)), **_judged_fields(j0, i))
            for (i, q, a), g, c in zip(dq, clean["damage_answers"], clean["damage_correct"]):
                log(source=src, target=tgt, site=None, scale=None, path=items[i].path, kind="damage", prompt=q,
                    answer=g, expected=a, correct=bool(c))
            pair_out = {
                "source": src, "target": tgt, "source_word": ws, "target_word": wt, "n_images": n,
                "n_damage_questions": len(dq),
                "clean": {
                    "efficacy": _mean(e0[efficacy_metric]), "efficacy_prob": _mean(e0["prob"]),
                    "efficacy_share": _mean(e0["share"]),
                    "flip_rate": _mean([_flip(a, ws, wt) for a in ans0]),
                    "source_rate": _mean([_kept(a, ws, wt) for a in ans0]),
                    "damage_accuracy": _mean(clean["damage_correct"]) if dq else None,
                    "caption_nll": _mean(clean["caption_nll"][0]),
                    **_judged_means(j0, np.arange(n)),
                },
                "judge_options": options if j0 else None,
                "layers": {},
            }
            for site in sites:
                raw, v = vectors[src, tgt, site]
                eff = efficacy(site, v, scales)
                ans, rows_img, rows_k = free(site, v, scales)
                flips = np.array([_flip(a, ws, wt) for a in ans], dtype=float).reshape(n, n_k)
                kept = np.array([_kept(a, ws, wt) for a in ans], dtype=float).reshape(n, n_k)
                jd = judged(ans, rows_img)
                for r, (a, i, k) in enumerate(zip(ans, rows_img, rows_k)):
                    log(source=src, target=tgt, site=site, scale=float(k), path=items[i].path, kind="open",
                        prompt=open_prompts[i], answer=a, flipped=bool(_flip(a, ws, wt)), **_judged_fields(jd, r))
                if dq:
                    d_img = np.repeat([i for i, _, _ in dq], n_k)
                    d_q = np.repeat(np.arange(len(dq)), n_k)
                    d_k = np.tile(np.asarray(scales), len(dq))
                    dans = steered_generate(adapter, [images[i] for i in d_img], [dq[j][1] for j in d_q], site, v,
                                            d_k, max_new_tokens=cfg.max_new_tokens, **kw)
                    correct = np.array([mentions(g, dq[j][2]) for g, j in zip(dans, d_q)], dtype=float)
                    for g, j, k, c in zip(dans, d_q, d_k, correct):
                        log(source=src, target=tgt, site=site, scale=float(k), path=items[dq[j][0]].path,
                            kind="damage", prompt=dq[j][1], answer=g, expected=dq[j][2], correct=bool(c))
                    dmg_acc = [_mean(c) for c in correct.reshape(len(dq), n_k).T]
                else:
                    dmg_acc = [None] * n_k
                c_img = np.repeat(np.arange(n), n_k)
                c_k = np.tile(np.asarray(scales), n)
                nll, nll_other = caption_nlls(adapter, [images[i] for i in c_img], [cap_prompt] * len(c_img),
                                              [captions[i] for i in c_img], site, v, c_k, **kw,
                                              exclude_ids=class_ids)
                nll, nll_other = nll.reshape(n, n_k), nll_other.reshape(n, n_k)
                inc = nll - clean["caption_nll"][0][:, None]
                inc_other = nll_other - clean["caption_nll"][1][:, None]
                pair_out["layers"][site] = {
                    "scales": scales,
                    "efficacy": [_mean(c) for c in eff[efficacy_metric].T],
                    "efficacy_prob": [_mean(c) for c in eff["prob"].T],
                    "efficacy_share": [_mean(c) for c in eff["share"].T],
                    "flip_rate": [_mean(c) for c in flips.T],
                    "source_rate": [_mean(c) for c in kept.T],
                    "damage_accuracy": dmg_acc,
                    "caption_nll": [_mean(c) for c in nll.T],
                    "caption_nll_increase": [_mean(c) for c in inc.T],
                    "caption_nll_increase_other": [_mean(c) for c in inc_other.T],
                    **{key: [m[key] for m in (_judged_means(jd, np.flatnonzero(rows_k == k)) for k in scales)]
                       for key in JUDGED_KEYS if jd},
                    "raw_norm": round(float(raw.norm()), 6),
                    "vector_norm": round(float(v.norm()), 6),
                }
                bar.update(1)
            out_pairs.append(pair_out)
    bar.close()
    return {"pairs": out_pairs, "summary": summarize(out_pairs, sites, scales, cfg.max_damage_drop,
                                                     cfg.max_caption_nll_increase), "warnings": warnings}


JUDGED_KEYS = ("judged_target_rate", "judged_source_rate", "coherence", "coherence_other")


def _judged_means(j: dict, rows: np.ndarray) -> dict:
    """Means over `rows` of a `judged` record: judged-target and judged-source rates, coherence (NLL/token)."""
    if not j:
        return {}
    return {"judged_target_rate": _mean(j["target"][rows]), "judged_source_rate": _mean(j["source"][rows]),
            "coherence": _mean(j["coherence"][rows]), "coherence_other": _mean(j["coherence_other"][rows])}


def _judged_fields(j: dict, row: int) -> dict:
    """The judgement of one answer for generations.jsonl."""
    if not j:
        return {}
    coh = j["coherence"][row]
    return {"judged": j["picked"][row], "coherence": None if not np.isfinite(coh) else round(float(coh), 6)}


def _flip(answer: str, src: str, tgt: str) -> float:
    from sightline.steer.measure import mentions

    return float(mentions(answer, tgt) and not mentions(answer, src))


def _kept(answer: str, src: str, tgt: str) -> float:
    from sightline.steer.measure import mentions

    return float(mentions(answer, src) and not mentions(answer, tgt))


def summarize(pairs: list[dict], sites: list[str], scales: list[float], max_damage_drop: float = 0.1,
              max_caption_nll_increase: float = 1.0) -> dict:
    """Means over pairs per (layer, k), and the best (layer, k) among the steered points (k != 0) whose damage
    is acceptable: damage accuracy at most `max_damage_drop` below the clean one where there are damage
    questions, else caption NLL (its words other than the class words) at most `max_caption_nll_increase`
    nats/token above it. Best: the highest
    mean flip rate, or the highest efficacy when nothing flips; ties go to the smaller k. None when no
    point qualifies (`best_note` says why)."""
    keys = ("efficacy", "efficacy_prob", "efficacy_share", "flip_rate", "source_rate", "damage_accuracy",
            "caption_nll_increase", "caption_nll_increase_other", *JUDGED_KEYS)
    per_layer = {}
    for site in sites:
        per_layer[site] = {"scales": scales}
        for key in keys:
            cols = [[p["layers"][site].get(key, [None] * len(scales))[j] for p in pairs] for j in range(len(scales))]
            per_layer[site][key] = [_mean([c for c in col if c is not None]) for col in cols]
    clean_dmg = _mean([p["clean"]["damage_accuracy"] for p in pairs if p["clean"]["damage_accuracy"] is not None])
    ok, n_steered, why_not = [], 0, {"damage accuracy": 0, "caption NLL": 0}
    for site in sites:
        s = per_layer[site]
        for j, k in enumerate(scales):
            if k == 0:
                continue
            n_steered += 1
            # collateral damage: the caption NLL over its tokens other than the class words (a clean swap
            # renames the object, which the full caption NLL counts as damage)
            dmg = s["damage_accuracy"][j]
            nll = s["caption_nll_increase_other"][j]
            if nll is None:
                nll = s["caption_nll_increase"][j]
            if clean_dmg is not None and dmg is not None and dmg < clean_dmg - max_damage_drop - 1e-9:
                why_not["damage accuracy"] += 1
                continue
            # the caption bound stands in for damage questions where there are none: a short caption that
            # names the object (the organism's 4 words) moves with any swap, while the questions about
            # the other attributes measure the collateral damage directly
            if (dmg is None or clean_dmg is None) and nll is not None and nll > max_caption_nll_increase:
                why_not["caption NLL"] += 1
                continue
            ok.append({"site": site, "scale": k, "flip_rate": s["flip_rate"][j], "damage_accuracy": dmg,
                       "efficacy": s["efficacy"][j], "caption_nll_increase": nll,
                       "judged_target_rate": s["judged_target_rate"][j], "coherence": s["coherence"][j]})
    flips = any((b["flip_rate"] or 0) > 0 for b in ok)
    key = "flip_rate" if flips else "efficacy"
    best = max(ok, key=lambda b: (b[key] if b[key] is not None else -1.0, -abs(b["scale"])), default=None)
    if best is not None:
        bound = (f"damage accuracy drop <= {max_damage_drop:g}" if clean_dmg is not None else
                 f"caption NLL increase (words other than the class words) <= {max_caption_nll_increase:g} nats/token")
        note = (f"highest {key.replace('_', ' ')} among {len(ok)} of {n_steered} steered points whose damage is "
                f"acceptable ({bound})")
    else:
        note = (f"no steered (layer, k) keeps the damage acceptable: {why_not['damage accuracy']} lower the damage "
                f"accuracy by more than {max_damage_drop:g}, {why_not['caption NLL']} raise the caption NLL by more "
                f"than {max_caption_nll_increase:g} nats/token" if n_steered else "no steered (layer, k): every k is 0")
    clean = {key: _mean([p["clean"][key] for p in pairs if p["clean"].get(key) is not None])
             for key in ("efficacy", "flip_rate", "source_rate", "damage_accuracy", "caption_nll", *JUDGED_KEYS)}
    return {"per_layer": per_layer, "clean": clean, "best": best, "best_note": note,
            "damage_bounds": {"max_damage_drop": max_damage_drop,
                              "max_caption_nll_increase": max_caption_nll_increase}}

"""Perception that never reaches the answer: where a readout of the image representations is right and the
model's own answer is wrong ("present, not surfaced"; Liu et al. 2025, 33.3% of BLINK Art Style questions).

Two studies, each per question type and per representation (values.L by default, every layer):

- **Multiple choice (BLINK's layout, `sightline.data.blink`).** The model answers each question from one
  prompt holding all its images (the family's chat template: the images in order, then BLINK's prompt),
  greedy; the choice is parsed from the generation (`parse_choice`: "(B)", a leading "B", or the one choice
  text it contains; anything else is unparsed and counts as wrong). The readout needs no training where the
  subtask allows it (`SIMILARITY_SUBTASKS`: Art Style, Visual Similarity): each image is run through the
  model ALONE (so its values see no other image), its image tokens' features mean-pooled, and the
  candidate (image_2, image_3, ...) with the highest cosine similarity to the reference (image_1) is the
  readout's choice. Other subtasks get the answer's accuracy only.
- **The organism's presence and count questions (ground truth known).** Pooled features of scenes of 1-4
  objects; logistic probes (`sightline.probes.linear.LogisticProbe`, L2 chosen on a validation share of
  the training scenes) for every concept's presence (8 shapes, 8 colours, 64 colour-shape pairs) and
  counts (all objects; per shape; per colour: 0..4), fitted on training scenes and read on held-out
  scenes, where each of the world's questions ("Is there a star?", "How many circles are there?") is
  answered by the matching probe and by the model's greedy generation.

For every (question type, representation): the readout's accuracy, the answer's accuracy, "present, not
surfaced" (the share of questions the readout gets right and the answer gets wrong) and its converse
"surfaced, not present". `surface(...)` is the pure scoring step; `run_surfacing(SurfacingConfig)` the job.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sightline.config import ConfigIO, to_dict
from sightline.errors import UserError
from sightline.report.files import RunFolder, RunResult, check_output, write_json


@dataclass(frozen=True)
class SurfacingConfig(ConfigIO):
    """What `sightline surfacing` measures (saved as OUT/config.json)."""

    model: str | None = None
    """Model folder or Hugging Face id; default: the shipped model organism."""
    blink: str | None = None
    """BLINK folder (ROOT/<Subtask>/<split>-*.parquet); default: with the organism, synthetic style-match
    triples written in BLINK's layout (Art_Style), else none."""
    subtasks: str = "all"
    """BLINK subtasks: all (every one found) or a comma list (Art_Style,Visual_Similarity)."""
    split: str = "val"
    """BLINK split (the test split hides its answers)."""
    n: int | None = None
    """At most this many questions per BLINK subtask (default: all)."""
    style_triples: int = 60
    """Synthetic style-match triples when --blink is not given (organism only)."""
    reps: tuple[str, ...] = ("values",)
    """Representations read: kinds (values, keys, resid, projector) or exact names (values.2); KV heads concatenated."""
    layers: str = "all"
    """Language-model layers of the bare kinds: all, 0,2 or 1-3."""
    organism_questions: bool = True
    """Run the presence and count study (organism only: it needs the synthetic world's questions)."""
    kinds: str = "all"
    """Question kinds of that study: all, or a comma list of presence_shape, presence_colour, presence_pair,
    count_objects, count_shape, count_colour."""
    train_scenes: int = 600
    """Scenes the presence / count probes are fitted on."""
    test_scenes: int = 200
    """Held-out scenes whose questions are scored."""
    seed: int = 0
    """Scene and fixture seed (scenes come from streams the organism never trained on)."""
    max_new_tokens: int = 12
    """Greedy tokens generated per answer."""
    batch_size: int = 32
    """Images per forward (features) and questions per generate call (organism questions)."""
    out: str = "surfacing"
    """Output folder (config.json, results.json, figures/, index.html)."""
    overwrite: bool = False
    """Replace an existing output folder."""
    progress: bool = True
    """Show progress bars."""



# ============================================================================= scoring
def surface(readout_correct: np.ndarray, answer_correct: np.ndarray) -> dict[str, Any]:
    """Readout against answer over the same questions (bool arrays [n]): accuracies, "present, not surfaced"
    (readout right, answer wrong), "surfaced, not present" (answer right, readout wrong), both right, n."""
    r = np.asarray(readout_correct, bool)
    a = np.asarray(answer_correct, bool)
    if r.shape != a.shape:
        raise ValueError(f"readout and answer cover different questions: {r.shape} vs {a.shape}")
    n = int(r.size)

    def frac(x):
        return float(np.mean(x)) if n else None

    return {"n": n, "readout_accuracy": frac(r), "answer_accuracy": frac(a), "present_not_surfaced": frac(r & ~a),
            "surfaced_not_present": frac(a & ~r), "both": frac(r & a)}


# ============================================================================= multiple-image answers
def multi_image_prompt(adapter, n_images: int, text: str) -> str:
    """One user turn of the model's chat template holding `n_images` images in order, then `text`."""
    template = getattr(adapter.processor, "chat_template", None) or getattr(adapter.tokenizer, "chat_template", None)
    if not template:
        raise UserError(f"model {adapter.name} has no chat template: the multiple-image BLINK prompt needs one")
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return adapter.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                 tokenize=False)


@torch.no_grad()
def answer_multi(adapter, images: Sequence, text: str, max_new_tokens: int = 12) -> str:
    """The model's greedy answer to `text` shown after all `images` (one prompt, the family's template)."""
    prompt = multi_image_prompt(adapter, len(images), text)
    images = list(images)
    nested = isinstance(adapter.processor_images(images[:1])[0], (list, tuple))
    inputs = adapter.processor(images=[images] if nested else images, text=[prompt], return_tensors="pt",
                               **adapter.processor_kwargs())
    inputs.pop("labels", None)
    inputs = {k: v.to(adapter.device) for k, v in inputs.items()}
    out = adapter.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return adapter.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# ============================================================================= features
def pooled_features(featurizer, images: Sequence) -> dict[str, np.ndarray]:
    """{rep: [n_images, D] float32}: each image run alone, its image tokens' features mean-pooled."""
    out: dict[str, list[np.ndarray]] = defaultdict(list)
    for f in featurizer(list(images)):
        for rep, t in f.feats.items():
            out[rep].append(t.mean(0).numpy())
    return {rep: np.stack(v).astype(np.float32) for rep, v in out.items()}


def similarity_choice(ref_d: np.ndarray, cands_kd: np.ndarray) -> int:
    """The candidate whose feature is most cosine-similar to the reference's (first on a tie)."""
    ref = ref_d / max(float(np.linalg.norm(ref_d)), 1e-12)
    c = cands_kd / np.maximum(np.linalg.norm(cands_kd, axis=1, keepdims=True), 1e-12)
    return int(np.argmax(c @ ref))


def _reps(adapter, cfg: SurfacingConfig) -> list:
    from sightline.perception.represent import parse_reps

    bad = [r for r in cfg.reps for r in str(r).split(",") if r.strip().split(".")[0] in ("vision", "encoder")]
    if bad:
        raise UserError(f"--reps {bad[0]}: surfacing reads the language model's representations (values, keys, "
                        "resid, projector)")
    return parse_reps(cfg.reps, cfg.layers, "concat", n_layers=adapter.n_layers, n_kv_heads=adapter.n_kv_heads,
                      n_vision_layers=adapter.n_vision_layers, kv_layers=adapter.kv_layers)


def score_blink(adapter, featurizer, questions: Mapping[str, Sequence], max_new_tokens: int = 12,
                progress: bool = False) -> dict[str, dict[str, Any]]:
    """Per subtask: every question's generated answer, parsed choice and, for SIMILARITY_SUBTASKS, the
    similarity readout's choice per rep; then `surface` per rep. Questions without an answer are skipped."""
    from tqdm.auto import tqdm

    from sightline.data.blink import SIMILARITY_SUBTASKS, parse_choice

    out: dict[str, dict[str, Any]] = {}
    for subtask, qs in questions.items():
        qs = [q for q in qs if q.answer is not None]
        if not qs:
            out[subtask] = {"n": 0, "note": "no question with a known answer (the test split hides them)"}
            continue
        readable = subtask in SIMILARITY_SUBTASKS
        items = []
        for q in tqdm(qs, desc=subtask, disable=not progress, dynamic_ncols=True):
            images = q.images()
            generated = answer_multi(adapter, images, q.prompt, max_new_tokens)
            chosen = parse_choice(generated, q.choices)
            item = {"id": q.id, "answer": q.answer, "generated": generated, "parsed": chosen,
                    "answer_correct": chosen == q.answer}
            if readable and len(images) == len(q.choices) + 1:
                feats = pooled_features(featurizer, images)
                item["readout"] = {rep: similarity_choice(f[0], f[1:]) for rep, f in feats.items()}
            items.append(item)
        entry: dict[str, Any] = {
            "n": len(items), "answer_accuracy": float(np.mean([it["answer_correct"] for it in items])),
            "unparsed": int(sum(it["parsed"] is None for it in items)),
            "chance": float(np.mean([1 / len(q.choices) for q in qs])), "readout": None, "items": items}
        scored = [it for it in items if "readout" in it]
        if scored:
            entry["n_readout"] = len(scored)
            answer_ok = np.array([it["answer_correct"] for it in scored])
            entry["readout"] = {rep: surface(np.array([it["readout"][rep] == it["answer"] for it in scored]), answer_ok)
                                for rep in scored[0]["readout"]}
        elif readable:
            entry["note"] = "no question had one image per choice plus the reference: no readout"
        else:
            entry["note"] = "no training-free readout for this subtask: answer accuracy only"
        out[subtask] = entry
    return out


# ============================================================================= organism: presence and counts
_PRESENCE_COLOUR = re.compile(r"^is there an? (\w+) object\?$")
_PRESENCE_PAIR = re.compile(r"^is there an? (\w+) (\w+)\?$")
_PRESENCE_SHAPE = re.compile(r"^is there an? (\w+)\?$")
_COUNT_COLOUR = re.compile(r"^how many (\w+) objects are there\?$")
_COUNT_SHAPE = re.compile(r"^how many (\w+) are there\?$")
QUESTION_KINDS = ("presence_shape", "presence_colour", "presence_pair", "count_objects", "count_shape",
                  "count_colour")


def question_label(question: str) -> tuple[str, int]:
    """(question kind, label index) of a world presence / count question: e.g. "Is there a star?" ->
    ("presence_shape", SHAPES.index("star")); the index picks the probe of that concept (0 for count_objects)."""
    from sightline.data.synthetic import COLOURS, SHAPES
    from sightline.data.synthetic.vocab import plural

    q = question.strip().lower()
    if q == "how many objects are there?":
        return "count_objects", 0
    if m := _COUNT_COLOUR.match(q):
        return "count_colour", COLOURS.index(m.group(1))
    if m := _COUNT_SHAPE.match(q):
        return "count_shape", [plural(s) for s in SHAPES].index(m.group(1))
    if m := _PRESENCE_COLOUR.match(q):
        return "presence_colour", COLOURS.index(m.group(1))
    if m := _PRESENCE_PAIR.match(q):
        return "presence_pair", COLOURS.index(m.group(1)) * len(SHAPES) + SHAPES.index(m.group(2))
    if m := _PRESENCE_SHAPE.match(q):
        return "presence_shape", SHAPES.index(m.group(1))
    raise ValueError(f"not a presence or count question of the synthetic world: {question!r}")


def scene_labels(scene, max_count: int = 4) -> dict[str, np.ndarray]:
    """Every concept's truth for one scene, per question kind: presence 0/1 (shapes [8], colours [8],
    colour-shape pairs [64], colour-major) and counts clipped to max_count (objects [1], shapes [8], colours [8])."""
    from sightline.data.synthetic import COLOURS, SHAPES

    present = [o for o in scene.objects if o.area > 0]
    shapes = np.array([sum(o.shape == s for o in present) for s in SHAPES])
    colours = np.array([sum(o.colour == c for o in present) for c in COLOURS])
    pairs = np.array([sum(o.colour == c and o.shape == s for o in present) for c in COLOURS for s in SHAPES])
    return {"presence_shape": (shapes > 0).astype(int), "presence_colour": (colours > 0).astype(int),
            "presence_pair": (pairs > 0).astype(int), "count_objects": np.minimum([len(present)], max_count),
            "count_shape": np.minimum(shapes, max_count), "count_colour": np.minimum(colours, max_count)}


def _answer_word(kind: str, label: int) -> str:
    from sightline.data.synthetic import NUMBERS

    return ("no", "yes")[label] if kind.startswith("presence") else NUMBERS[label]


def organism_study(adapter, featurizer, seed: int = 0, train_scenes: int = 600, test_scenes: int = 200,
                   batch_size: int = 32, max_new_tokens: int = 4, kinds: Sequence[str] = QUESTION_KINDS,
                   progress: bool = False) -> dict[str, Any]:
    """Presence and count questions on held-out scenes: probes on pooled features (fitted on `train_scenes`)
    against the generated answers, scored on the world's truth. Returns {"kinds": {kind: {"n", "majority",
    "answer_accuracy", "reps": {rep: surface(...)}}}, "concepts": per-concept probe accuracy on every held-out
    scene (the presence of each shape and colour, beside always answering the training majority)}. `kinds`: the
    question kinds asked (QUESTION_KINDS)."""
    bad = [k for k in kinds if k not in QUESTION_KINDS]
    if bad or not kinds:
        raise UserError(f"unknown question kind {bad[0] if bad else '(none given)'!r}: use {', '.join(QUESTION_KINDS)}")
    from sightline.data.synthetic import (
        COLOURS,
        SHAPES,
        WorldConfig,
        derive_seed,
        questions,
        render_scene,
    )
    from sightline.organism.evaluate import answer
    from sightline.probes.linear import LogisticProbe

    size = adapter.config.vision_config.image_size
    world = WorldConfig(image_size=size)
    train = [render_scene(derive_seed(seed, "surfacing-train", i), world) for i in range(train_scenes)]
    test = [render_scene(derive_seed(seed, "surfacing-test", i), world) for i in range(test_scenes)]
    x_train = pooled_features(featurizer, [s.to_pil() for s in train])
    x_test = pooled_features(featurizer, [s.to_pil() for s in test])
    reps = list(x_train)
    y_train = [scene_labels(s) for s in train]
    y_test = [scene_labels(s) for s in test]
    pred: dict[str, np.ndarray] = {}  # kind -> [B reps, T concepts, n_test] predicted label
    majority: dict[str, np.ndarray] = {}  # kind -> [T] training majority label
    for kind in dict.fromkeys([*kinds, "presence_shape", "presence_colour"]):  # the concept table needs both
        y = np.stack([ys[kind] for ys in y_train], 1)  # [T, n]
        k = 2 if kind.startswith("presence") else 5
        per_rep = []
        for rep in reps:  # one fit per rep (their widths differ), every concept of the kind at once
            probe = LogisticProbe(seed=seed, device="cpu").fit(torch.from_numpy(x_train[rep]), y, n_classes=k)
            per_rep.append(probe.predict(torch.from_numpy(x_test[rep])).numpy())  # [T, n_test]
        pred[kind] = np.stack(per_rep)
        majority[kind] = np.array([np.bincount(row, minlength=k).argmax() for row in y])
    # the questions, answered by the model
    asked = []
    for i, s in enumerate(test):
        for q in questions(s, ("presence", "count")):
            kind, t = question_label(q.question)
            if kind in kinds:
                asked.append((i, q, kind, t))
    generated: list[str] = []
    for start in range(0, len(asked), batch_size):
        chunk = asked[start:start + batch_size]
        generated += answer(adapter, [test[i].to_pil() for i, *_ in chunk], [q.question for _, q, *_ in chunk],
                            max_new_tokens=max_new_tokens)
    by_kind: dict[str, Any] = {}
    for kind in kinds:
        rows = [(i, q, t, g) for (i, q, kd, t), g in zip(asked, generated) if kd == kind]
        if not rows:
            continue
        truth = np.array([y_test[i][kind][t] for i, _, t, _ in rows])
        assert all(_answer_word(kind, int(v)) == q.answer for v, (_, q, _, _) in zip(truth, rows)), kind
        answer_ok = np.array([g.strip().lower() == q.answer for _, q, _, g in rows])
        maj = np.array([majority[kind][t] for _, _, t, _ in rows])
        per_rep = {}
        for b, rep in enumerate(reps):
            got = np.array([pred[kind][b, t, i] for i, _, t, _ in rows])
            per_rep[rep] = surface(got == truth, answer_ok)
        by_kind[kind] = {"n": len(rows), "majority": float(np.mean(maj == truth)),
                       "answer_accuracy": float(answer_ok.mean()), "reps": per_rep,
                       "examples": [{"question": q.question, "answer": q.answer, "generated": g}
                                    for _, q, _, g in rows[:3]]}
    concepts = {}
    for kind, names in (("presence_shape", SHAPES), ("presence_colour", COLOURS)):
        truth = np.stack([ys[kind] for ys in y_test], 0)  # [n, T]
        for t, name in enumerate(names):
            concepts[f"{kind}:{name}"] = {
                "majority": float(np.mean(truth[:, t] == majority[kind][t])),
                "reps": {rep: float(np.mean(pred[kind][b, t] == truth[:, t])) for b, rep in enumerate(reps)}}
    return {"reps": reps, "train_scenes": train_scenes, "test_scenes": test_scenes, "n_questions": len(asked),
            "kinds": by_kind, "concepts": concepts}


# ============================================================================= the job
def _best(per_rep: Mapping[str, Mapping[str, Any]]) -> tuple[str, Mapping[str, Any]]:
    rep = max(per_rep, key=lambda r: (per_rep[r]["readout_accuracy"] or 0.0))
    return rep, per_rep[rep]


def run_surfacing(cfg: SurfacingConfig, adapter=None) -> RunResult:
    """Load the model (default: the organism), run the BLINK study (or the synthetic style triples) and, on
    the organism, the presence / count study; write `cfg.out` whole or not at all."""
    from sightline.data.blink import PAPER_NOT_SURFACED, load_blink, write_style_fixture
    from sightline.organism import checkpoint_path
    from sightline.perception.represent import Featurizer

    out = check_output(cfg.out, cfg.overwrite, UserError)
    if cfg.n is not None and cfg.n < 1:
        raise UserError(f"--n must be at least 1, not {cfg.n}")
    for name in ("train_scenes", "test_scenes", "style_triples"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}")
    kinds = QUESTION_KINDS if cfg.kinds.strip() in ("", "all") else tuple(
        k.strip() for k in cfg.kinds.split(",") if k.strip())
    bad = [k for k in kinds if k not in QUESTION_KINDS]
    if bad or not kinds:
        raise UserError(f"--kinds {cfg.kinds!r}: use all or a comma list of {', '.join(QUESTION_KINDS)}")
    organism = cfg.model is None or Path(cfg.model).expanduser().resolve() == checkpoint_path().resolve()
    if adapter is None:
        from sightline.models import load_model

        adapter = load_model(cfg.model or str(checkpoint_path()), progress=cfg.progress)
    if cfg.blink is None and not organism:
        raise UserError("--blink DIR is needed for a model other than the organism (the synthetic presence and "
                        "style questions are the organism's)")
    t0 = time.perf_counter()
    featurizer = Featurizer(adapter, _reps(adapter, cfg), batch_size=cfg.batch_size)
    subtasks = None if cfg.subtasks.strip() in ("", "all") else [s.strip() for s in cfg.subtasks.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.blink is None:
            root, source = write_style_fixture(tmp, cfg.seed, cfg.style_triples, adapter.config.vision_config.image_size,
                                               cfg.split), f"synthetic style-match triples (seed {cfg.seed})"
        else:
            root, source = cfg.blink, f"BLINK {cfg.split} ({cfg.blink})"
        qs = load_blink(root, subtasks, cfg.split, cfg.n)
        blink = score_blink(adapter, featurizer, qs, cfg.max_new_tokens, cfg.progress)
    study = None
    if organism and cfg.organism_questions:
        study = organism_study(adapter, featurizer, cfg.seed, cfg.train_scenes, cfg.test_scenes, cfg.batch_size,
                               min(cfg.max_new_tokens, 4), kinds, cfg.progress)
    summary: dict[str, Any] = {"out": str(out), "model": adapter.name, "blink_source": source, "subtasks": {},
                               "organism": None, "warnings": []}
    for subtask, e in blink.items():
        s = {k: e.get(k) for k in ("n", "answer_accuracy", "unparsed", "chance", "note")}
        if e.get("readout"):
            rep, best = _best(e["readout"])
            s.update(best_rep=rep, readout_accuracy=best["readout_accuracy"],
                     present_not_surfaced=best["present_not_surfaced"])
        s["paper_not_surfaced"] = PAPER_NOT_SURFACED.get(subtask)
        summary["subtasks"][subtask] = s
        if e.get("unparsed") and e["n"] and e["unparsed"] / e["n"] > 0.5:
            summary["warnings"].append(f"{subtask}: {e['unparsed']} of {e['n']} answers name no choice (counted wrong)")
    if study is not None:
        org = {}
        for kind, k in study["kinds"].items():
            rep, best = _best(k["reps"])
            org[kind] = {"n": k["n"], "answer_accuracy": k["answer_accuracy"], "majority": k["majority"],
                         "best_rep": rep, "readout_accuracy": best["readout_accuracy"],
                         "present_not_surfaced": best["present_not_surfaced"]}
        summary["organism"] = org
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    with RunFolder(out, overwrite=cfg.overwrite) as tmp:
        write_json(tmp / "config.json", to_dict(cfg))
        write_json(tmp / "results.json", {"summary": summary, "blink": blink, "organism": study})
        from sightline.report.surfacing import write_surfacing_page

        write_surfacing_page(tmp, summary, blink, study)
    return RunResult(out, summary)

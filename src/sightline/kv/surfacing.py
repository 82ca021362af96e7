"""Perception that never reaches the answer: where a readout of the image representations is right and the
model's own answer is wrong ("present, not surfaced"; Liu et al. 2025, 33.3% of BLINK Art Style questions).

Two studies, each per question type and per representation (values.L by default, every layer):

- **Multiple choice (BLINK's layout, `sightline.data.blink`).** The model answers each question from one
  prompt holding all its images (the family's chat template: the images in order, then BLINK's prompt),
  greedy; the choice is parsed from the generation (`parse_choice`: "(B)", a leading "B", or the one choice
  text it contains; anything else is unparsed and counts as wrong). Each image is run through the model
  ALONE (so its values see no other image) and read in one of three ways (`readout_kind`):
  "similarity" (`SIMILARITY_SUBTASKS`: Art Style, Visual Similarity): the candidate image (image_2, ...)
  whose mean-pooled features are most cosine-similar to the reference's (image_1);
  "matched", no training either: for the correspondence subtasks the drawn point (sidecar file, else read
  from the pixels: `sightline.data.blink.marker_points`) whose token's features are most cosine-similar to
  the reference point's token (`correspondence_choice`); for Multi-view the sign of the median horizontal
  shift of mutually nearest tokens between the two frames (`view_shift`, `direction_choice`);
  "probe", every other subtask: a logistic probe on the images' pooled features, cross-fitted over k folds
  of the subtask's own questions so that no question is scored by a probe fitted on it (`probe_readout`).
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
    """BLINK folder (ROOT/<Subtask>/<split>-*.parquet); default: with the organism, synthetic questions written
    in BLINK's layout (Art_Style, Visual_Correspondence, Multi-view_Reasoning, Counting), else none."""
    subtasks: str = "all"
    """BLINK subtasks: all (every one found) or a comma list (Art_Style,Visual_Similarity)."""
    split: str = "val"
    """BLINK split (the test split hides its answers)."""
    n: int | None = None
    """At most this many questions per BLINK subtask (default: all)."""
    style_triples: int = 60
    """Synthetic questions per subtask when --blink is not given (organism only): style-match triples,
    correspondence pairs, view pairs, counting scenes."""
    folds: int = 5
    """Folds of the cross-fitted probe that reads the subtasks without a training-free readout."""
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
    return answer_batch(adapter, [images], [text], max_new_tokens)[0]


@torch.no_grad()
def answer_batch(adapter, image_lists: Sequence[Sequence], texts: Sequence[str], max_new_tokens: int = 12) -> list[str]:
    """Greedy answers (decoded, stripped, case kept) to one prompt per question: its images in order, then its
    text, in the family's chat template (one image: `adapter.render_prompt`); one left-padded batch
    (`sightline.kv.block.left_padded`), which may mix numbers of images."""
    from sightline.kv.block import left_padded
    from sightline.organism.evaluate import greedy_answers

    batch = [list(ims) if len(ims) > 1 else ims[0] for ims in image_lists]
    inputs, _, _ = left_padded(adapter, batch, list(texts))
    return greedy_answers(adapter, inputs, max_new_tokens, lower=False)


# ============================================================================= features
def _pool(feats: Sequence) -> dict[str, np.ndarray]:
    """{rep: [n_images, D] float32}: the image tokens' features of each ImageFeatures, mean-pooled."""
    out: dict[str, list[np.ndarray]] = defaultdict(list)
    for f in feats:
        for rep, t in f.feats.items():
            out[rep].append(t.float().mean(0).numpy())
    return {rep: np.stack(v).astype(np.float32) for rep, v in out.items()}


def pooled_features(featurizer, images: Sequence) -> dict[str, np.ndarray]:
    """{rep: [n_images, D] float32}: each image run alone, its image tokens' features mean-pooled."""
    return _pool(featurizer(list(images)))


def similarity_choice(ref_d: np.ndarray, cands_kd: np.ndarray) -> int:
    """The candidate whose feature is most cosine-similar to the reference's (first on a tie)."""
    ref = ref_d / max(float(np.linalg.norm(ref_d)), 1e-12)
    c = cands_kd / np.maximum(np.linalg.norm(cands_kd, axis=1, keepdims=True), 1e-12)
    return int(np.argmax(c @ ref))


# ============================================================================= matched readouts
def point_token(feats, xy: tuple[float, float]) -> int:
    """Row-major index, in an ImageFeatures' grid, of the token whose pixel box holds (x, y) of the original
    image; -1 where no token does."""
    from sightline.models.layout import point_to_token

    pos = point_to_token(feats.layout, xy, feats.image, feats.view)
    if pos < 0:
        return -1
    hit = np.flatnonzero(feats.layout.grid_positions(feats.image, feats.view).reshape(-1) == pos)
    return int(hit[0]) if hit.size else -1


def correspondence_choice(ref_feats, ref_xy: tuple[float, float], cand_feats, cands_xy: Sequence, rep: str
                          ) -> int | None:
    """The candidate point whose token's `rep` feature is most cosine-similar to the reference point's
    (`sightline.perception.readouts.nearest_neighbours` over the candidates' tokens; the first on a tie, so
    two candidates under one token go to the earlier); None when a point lies under no token."""
    from sightline.perception.readouts import nearest_neighbours

    i = point_token(ref_feats, ref_xy)
    js = [point_token(cand_feats, q) for q in cands_xy]
    if i < 0 or min(js) < 0:
        return None
    x, y = ref_feats.feats[rep], cand_feats.feats[rep]
    return int(nearest_neighbours(x[i:i + 1], y[torch.as_tensor(js)])[0])


def _centres_x(grid) -> np.ndarray:
    """Token box centres along x as a fraction of the image's width, [rows * cols] row-major."""
    b = grid.boxes().reshape(-1, 4).astype(np.float64)
    return (b[:, 0] + b[:, 2]) / 2 / grid.image_size_hw[1]


def view_shift(first, second, rep: str) -> tuple[float, int]:
    """(median horizontal displacement of matched tokens from the first image to the second, in image widths
    (negative: content moved left); the number of matches). Matches are mutual nearest neighbours by cosine
    of the two images' `rep` token features, each image less its mean token (what all its tokens share)."""
    from sightline.perception.readouts import nearest_neighbours

    a, b = first.feats[rep].float(), second.feats[rep].float()
    a, b = a - a.mean(0, keepdim=True), b - b.mean(0, keepdim=True)
    ab, ba = nearest_neighbours(a, b).numpy(), nearest_neighbours(b, a).numpy()
    mutual = np.flatnonzero(ba[ab] == np.arange(len(ab)))
    if not mutual.size:
        return 0.0, 0
    dx = _centres_x(second.grid)[ab[mutual]] - _centres_x(first.grid)[mutual]
    return float(np.median(dx)), int(mutual.size)


def direction(choice: str) -> str | None:
    """The camera motion a Multi-view choice names: "left" (also "clockwise"), "right" (also
    "counter-clockwise", "anticlockwise"); None for anything else."""
    t = choice.strip().lower()
    if "counter" in t or "anti" in t:
        return "right"
    if "clockwise" in t:
        return "left"
    if "left" in t and "right" not in t:
        return "left"
    if "right" in t and "left" not in t:
        return "right"
    return None


def direction_choice(shift: float, choices: Sequence[str]) -> int | None:
    """The choice the matched content's motion picks: content moving left (shift < 0) -> "left", right ->
    "right" (a camera orbiting an object sees what lies behind it move the way the camera moves);
    None for no motion or when the choices do not name exactly one of each direction."""
    dirs = [direction(c) for c in choices]
    want = "left" if shift < 0 else "right" if shift > 0 else None
    return dirs.index(want) if want and dirs.count(want) == 1 else None


# ============================================================================= held-out probes
MIN_PROBE_QUESTIONS = 20
# L2 strengths the probe chooses from (on a validation share of its training folds): a subtask has tens to
# a few hundred questions, so weaker penalties than these only fit noise (and take long to converge)
PROBE_L2_GRID = (1.0, 1e-1, 1e-2, 1e-3)


def cross_fit_folds(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """A fold 0..k-1 for each question, stratified: each class's questions, in a seeded random order, dealt
    to the folds in turn (continuing from where the previous class stopped), so folds differ in size by
    at most one and a class of m >= k members is in every fold."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 0xF01D])
    folds = np.empty(len(labels), np.int64)
    start = 0
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        folds[idx] = (start + np.arange(len(idx))) % k
        start = (start + len(idx)) % k
    return folds


def probe_labels(questions: Sequence) -> tuple[str, np.ndarray, list[list[int]]]:
    """How a probe reads a subtask's answers: ("text", labels, classes of each question's choices) when the
    answers' choice texts recur (every answer text is the answer of >= 2 questions: counts, yes/no), else
    ("index", the answer indices, [0, 1, ...] per question). A choice whose text is no class is -1."""
    texts = [q.choices[q.answer].strip().lower() for q in questions]
    names, counts = np.unique(texts, return_counts=True)
    if len(names) >= 2 and counts.min() >= 2:
        cls = {t: i for i, t in enumerate(names)}
        return "text", np.array([cls[t] for t in texts]), [[cls.get(c.strip().lower(), -1) for c in q.choices]
                                                           for q in questions]
    return "index", np.array([q.answer for q in questions]), [list(range(len(q.choices))) for q in questions]


def probe_readout(x_by_rep: Mapping[str, np.ndarray], labels: np.ndarray, choice_classes: Sequence[Sequence[int]],
                  k: int = 5, seed: int = 0) -> tuple[dict[str, list[int | None]], np.ndarray]:
    """Cross-fitted probe choices: ({rep: each question's chosen choice index}, folds). For each fold, a
    `LogisticProbe` is fitted on the other folds' questions (features [n, D] per rep, class labels) and picks,
    among each held-out question's choices, the one whose class it finds most probable; no question is
    scored by a probe that saw it."""
    from sightline.probes.linear import LogisticProbe

    labels = np.asarray(labels)
    n_classes = int(labels.max()) + 1
    folds = cross_fit_folds(labels, k, seed)
    out: dict[str, list[int | None]] = {rep: [None] * len(labels) for rep in x_by_rep}
    by_width: dict[int, list[str]] = defaultdict(list)  # reps of one width are fitted as one batch
    for rep, x in x_by_rep.items():
        by_width[x.shape[1]].append(rep)
    for f in range(k):
        test, train = np.flatnonzero(folds == f), np.flatnonzero(folds != f)
        if not test.size:
            continue
        for reps in by_width.values():
            x = torch.from_numpy(np.stack([x_by_rep[r] for r in reps]))  # [B, n, D]
            probe = LogisticProbe(PROBE_L2_GRID, seed=seed, device="cpu").fit(x[:, train], labels[train],
                                                                               n_classes=n_classes)
            proba = probe.predict_proba(x[:, test]).reshape(len(reps), len(test), n_classes).numpy()
            for rep, p_nk in zip(reps, proba):
                for row, q in zip(p_nk, test):
                    score = [row[c] if 0 <= c < n_classes else -np.inf for c in choice_classes[q]]
                    out[rep][q] = int(np.argmax(score)) if np.isfinite(max(score)) else None
    return out, folds


# ============================================================================= BLINK
def readout_kind(subtask: str) -> str:
    """How a BLINK subtask is read from the image representations: "similarity" (pooled images against the
    reference), "matched" (tokens under drawn points, or matched between two views) or "probe" (cross-fitted
    on the subtask's own questions)."""
    from sightline.data.blink import (
        CORRESPONDENCE_SUBTASKS,
        MULTIVIEW_SUBTASKS,
        SIMILARITY_SUBTASKS,
    )

    if subtask in SIMILARITY_SUBTASKS:
        return "similarity"
    if subtask in CORRESPONDENCE_SUBTASKS or subtask in MULTIVIEW_SUBTASKS:
        return "matched"
    return "probe"


def _reps(adapter, cfg: SurfacingConfig) -> list:
    from sightline.perception.represent import parse_reps

    bad = [r for r in cfg.reps for r in str(r).split(",") if r.strip().split(".")[0] in ("vision", "encoder")]
    if bad:
        raise UserError(f"--reps {bad[0]}: surfacing reads the language model's representations (values, keys, "
                        "resid, projector)")
    return parse_reps(cfg.reps, cfg.layers, "concat", n_layers=adapter.n_layers, n_kv_heads=adapter.n_kv_heads,
                      n_vision_layers=adapter.n_vision_layers, kv_layers=adapter.kv_layers)


def _matched(subtask: str, q, images: list, feats: list, item: dict[str, Any]) -> None:
    """The matched readout of one question into `item` ("readout" per rep, the points or shifts used), or
    "no_readout" with the reason."""
    from sightline.data.blink import CORRESPONDENCE_SUBTASKS, marker_points

    if len(feats) < 2:
        item["no_readout"] = "fewer than two images"
        return
    if subtask in CORRESPONDENCE_SUBTASKS:
        points, why = (q.points, "") if q.points else marker_points(images, len(q.choices))
        if points is None:
            item["no_readout"] = why
            return
        item["points"] = {"ref": [round(float(v), 2) for v in points["ref"]],
                          "choices": [[round(float(v), 2) for v in c] for c in points["choices"]],
                          "source": "sidecar" if q.points else "markers"}
        item["readout"] = {rep: correspondence_choice(feats[0], points["ref"], feats[1], points["choices"], rep)
                           for rep in feats[0].feats}
        return
    shifts = {rep: view_shift(feats[0], feats[1], rep) for rep in feats[0].feats}
    item["shift"] = {rep: round(v, 4) for rep, (v, _) in shifts.items()}
    item["readout"] = {rep: direction_choice(v, q.choices) for rep, (v, _) in shifts.items()}


def score_blink(adapter, featurizer, questions: Mapping[str, Sequence], max_new_tokens: int = 12,
                progress: bool = False, folds: int = 5, seed: int = 0, batch_size: int = 8) -> dict[str, dict[str, Any]]:
    """Per subtask: every question's generated answer and parsed choice, the readout's choice per rep
    (`readout_kind`: "similarity", "matched" or "probe", cross-fitted over `folds`), then `surface` per rep
    over the questions the readout scored (a readout that abstains counts as wrong). Questions without an
    answer are skipped. The answers are generated `batch_size` questions at a time (`answer_batch`)."""
    from tqdm.auto import tqdm

    out: dict[str, dict[str, Any]] = {}
    for subtask, qs in questions.items():
        qs = [q for q in qs if q.answer is not None]
        if not qs:
            out[subtask] = {"n": 0, "readout_kind": readout_kind(subtask),
                            "note": "no question with a known answer (the test split hides them)"}
            continue
        kind = readout_kind(subtask)
        items, pooled = [], []
        bar = tqdm(total=len(qs), desc=subtask, disable=not progress, dynamic_ncols=True)
        step = max(1, batch_size)
        for start in range(0, len(qs), step):  # each question's images are read once, for answer and readout
            chunk = qs[start:start + step]
            chunk_images = [q.images() for q in chunk]
            answers = answer_batch(adapter, chunk_images, [q.prompt for q in chunk], max_new_tokens)
            for q, images, generated in zip(chunk, chunk_images, answers):
                items.append(_blink_item(subtask, kind, q, images, generated, featurizer, pooled))
            bar.update(len(chunk))
        bar.close()
        entry: dict[str, Any] = {
            "n": len(items), "readout_kind": kind,
            "answer_accuracy": float(np.mean([it["answer_correct"] for it in items])),
            "unparsed": int(sum(it["parsed"] is None for it in items)),
            "chance": float(np.mean([1 / len(q.choices) for q in qs])), "readout": None, "items": items}
        if kind == "probe":
            _probe_subtask(qs, items, pooled, entry, folds, seed)
        scored = [it for it in items if "readout" in it]
        if scored:
            entry["n_readout"] = len(scored)
            answer_ok = np.array([it["answer_correct"] for it in scored])
            entry["readout"] = {rep: surface(np.array([it["readout"][rep] == it["answer"] for it in scored]), answer_ok)
                                for rep in scored[0]["readout"]}
        missing = [it["no_readout"] for it in items if "no_readout" in it]
        if missing and "note" not in entry:
            entry["note"] = f"no readout for {len(missing)} of {len(items)} questions (first: {missing[0]})"
        out[subtask] = entry
    return out


def _blink_item(subtask: str, kind: str, q, images: Sequence, generated: str, featurizer,
                pooled: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """One question scored: its parsed answer and the readout's choice per rep (a "probe" subtask's pooled
    features are appended to `pooled` for the cross-fit)."""
    from sightline.data.blink import parse_choice

    chosen = parse_choice(generated, q.choices)
    item: dict[str, Any] = {"id": q.id, "answer": q.answer, "generated": generated, "parsed": chosen,
                            "answer_correct": chosen == q.answer}
    feats = featurizer(images)
    if kind == "similarity":
        if len(images) == len(q.choices) + 1:
            item["readout"] = {rep: similarity_choice(v[0], v[1:]) for rep, v in _pool(feats).items()}
        else:
            item["no_readout"] = (f"{len(images)} images for {len(q.choices)} choices (one per choice after the "
                                  "reference expected)")
    elif kind == "matched":
        _matched(subtask, q, images, feats, item)
    else:
        pooled.append(_pool(feats))
    return item


def _probe_subtask(qs: Sequence, items: list[dict[str, Any]], pooled: list[dict[str, np.ndarray]],
                   entry: dict[str, Any], folds: int, seed: int) -> None:
    """Cross-fit the probe of one subtask into `items` ("readout", "fold") and `entry` ("labels", "folds"), or
    say in `entry["note"]` why there is none. A question's features: its images' pooled features, concatenated
    in order; questions with other than the subtask's usual number of images are left out."""
    n_images = [len(next(iter(p.values()))) for p in pooled]
    usual = max(set(n_images), key=n_images.count)
    keep = [i for i, m in enumerate(n_images) if m == usual]
    sub = [qs[i] for i in keep]
    mode, labels, choice_classes = probe_labels(sub)
    _, counts = np.unique(labels, return_counts=True)
    if len(sub) < MIN_PROBE_QUESTIONS or len(counts) < 2 or counts.min() < 2:
        entry["note"] = (f"too few questions for a probe: {len(sub)} with {usual} image(s) (a probe needs at least "
                         f"{MIN_PROBE_QUESTIONS}, and every answer at least twice; the rarest is given "
                         f"{counts.min()} time(s))")
        return
    x = {rep: np.stack([pooled[i][rep].reshape(-1) for i in keep]) for rep in pooled[0]}
    choice, fold = probe_readout(x, labels, choice_classes, folds, seed)
    for j, i in enumerate(keep):
        items[i]["readout"] = {rep: choice[rep][j] for rep in x}
        items[i]["fold"] = int(fold[j])
    entry.update(labels=mode, folds=folds, n_classes=len(counts))
    if len(keep) < len(items):
        entry["note"] = f"{len(items) - len(keep)} questions with other than {usual} image(s) left out of the probe"


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
    from sightline.data.blink import PAPER_NOT_SURFACED, load_blink
    from sightline.data.blink_fixture import write_blink_fixture
    from sightline.organism import checkpoint_path
    from sightline.perception.represent import Featurizer

    out = check_output(cfg.out, cfg.overwrite, UserError)
    if cfg.n is not None and cfg.n < 1:
        raise UserError(f"--n must be at least 1, not {cfg.n}")
    if cfg.folds < 2:
        raise UserError(f"--folds must be at least 2, not {cfg.folds}")
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
            from sightline.data.blink_fixture import FIXTURE_SUBTASKS

            wanted = tuple(t for t in FIXTURE_SUBTASKS if subtasks is None or t in subtasks)
            if not wanted:
                raise UserError(f"--subtasks {cfg.subtasks!r}: the synthetic questions (no --blink) are "
                                f"{', '.join(FIXTURE_SUBTASKS)}")
            root = write_blink_fixture(tmp, cfg.seed, cfg.style_triples, adapter.config.vision_config.image_size,
                                       cfg.split, subtasks=wanted)
            source = f"synthetic BLINK-layout questions (seed {cfg.seed})"
        else:
            root, source = cfg.blink, f"BLINK {cfg.split} ({cfg.blink})"
        qs = load_blink(root, subtasks, cfg.split, cfg.n)
        blink = score_blink(adapter, featurizer, qs, cfg.max_new_tokens, cfg.progress, cfg.folds, cfg.seed,
                            cfg.batch_size)
    study = None
    if organism and cfg.organism_questions:
        study = organism_study(adapter, featurizer, cfg.seed, cfg.train_scenes, cfg.test_scenes, cfg.batch_size,
                               min(cfg.max_new_tokens, 4), kinds, cfg.progress)
    summary: dict[str, Any] = {"out": str(out), "model": adapter.name, "blink_source": source, "subtasks": {},
                               "organism": None, "warnings": []}
    for subtask, e in blink.items():
        s = {k: e.get(k) for k in ("n", "readout_kind", "answer_accuracy", "unparsed", "chance", "n_readout", "note")}
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

"""Language about scenes: referring expressions (with an evaluator that is the test oracle), questions
with closed-vocabulary answers, and captions, all generated from a scene's facts.

Spatial words use object centres and a margin of MARGIN_FRACTION of the image's shorter side:
- "X on the left": among the objects matching X, the one whose centre is left of every other
  match's by more than the margin; a lone match must lie left of the image's middle by the margin.
  Likewise "on the right", "at the top", "at the bottom".
- "X above Y": Y must resolve to exactly one object L; X's centre is higher than L's by more than
  the margin and by at least the horizontal offset (a 90-degree cone). Likewise "below",
  "to the left of", "to the right of".
- Position answers ("left"/"right", "top"/"bottom") are given only when the centre is off the
  image's middle by more than the margin.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from sightline.data.synthetic.layout import rng_for
from sightline.data.synthetic.render import Scene, SceneObject
from sightline.data.synthetic.vocab import COLOURS, NUMBERS, QTYPES, SHAPES, SIZES, plural

__all__ = [
    "LOCATIONS",
    "MARGIN_FRACTION",
    "MIN_SEEN",
    "RELATIONS",
    "Question",
    "RefExp",
    "caption",
    "parse_refexp",
    "questions",
    "referring_expressions",
    "resolve",
]

MARGIN_FRACTION = 0.08
# An object showing less than this fraction of itself (possible in clips and pairs) makes counts,
# presence and captions ambiguous: such scenes get none of those questions.
MIN_SEEN = 0.25
LOCATIONS: dict[str, str] = {"left": "on the left", "right": "on the right", "top": "at the top",
                             "bottom": "at the bottom"}
RELATIONS: dict[str, str] = {"above": "above", "below": "below", "left_of": "to the left of",
                             "right_of": "to the right of"}
_ATTRIBUTES = ("size", "colour", "shape")  # the order words take in a phrase
# attribute subsets from fewest to most; at equal count, those naming the shape first
_COMBOS: tuple[tuple[str, ...], ...] = (("shape",), ("colour",), ("size",), ("colour", "shape"),
                                        ("size", "shape"), ("size", "colour"), ("size", "colour", "shape"))


@dataclass(frozen=True)
class RefExp:
    """A referring expression: "the [size] [colour] shape|object [location | relation landmark]"."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    location: str | None = None  # a key of LOCATIONS
    relation: str | None = None  # a key of RELATIONS; needs a landmark
    landmark: RefExp | None = None

    @property
    def kind(self) -> str:
        """'relation', 'location' or 'attribute'."""
        return "relation" if self.relation else ("location" if self.location else "attribute")

    @property
    def text(self) -> str:
        words = ["the"] + [w for w in (self.size, self.colour) if w] + [self.shape or "object"]
        if self.location:
            words.append(LOCATIONS[self.location])
        if self.relation:
            assert self.landmark is not None
            words += [RELATIONS[self.relation], self.landmark.text]
        return " ".join(words)

    def __str__(self) -> str:
        return self.text


def parse_refexp(text: str) -> RefExp:
    """The RefExp that `text` spells (inverse of RefExp.text); ValueError if it is not in the grammar."""
    words = text.strip().rstrip("?.").lower().split()
    expr, rest = _parse(words, text)
    if rest:
        raise ValueError(f"unexpected words {' '.join(rest)!r} in referring expression {text!r}")
    return expr


def _parse(words: list[str], text: str) -> tuple[RefExp, list[str]]:
    if not words or words[0] != "the":
        raise ValueError(f"referring expression {text!r} must start with 'the'")
    i = 1
    values: dict[str, str | None] = {"size": None, "colour": None, "shape": None}
    if i < len(words) and words[i] in SIZES:
        values["size"] = words[i]
        i += 1
    if i < len(words) and words[i] in COLOURS:
        values["colour"] = words[i]
        i += 1
    if i < len(words) and (words[i] in SHAPES or words[i] == "object"):
        values["shape"] = None if words[i] == "object" else words[i]
        i += 1
    else:
        raise ValueError(f"referring expression {text!r} needs a shape or 'object' after its adjectives")
    rest = words[i:]
    for key, phrase in LOCATIONS.items():
        if rest[:len(phrase.split())] == phrase.split():
            return RefExp(**values, location=key), rest[len(phrase.split()):]
    for key, phrase in RELATIONS.items():
        if rest[:len(phrase.split())] == phrase.split():
            landmark, tail = _parse(rest[len(phrase.split()):], text)
            return RefExp(**values, relation=key, landmark=landmark), tail
    return RefExp(**values), rest


def _margin(scene: Scene) -> float:
    return MARGIN_FRACTION * min(scene.size_hw)


def _has(obj: SceneObject, expr: RefExp) -> bool:
    return ((expr.shape is None or obj.shape == expr.shape) and (expr.colour is None or obj.colour == expr.colour)
            and (expr.size is None or obj.size == expr.size))


def _key(obj: SceneObject, location: str) -> float:
    """A coordinate that is smaller the more `obj` lies towards `location`."""
    x, y = obj.centre
    return {"left": x, "right": -x, "top": y, "bottom": -y}[location]


def _relation_holds(a: SceneObject, b: SceneObject, relation: str, margin: float) -> bool:
    """Whether `a` is `relation` `b` (a above b, ...), per the module's rule."""
    dx = b.centre[0] - a.centre[0]  # > 0: a is left of b
    dy = b.centre[1] - a.centre[1]  # > 0: a is above b
    lead, cross = {"above": (dy, dx), "below": (-dy, dx), "left_of": (dx, dy), "right_of": (-dx, dy)}[relation]
    return lead > margin and lead >= abs(cross)


def resolve(scene: Scene, expr: RefExp | str) -> list[int]:
    """Indices of the visible objects that `expr` describes; a good referring expression gives one."""
    if isinstance(expr, str):
        expr = parse_refexp(expr)
    margin = _margin(scene)
    matches = [o for o in scene.objects if o.area > 0 and _has(o, expr)]
    if expr.location is not None:
        loc = expr.location
        if len(matches) == 1:
            (only,) = matches
            middle = {"left": scene.width / 2, "right": -scene.width / 2,
                      "top": scene.height / 2, "bottom": -scene.height / 2}[loc]
            matches = [only] if _key(only, loc) < middle - margin else []
        else:
            matches = [o for o in matches
                       if all(_key(o, loc) < _key(p, loc) - margin for p in matches if p is not o)]
    if expr.relation is not None:
        if expr.landmark is None:
            raise ValueError(f"relation {expr.relation!r} without a landmark")
        landmarks = resolve(scene, expr.landmark)
        if len(landmarks) != 1:
            return []
        landmark = scene.objects[landmarks[0]]
        matches = [o for o in matches if o is not landmark
                   and _relation_holds(o, landmark, expr.relation, margin)]
    return [o.index for o in matches]


def _attribute_exprs(obj: SceneObject, without: str | None = None) -> list[RefExp]:
    """Attribute-only descriptions of `obj`, fewest attributes first, optionally never naming `without`."""
    return [RefExp(**{a: getattr(obj, a) for a in combo}) for combo in _COMBOS if without not in combo]


def _unique(scene: Scene, expr: RefExp, index: int) -> bool:
    return resolve(scene, expr) == [index]


def _first_unique(scene: Scene, exprs: Sequence[RefExp], index: int) -> RefExp | None:
    return next((e for e in exprs if _unique(scene, e, index)), None)


def _describe(scene: Scene, obj: SceneObject) -> dict[str, RefExp]:
    """The referring expressions of one object: 'attribute' (fewest attributes that single it out),
    'location' (a base that alone is ambiguous, plus a location), 'relation' (its shape, or colour
    and shape, related to a landmark that has a unique attribute description)."""
    found: dict[str, RefExp] = {}
    attribute = _first_unique(scene, _attribute_exprs(obj), obj.index)
    if attribute is not None:
        found["attribute"] = attribute
    for base in _attribute_exprs(obj):
        if base.shape is None or len(resolve(scene, base)) < 2:
            continue
        located = _first_unique(scene, [replace(base, location=loc) for loc in LOCATIONS], obj.index)
        if located is not None:
            found["location"] = located
            break
    margin = _margin(scene)
    for other in scene.objects:
        if other is obj or other.area == 0 or "relation" in found:
            continue
        landmark = _first_unique(scene, _attribute_exprs(other), other.index)
        if landmark is None:
            continue
        for relation in RELATIONS:
            if not _relation_holds(obj, other, relation, margin):
                continue
            bases = (RefExp(shape=obj.shape), RefExp(shape=obj.shape, colour=obj.colour))
            related = _first_unique(scene, [replace(b, relation=relation, landmark=landmark) for b in bases],
                                    obj.index)
            if related is not None:
                found["relation"] = related
                break
    return found


def referring_expressions(scene: Scene, kinds: Sequence[str] = ("attribute", "location", "relation"),
                          ) -> list[tuple[str, int]]:
    """(expression, object index) pairs; each expression resolves to exactly that one object."""
    out = []
    for obj in scene.objects:
        if obj.area == 0:
            continue
        for kind, expr in _describe(scene, obj).items():
            if kind in kinds:
                assert _unique(scene, parse_refexp(expr.text), obj.index), expr.text
                out.append((expr.text, obj.index))
    return out


@dataclass(frozen=True)
class Question:
    """A question about a scene with its short answer; `object` is the object it is about, if one."""

    question: str
    answer: str
    qtype: str  # one of QTYPES
    object: int | None = None

    def to_json(self) -> dict:
        return {"question": self.question, "answer": self.answer, "qtype": self.qtype, "object": self.object}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(obj: SceneObject) -> str:
    return f"a {obj.size} {obj.colour} {obj.shape}"  # sizes start with a consonant


def caption(scene: Scene) -> str:
    """'a small red triangle and a large blue circle': the visible objects from left to right."""
    parts = [_phrase(o) for o in sorted((o for o in scene.objects if o.area > 0), key=lambda o: (o.centre[0], o.index))]
    if not parts:
        return "nothing"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _sided(scene: Scene, obj: SceneObject) -> list[tuple[str, str]]:
    """(question suffix, answer) for the halves the object is clearly in."""
    margin = _margin(scene)
    x, y = obj.centre
    out = []
    if abs(x - scene.width / 2) > margin:
        out.append(("on the left or the right", "left" if x < scene.width / 2 else "right"))
    if abs(y - scene.height / 2) > margin:
        out.append(("at the top or the bottom", "top" if y < scene.height / 2 else "bottom"))
    return out


def questions(scene: Scene, qtypes: Sequence[str] = QTYPES) -> list[Question]:
    """Every question of these types whose answer the scene settles, in a fixed order.

    Presence questions come in yes/no pairs (one present, one absent), so they are balanced. Counts,
    presence and captions are about the visible objects, and are skipped when one is barely visible."""
    bad = [q for q in qtypes if q not in QTYPES]
    if bad:
        raise ValueError(f"unknown question types {bad}: use {list(QTYPES)}")
    rng = rng_for(scene.seed if scene.seed is not None else 0, "questions")
    present = [o for o in scene.objects if o.area > 0]
    faint = any(o.visible_fraction < MIN_SEEN for o in present)
    out: list[Question] = []
    for qtype in qtypes:
        if faint and qtype in ("count", "presence", "caption"):
            continue
        if qtype == "shape":
            if len(present) == 1:
                out.append(Question("What shape is shown?", present[0].shape, qtype, present[0].index))
            else:
                for o in present:
                    e = _first_unique(scene, _attribute_exprs(o, without="shape"), o.index)
                    if e is not None:
                        out.append(Question(f"What shape is {e.text}?", o.shape, qtype, o.index))
        elif qtype in ("colour", "size"):
            for o in present:
                e = _first_unique(scene, _attribute_exprs(o, without=qtype), o.index)
                if e is not None:
                    out.append(Question(f"What {qtype} is {e.text}?", getattr(o, qtype), qtype, o.index))
        elif qtype == "position":
            for o in present:
                e = _first_unique(scene, _attribute_exprs(o), o.index)
                if e is not None:
                    for suffix, answer in _sided(scene, o):
                        out.append(Question(f"Is {e.text} {suffix}?", answer, qtype, o.index))
        elif qtype == "count":
            out += _count_questions(present, rng)
        elif qtype == "presence":
            out += _presence_questions(present, rng)
        elif qtype == "caption":
            out.append(Question("Describe the image.", caption(scene), qtype))
        elif qtype == "refexp":
            for text, index in referring_expressions(scene, kinds=("location", "relation")):
                expr, obj = parse_refexp(text), scene.objects[index]
                asked = next(a for a in ("colour", "shape", "size") if getattr(expr, a) is None)
                out.append(Question(f"What {asked} is {text}?", getattr(obj, asked), qtype, index))
    return out


def _count_questions(present: list[SceneObject], rng: np.random.Generator) -> list[Question]:
    out = [Question("How many objects are there?", NUMBERS[len(present)], "count")]
    shapes = sorted({o.shape for o in present}, key=SHAPES.index)
    colours = sorted({o.colour for o in present}, key=COLOURS.index)
    for shape in shapes:
        n = sum(o.shape == shape for o in present)
        out.append(Question(f"How many {plural(shape)} are there?", NUMBERS[n], "count"))
    absent = [s for s in SHAPES if s not in shapes]
    if absent:
        shape = str(rng.choice(absent))
        out.append(Question(f"How many {plural(shape)} are there?", NUMBERS[0], "count"))
    for colour in colours:
        n = sum(o.colour == colour for o in present)
        out.append(Question(f"How many {colour} objects are there?", NUMBERS[n], "count"))
    return out


def _presence_questions(present: list[SceneObject], rng: np.random.Generator) -> list[Question]:
    """Three yes/no pairs: a shape, a colour, a colour-and-shape; one present and one absent each."""
    out = []
    families = (
        ([(o.shape,) for o in present], [(s,) for s in SHAPES]),
        ([(o.colour,) for o in present], [(c,) for c in COLOURS]),
        ([(o.colour, o.shape) for o in present], list(itertools.product(COLOURS, SHAPES))),
    )
    for have, universe in families:
        have_set = sorted(set(have), key=universe.index)
        absent = [u for u in universe if u not in have_set]
        if not have_set or not absent:
            continue
        yes = have_set[int(rng.integers(len(have_set)))]
        no = absent[int(rng.integers(len(absent)))]
        for words, answer in ((yes, "yes"), (no, "no")):
            noun = " ".join(words) if len(words) == 2 or words[0] in SHAPES else f"{words[0]} object"
            out.append(Question(f"Is there {_article(noun)} {noun}?", answer, "presence"))
    return out

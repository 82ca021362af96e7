"""BLINK (Fu et al. 2024) as Hugging Face ships it: a parquet file per subtask and split, read as is.

Layout (BLINK-Benchmark/BLINK on the Hub; `huggingface-cli download --repo-type dataset` keeps it)::

    ROOT/<Subtask>/<split>-00000-of-00001.parquet      e.g. ROOT/Art_Style/val-00000-of-00001.parquet
         columns: idx (str), question (str), sub_task (str), image_1 .. image_4 (HF image structs
         {bytes, path}, or null where a question has fewer images; a path string also works),
         choices (list of str, without letters: ["the second image", "the third image"]),
         answer ("(A)", "(B)", ...; "hidden" on the test split), prompt (the full question with its
         lettered choices), explanation

`load_blink(root)` gives `BlinkQuestion`s per subtask (images decoded lazily); `parse_choice` reads the
chosen letter from a generated answer; `write_style_fixture` writes style-match triples from the
synthetic world in the same layout (subtask Art_Style: which of two images has the reference's style).
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from sightline.errors import UserError

IMAGE_COLUMNS = ("image_1", "image_2", "image_3", "image_4")
REQUIRED_COLUMNS = ("question", "choices", "answer", "image_1")
LETTERS = "ABCDEFGHIJ"
# Subtasks whose question is "which candidate is most like the reference (image_1)": the choices are the
# images after the first, in order, so a similarity readout between image representations can answer them.
SIMILARITY_SUBTASKS = ("Art_Style", "Visual_Similarity")
# The paper's figure: share of Art Style questions the representations get right and the answer gets wrong.
PAPER_NOT_SURFACED = {"Art_Style": 0.333}


@dataclass
class BlinkQuestion:
    """One multiple-choice question: its images (loaded on demand), text, choices and answer index."""

    id: str
    subtask: str
    question: str
    choices: list[str]
    answer: int | None  # index into choices; None when the split hides it
    prompt: str  # the full prompt: BLINK's `prompt`, else the question with lettered choices
    image_loaders: list[Callable[[], Image.Image]] = field(repr=False, default_factory=list)

    @property
    def n_images(self) -> int:
        """How many images the question shows."""
        return len(self.image_loaders)

    def images(self) -> list[Image.Image]:
        """The question's images, decoded (RGB)."""
        return [load() for load in self.image_loaders]


def answer_index(answer: Any, n_choices: int) -> int | None:
    """The choice index of a BLINK answer ("(A)", "A", "(b)"); None for a hidden answer ("hidden", "", None)."""
    text = "" if answer is None else str(answer).strip()
    m = re.fullmatch(r"\(?\s*([A-Za-z])\s*\)?", text)
    if not m:
        return None
    k = LETTERS.find(m.group(1).upper())
    return k if 0 <= k < n_choices else None


def lettered_prompt(question: str, choices: Sequence[str]) -> str:
    """The question followed by its choices as BLINK writes them: "(A) ...", one a line."""
    lines = [question.strip(), "Select from the following choices."]
    lines += [f"({LETTERS[k]}) {c}" for k, c in enumerate(choices)]
    return "\n".join(lines)


def parse_choice(text: str, choices: Sequence[str]) -> int | None:
    """The choice a generated answer picks, or None when it picks none or several.

    In order: a parenthesised letter "(B)" or "(b)" (the first one); else a capital letter standing alone at
    the start ("B", "B.", "B)", "B:"; a lower-case "a" there is an article); else the one choice whose text
    the answer contains (case-insensitive; a choice contained in another contained choice does not count).
    Letters past the number of choices are not choices.
    """
    t = (text or "").strip()
    n = len(choices)
    m = re.search(r"\(\s*([A-Za-z])\s*\)", t)
    if m and LETTERS.find(m.group(1).upper()) in range(n):
        return LETTERS.find(m.group(1).upper())
    m = re.match(r"([A-Z])(?:[\s.):,]|$)", t)
    if m and LETTERS.find(m.group(1)) in range(n):
        return LETTERS.find(m.group(1))
    low = t.lower()
    hits = [k for k, c in enumerate(choices) if c.strip() and c.strip().lower() in low]
    hits = [k for k in hits if not any(j != k and choices[k].strip().lower() in choices[j].strip().lower()
                                       for j in hits)]
    return hits[0] if len(hits) == 1 else None


@functools.lru_cache(maxsize=4)
def _column(path: str, column: str) -> list:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=[column]).column(0).to_pylist()


def _image(path: str, column: str, row: int) -> Image.Image:
    value = _column(path, column)[row]
    try:
        if isinstance(value, dict):
            if value.get("bytes"):
                return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
            value = value.get("path")
        where = Path(value)
        if not where.is_absolute():
            where = Path(path).parent / where
        return Image.open(where).convert("RGB")
    except (OSError, TypeError, ValueError) as err:
        raise UserError(f"cannot read {column} of row {row} of {path} ({type(err).__name__}): the file is damaged; "
                        "download it again") from None


def blink_files(root: str | os.PathLike, split: str = "val") -> dict[str, Path]:
    """{subtask: parquet file} for one split: ROOT/<Subtask>/<split>-*.parquet (or ROOT/<split>-*.parquet
    for a single subtask's folder); UserError when there is none."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"BLINK folder {root} does not exist: give the folder that holds Art_Style/, Counting/, ... "
                        "(huggingface-cli download BLINK-Benchmark/BLINK --repo-type dataset --local-dir DIR)")
    out: dict[str, Path] = {}
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        files = sorted(folder.glob(f"{split}-*.parquet"))
        if files:
            out[folder.name] = files[0]
    if not out:
        raise UserError(f"no BLINK parquet files for split {split!r} in {root}: expected "
                        f"{root}/<Subtask>/{split}-00000-of-00001.parquet")
    return out


def load_blink(root: str | os.PathLike, subtasks: Sequence[str] | None = None, split: str = "val",
               limit: int | None = None) -> dict[str, list[BlinkQuestion]]:
    """{subtask: questions} from a BLINK folder (see the module docstring); `subtasks` None: every one
    found; `limit`: the first that many questions per subtask. One UserError line for a missing or
    malformed file."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading BLINK parquet files needs pyarrow: pip install pyarrow") from None
    files = blink_files(root, split)
    if subtasks:
        missing = [s for s in subtasks if s not in files]
        if missing:
            raise UserError(f"no BLINK subtask {missing[0]!r} (split {split}) in {root}: found "
                            f"{', '.join(sorted(files))}")
        files = {s: files[s] for s in subtasks}
    out: dict[str, list[BlinkQuestion]] = {}
    for subtask, path in files.items():
        try:
            meta = pq.ParquetFile(path)
            names = set(meta.schema_arrow.names)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
            raise UserError(f"cannot read BLINK parquet {path} ({type(err).__name__}): download it again") from None
        lacking = [c for c in REQUIRED_COLUMNS if c not in names]
        if lacking:
            raise UserError(f"malformed BLINK parquet {path}: no column {lacking[0]} (BLINK has idx, question, "
                            f"image_1..image_4, choices, answer, prompt); it has {', '.join(sorted(names))}")
        columns = [c for c in ("idx", "question", "choices", "answer", "prompt", "sub_task") if c in names]
        table = meta.read(columns=columns).to_pydict()
        img_cols = [c for c in IMAGE_COLUMNS if c in names]
        present = {c: [v is not None for v in meta.read(columns=[c]).column(0).to_pylist()] for c in img_cols}
        rows = len(table["question"])
        questions = []
        for r in range(rows if limit is None else min(rows, limit)):
            choices = table["choices"][r]
            if not isinstance(choices, (list, tuple)) or not choices:
                raise UserError(f"malformed BLINK parquet {path}: row {r}'s choices is {choices!r}, not a list of "
                                "strings")
            choices = [str(c) for c in choices]
            loaders = [functools.partial(_image, str(path), c, r) for c in img_cols if present[c][r]]
            prompt = (table.get("prompt") or [None] * rows)[r] or lettered_prompt(table["question"][r], choices)
            qid = (table.get("idx") or [None] * rows)[r] or f"{subtask}_{r}"
            questions.append(BlinkQuestion(str(qid), subtask, str(table["question"][r]), choices,
                                           answer_index(table["answer"][r], len(choices)), str(prompt), loaders))
        out[subtask] = questions
    return out


# ---------------------------------------------------------------------------------------------
# the synthetic fixture: style-match triples

STYLE_QUESTION = "Which image shares the same style as the reference image?"


def style_triples(seed: int, n: int, image_size: int = 112) -> list[dict[str, Any]]:
    """n style-match triples from the synthetic world: a reference scene in one style, a candidate in the same
    style (other objects, other background colours) and one in another style, in a random order.

    Each: {"images": [reference, candidate A, candidate B] (PIL), "answer": index of the same-style candidate,
    "styles": [the three styles]}. Reproducible from `seed`."""
    import numpy as np

    from sightline.data.synthetic import STYLES, WorldConfig, derive_seed, render_scene

    config = WorldConfig(image_size=image_size)
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 0xB1])
        style, other = (STYLES[k] for k in rng.choice(len(STYLES), 2, replace=False))
        ref = render_scene(derive_seed(seed, "blink-ref", i), config, style=style)
        same = render_scene(derive_seed(seed, "blink-same", i), config, style=style)
        diff = render_scene(derive_seed(seed, "blink-diff", i), config, style=other)
        answer = int(rng.integers(2))
        cands = [same, diff] if answer == 0 else [diff, same]
        out.append({"images": [ref.to_pil()] + [c.to_pil() for c in cands], "answer": answer,
                    "styles": [ref.style] + [c.style for c in cands]})
    return out


def write_style_fixture(root: str | os.PathLike, seed: int = 0, n: int = 40, image_size: int = 112,
                        split: str = "val") -> Path:
    """Write `style_triples(seed, n)` as BLINK's Art_Style subtask: ROOT/Art_Style/<split>-00000-of-00001.parquet
    (idx, question, sub_task, image_1..image_4 as {bytes (PNG), path} structs, image_4 null, choices
    ["the second image", "the third image"], answer "(A)"/"(B)", prompt, explanation). Returns ROOT."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("writing BLINK parquet needs pyarrow: pip install pyarrow") from None
    root = Path(root)
    folder = root / "Art_Style"
    folder.mkdir(parents=True, exist_ok=True)
    triples = style_triples(seed, n, image_size)
    choices = ["the second image", "the third image"]

    def png(im: Image.Image, name: str) -> dict:
        buf = io.BytesIO()
        im.save(buf, format="PNG")  # lossless: the "noisy" style survives
        return {"bytes": buf.getvalue(), "path": name}

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cols: dict[str, list] = {"idx": [], "question": [], "sub_task": [], "image_1": [], "image_2": [], "image_3": [],
                             "image_4": [], "choices": [], "answer": [], "prompt": [], "explanation": []}
    for i, t in enumerate(triples):
        qid = f"{split}_Art_Style_{i + 1}"
        cols["idx"].append(qid)
        cols["question"].append(STYLE_QUESTION)
        cols["sub_task"].append("Art_Style")
        for k, im in enumerate(t["images"]):
            cols[f"image_{k + 1}"].append(png(im, f"{qid}_{k + 1}.png"))
        cols["image_4"].append(None)
        cols["choices"].append(choices)
        cols["answer"].append(f"({LETTERS[t['answer']]})")
        cols["prompt"].append(lettered_prompt(STYLE_QUESTION, choices))
        cols["explanation"].append(f"styles {', '.join(t['styles'])}")
    schema = pa.schema([("idx", pa.string()), ("question", pa.string()), ("sub_task", pa.string()),
                        *[(c, image_type) for c in IMAGE_COLUMNS], ("choices", pa.list_(pa.string())),
                        ("answer", pa.string()), ("prompt", pa.string()), ("explanation", pa.string())])
    tmp = folder / f".{split}.parquet.tmp"
    pq.write_table(pa.table(cols, schema=schema), tmp)
    os.replace(tmp, folder / f"{split}-00000-of-00001.parquet")
    return root

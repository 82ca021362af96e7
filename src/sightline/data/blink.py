"""BLINK (Fu et al. 2024) as Hugging Face ships it: a parquet file per subtask and split, read as is.

Layout (BLINK-Benchmark/BLINK on the Hub; `huggingface-cli download --repo-type dataset` keeps it)::

    ROOT/<Subtask>/<split>-00000-of-00001.parquet      e.g. ROOT/Art_Style/val-00000-of-00001.parquet
         columns: idx (str), question (str), sub_task (str), image_1 .. image_4 (HF image structs
         {bytes, path}, or null where a question has fewer images; a path string also works),
         choices (list of str, without letters: ["the second image", "the third image"]),
         answer ("(A)", "(B)", ...; "hidden" on the test split), prompt (the full question with its
         lettered choices), explanation

The rows carry no point coordinates: the correspondence subtasks draw their points on the pixels (a red
circle on image_1 labelled "REF", red circles labelled A, B, C, D on image_2). `find_markers` reads them
back (red rings; the letter beside each from its glyph's holes), and a sidecar file gives them exactly
where the source annotations are known::

    ROOT/<Subtask>/<split>-points.json    {"<idx>": {"ref": [x, y], "choices": [[x, y], ...]}}
                                          (pixels of image_1 / image_2, one point per choice, in order)

`load_blink(root)` gives `BlinkQuestion`s per subtask (images decoded lazily, the sidecar's points
attached); `parse_choice` reads the chosen letter from a generated answer; `write_style_fixture` writes
style-match triples from the synthetic world in the same layout (subtask Art_Style: which of two images
has the reference's style); `sightline.data.blink_fixture` writes the other synthetic subtasks.
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
# Subtasks whose images carry a drawn reference point (image_1, "REF") and one drawn point per choice
# (image_2, "A", "B", ...): the point whose features match the reference's answers them.
CORRESPONDENCE_SUBTASKS = ("Semantic_Correspondence", "Visual_Correspondence", "Functional_Correspondence")
# Two frames of a camera moving around an object; choices "left" (clockwise) and "right" (counter-clockwise).
MULTIVIEW_SUBTASKS = ("Multi-view_Reasoning",)
# The paper's figure: share of Art Style questions the representations get right and the answer gets wrong.
PAPER_NOT_SURFACED = {"Art_Style": 0.333}
MARKER_RGB = (255, 0, 0)  # the colour the fixtures draw markers in (BLINK's are red)


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
    # drawn points from the sidecar file: {"ref": (x, y) on image_1, "choices": [(x, y) on image_2, ...]}
    points: dict[str, Any] | None = None

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


def _points_sidecar(path: Path) -> dict[str, dict[str, Any]]:
    """{idx: {"ref": (x, y), "choices": [(x, y), ...]}} from a points sidecar ({} when there is none)."""
    import json

    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read points file {path} ({type(err).__name__}): it must be JSON "
                        '{"<idx>": {"ref": [x, y], "choices": [[x, y], ...]}}') from None

    def xy(v) -> tuple[float, float]:
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(c, (int, float)) for c in v)):
            raise ValueError(v)
        return float(v[0]), float(v[1])

    out = {}
    for qid, entry in (raw.items() if isinstance(raw, dict) else [(None, raw)]):
        try:
            out[str(qid)] = {"ref": xy(entry["ref"]), "choices": [xy(c) for c in entry["choices"]]}
        except (KeyError, TypeError, ValueError):
            raise UserError(f"points file {path}: entry {qid!r} is not {{\"ref\": [x, y], \"choices\": "
                            "[[x, y], ...]} (pixels)") from None
    return out


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
        points = _points_sidecar(path.parent / f"{split}-points.json")
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
            pts = points.get(str(qid))
            if pts is not None and len(pts["choices"]) != len(choices):
                raise UserError(f"{path.parent / f'{split}-points.json'}: {qid} has {len(pts['choices'])} choice "
                                f"points for {len(choices)} choices; give one [x, y] per choice, in order")
            questions.append(BlinkQuestion(str(qid), subtask, str(table["question"][r]), choices,
                                           answer_index(table["answer"][r], len(choices)), str(prompt), loaders, pts))
        out[subtask] = questions
    return out


# ---------------------------------------------------------------------------------------------
# drawn points: BLINK's red circles and their labels


def draw_marker(image: Image.Image, xy: tuple[float, float], label: str, radius: int = 7, width: int = 2,
                font_size: int = 13, rgb: tuple[int, int, int] = MARKER_RGB) -> None:
    """Draw a point as the correspondence subtasks show it, in place: a ring of `radius` around `xy` and
    `label` ("REF", "A", ...) beside it, up and to the right, in one colour."""
    from PIL import ImageDraw, ImageFont

    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"  # no anti-aliasing: the glyphs' pixels are the marker colour on any background
    x, y = xy
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=rgb, width=width)
    font = ImageFont.load_default(size=font_size)
    draw.text((round(x + radius + 2), round(y - radius - font_size + 2)), label, fill=rgb, font=font)


@dataclass(frozen=True)
class Marker:
    """One drawn point: the centre of its ring (x, y pixels), the ring's radius and its label (None: unread)."""

    xy: tuple[float, float]
    radius: float
    label: str | None


def marker_mask(image: Image.Image) -> Any:
    """Pixels of the marker colour [H, W] bool: saturated red (R >= 150, G and B at least 120 below R)."""
    import numpy as np

    a = np.asarray(image.convert("RGB"), np.int16)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    return (r >= 150) & (r - g >= 120) & (r - b >= 120)


def _holes(component: Any) -> tuple[Any, list[int]]:
    """The filled component and the sizes of its holes (4-connected background pockets of >= 2 pixels)."""
    import numpy as np
    from scipy import ndimage

    filled = ndimage.binary_fill_holes(component)
    lab, n = ndimage.label(filled & ~component)
    sizes = [int(v) for v in np.bincount(lab.ravel())[1:]] if n else []
    return filled, [v for v in sizes if v >= 2]


def read_letter(glyph: Any) -> str | None:
    """The letter A, B, C or D one glyph [h, w] bool shows, from its topology (font-independent for
    sans-serif capitals): two holes B; none C; one hole A when its bottom rows have two separate strokes
    (the legs), else D. None for a glyph with more holes."""
    import numpy as np

    _, holes = _holes(glyph)
    if len(holes) == 2:
        return "B"
    if not holes:
        return "C"
    if len(holes) > 2:
        return None
    rows = np.flatnonzero(glyph.any(1))
    bottom = glyph[rows[-1] - max(1, (rows[-1] - rows[0] + 1) // 6) + 1: rows[-1] + 1].any(0).astype(np.int8)
    runs = int(np.sum(np.diff(np.concatenate([[0], bottom, [0]])) == 1))
    return "A" if runs >= 2 else "D"


def find_markers(image: Image.Image, min_radius: float = 3.0) -> list[Marker]:
    """The drawn points of one image: rings of the marker colour (one hole holding the centre, pixels at
    an even distance from it) and, for each, the label drawn nearest it (a group of glyphs of the same
    colour that are not rings; one glyph is read by `read_letter`, several are "REF"). Sorted by label.

    Assumes BLINK's drawing: a red ring around each point and its label beside it in the same red. Red
    regions of the photograph that are not rings are ignored; a label touching its ring, or red behind it,
    leaves the label unread (None)."""
    import numpy as np
    from scipy import ndimage

    mask = marker_mask(image)
    lab, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    rings, glyphs = [], np.zeros_like(mask)
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        comp = lab[sl] == k
        if comp.sum() < 4:
            continue
        filled, holes = _holes(comp)
        h, w = comp.shape
        ys, xs = np.nonzero(filled)
        cy, cx = ys.mean(), xs.mean()
        if len(holes) == 1 and 0.85 <= h / w <= 1.18 and min(h, w) >= 2 * min_radius:
            py, px = np.nonzero(comp)
            d = np.hypot(py - cy, px - cx)
            inside = not comp[round(cy), round(cx)]
            if inside and holes[0] >= 0.25 * filled.sum() and d.std() <= 0.15 * d.mean():
                rings.append(((sl[1].start + cx, sl[0].start + cy), (h + w) / 4))
                continue
        glyphs[sl] |= comp
    # glyphs within 4 pixels of each other form one label
    groups, _ = ndimage.label(ndimage.binary_dilation(glyphs, np.ones((3, 3), bool), iterations=2))
    labels = []
    for k, sl in enumerate(ndimage.find_objects(groups), start=1):
        part = glyphs[sl] & (groups[sl] == k)
        parts, n_parts = ndimage.label(part, structure=np.ones((3, 3), bool))
        text = "REF" if n_parts > 1 else read_letter(part[ndimage.find_objects(parts)[0]]) if n_parts else None
        ys, xs = np.nonzero(part)
        labels.append(((sl[1].start + xs.mean(), sl[0].start + ys.mean()), text))
    # each ring takes the nearest label still free, nearest pairs first
    pairs = sorted((np.hypot(r[0][0] - t[0][0], r[0][1] - t[0][1]), i, j)
                   for i, r in enumerate(rings) for j, t in enumerate(labels))
    taken_r, taken_t, out = set(), set(), {}
    for d, i, j in pairs:
        if i in taken_r or j in taken_t or d > 6 * rings[i][1] + 20:
            continue
        taken_r.add(i)
        taken_t.add(j)
        out[i] = labels[j][1]
    markers = [Marker((float(x), float(y)), float(r), out.get(i)) for i, ((x, y), r) in enumerate(rings)]
    return sorted(markers, key=lambda mk: (mk.label is None, mk.label or "", mk.xy))


def marker_points(images: Sequence[Image.Image], n_choices: int) -> tuple[dict[str, Any] | None, str]:
    """{"ref": (x, y), "choices": [(x, y), ...]} read from a correspondence question's images (the one ring
    on image_1; the rings labelled A, B, ... on image_2), or None and why not."""
    if len(images) < 2:
        return None, "fewer than two images"
    ref = find_markers(images[0])
    if len(ref) != 1:
        return None, f"{len(ref)} rings on image_1 (one expected)"
    cands = {mk.label: mk.xy for mk in find_markers(images[1]) if mk.label}
    missing = [c for c in LETTERS[:n_choices] if c not in cands]
    if missing:
        return None, f"no ring labelled {missing[0]} on image_2"
    return {"ref": ref[0].xy, "choices": [cands[c] for c in LETTERS[:n_choices]]}, ""


# ---------------------------------------------------------------------------------------------
# writing BLINK's layout


def png_struct(im: Image.Image, name: str) -> dict:
    """An image as HF datasets stores it in parquet: {bytes (PNG: lossless), path}."""
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": name}


def write_subtask(root: str | os.PathLike, subtask: str, rows: Sequence[dict[str, Any]], split: str = "val",
                  points: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write one subtask in BLINK's layout: ROOT/<subtask>/<split>-00000-of-00001.parquet, atomically.

    `rows`: {"question", "images" (1-4 PIL), "choices", "answer" (index), "explanation"?}; idx is
    <split>_<subtask>_<i>, the prompt BLINK's lettered one. `points` ({idx: {"ref", "choices"}}) is
    written as the points sidecar. Returns the parquet file."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("writing BLINK parquet needs pyarrow: pip install pyarrow") from None
    import json

    folder = Path(root) / subtask
    folder.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cols: dict[str, list] = {c: [] for c in ("idx", "question", "sub_task", *IMAGE_COLUMNS, "choices", "answer",
                                             "prompt", "explanation")}
    for i, row in enumerate(rows):
        qid = f"{split}_{subtask}_{i + 1}"
        cols["idx"].append(qid)
        cols["question"].append(row["question"])
        cols["sub_task"].append(subtask)
        for k, c in enumerate(IMAGE_COLUMNS):
            ims = row["images"]
            cols[c].append(png_struct(ims[k], f"{qid}_{k + 1}.png") if k < len(ims) else None)
        cols["choices"].append(list(row["choices"]))
        cols["answer"].append(f"({LETTERS[row['answer']]})")
        cols["prompt"].append(lettered_prompt(row["question"], row["choices"]))
        cols["explanation"].append(row.get("explanation", ""))
    schema = pa.schema([("idx", pa.string()), ("question", pa.string()), ("sub_task", pa.string()),
                        *[(c, image_type) for c in IMAGE_COLUMNS], ("choices", pa.list_(pa.string())),
                        ("answer", pa.string()), ("prompt", pa.string()), ("explanation", pa.string())])
    tmp = folder / f".{split}.parquet.tmp"
    pq.write_table(pa.table(cols, schema=schema), tmp)
    out = folder / f"{split}-00000-of-00001.parquet"
    os.replace(tmp, out)
    if points:
        side = folder / f".{split}-points.json.tmp"
        side.write_text(json.dumps({k: {"ref": list(v["ref"]), "choices": [list(c) for c in v["choices"]]}
                                    for k, v in points.items()}))
        os.replace(side, folder / f"{split}-points.json")
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
    choices = ["the second image", "the third image"]
    rows = [{"question": STYLE_QUESTION, "images": t["images"], "choices": choices, "answer": t["answer"],
             "explanation": f"styles {', '.join(t['styles'])}"} for t in style_triples(seed, n, image_size)]
    write_subtask(root, "Art_Style", rows, split)
    return Path(root)

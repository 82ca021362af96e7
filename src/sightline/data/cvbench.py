"""Multiple-choice benchmarks beside BLINK: CV-Bench's layout (one image per question) and a plain JSONL, read as is.

CV-Bench (Tong et al. 2024, nyu-visionx/CV-Bench on the Hub; `huggingface-cli download --repo-type dataset`)::

    ROOT/test.parquet  (both), test_2d.parquet, test_3d.parquet       columns: idx, type ("2D" / "3D"),
         task ("Count", "Relation", "Depth", "Distance"), image (HF image struct {bytes, path}, or a path),
         question, choices (list of str), answer ("(A)", ...), prompt (question + lettered choices),
         filename, source, ...
    ROOT/test_2d.jsonl, test_3d.jsonl (or test.jsonl) + ROOT/img/...   the same fields, the image at
         `filename` (relative to the JSONL's folder)

A plain JSONL (one line per question): "image" (a path, relative to the file) or "images" (a list of them, shown
in order, for questions on several images), "question" (or "prompt"), "choices" (list of str), "answer" (the right
choice's text, or its letter "(B)" / "B", or its index), optional "task" (or "qtype") to group by.

Every loader gives {task: [BlinkQuestion]} (`sightline.data.blink.BlinkQuestion`; CV-Bench: one image each), the shape
`load_blink` gives, so the same scoring reads all three. `write_cvbench_fixture` writes questions from the
synthetic world in CV-Bench's layout (parquet and JSONL + img/): Count (how many objects / circles ..., four
number words with the true count among them) and Relation (is an object on the left or the right, ...).
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from sightline.data.blink import (
    LETTERS,
    BlinkQuestion,
    _image,
    answer_index,
    lettered_prompt,
)
from sightline.errors import UserError

CVBENCH_REQUIRED = ("question", "choices", "answer")
FORMATS = ("blink", "cvbench", "jsonl")


def _path_image(path: Path) -> Image.Image:
    try:
        return Image.open(path).convert("RGB")
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read image {path} ({type(err).__name__}): give an existing image file") from None


def _choices(value: Any, where: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, (str, int, float)) for c in value):
        raise UserError(f"{where}: choices is {value!r}, not a list of strings; give each question its choices")
    return [str(c) for c in value]


def cvbench_files(root: str | os.PathLike) -> list[Path]:
    """The CV-Bench files of `root`: the file itself (.parquet or .jsonl), else ROOT/test.parquet, else
    ROOT/test_*.parquet, else ROOT/test.jsonl, else ROOT/test_*.jsonl; UserError when there is none."""
    root = Path(root).expanduser()
    if root.is_file():
        if root.suffix not in (".parquet", ".jsonl"):
            raise UserError(f"CV-Bench file {root} is neither .parquet nor .jsonl: give test.parquet, test_2d.jsonl or "
                            "the folder that holds them")
        return [root]
    if not root.is_dir():
        raise UserError(f"CV-Bench path {root} does not exist: give the folder that holds test.parquet "
                        "(huggingface-cli download nyu-visionx/CV-Bench --repo-type dataset --local-dir DIR)")
    for pattern in ("test.parquet", "test_*.parquet", "test.jsonl", "test_*.jsonl"):
        found = sorted(root.glob(pattern))
        if found:
            return found
    raise UserError(f"no CV-Bench file in {root}: expected {root}/test.parquet (or test_2d.jsonl with img/)")


def _cvbench_rows(path: Path) -> tuple[list[dict], Any]:
    """The rows of one CV-Bench file (without the images) and a loader maker row -> image loader."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("reading CV-Bench parquet files needs pyarrow: pip install pyarrow") from None
        try:
            meta = pq.ParquetFile(path)
            names = set(meta.schema_arrow.names)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
            raise UserError(f"cannot read CV-Bench parquet {path} ({type(err).__name__}): download it again") from None
        lacking = [c for c in (*CVBENCH_REQUIRED, "image") if c not in names]
        if lacking:
            raise UserError(f"malformed CV-Bench parquet {path}: no column {lacking[0]} (CV-Bench has idx, type, task, "
                            f"image, question, choices, answer, prompt); it has {', '.join(sorted(names))}")
        cols = [c for c in ("idx", "type", "task", "question", "choices", "answer", "prompt") if c in names]
        table = meta.read(columns=cols).to_pydict()
        n = len(table["question"])
        rows = [{c: table[c][r] for c in cols} for r in range(n)]
        return rows, lambda r, row: functools.partial(_image, str(path), "image", r)
    rows = _jsonl(path)

    def loader(r, row):
        ref = row.get("filename") or row.get("image")
        if isinstance(ref, dict):
            ref = ref.get("path")
        if not isinstance(ref, str) or not ref:
            raise UserError(f"{path} line {r + 1}: no image (a \"filename\" or \"image\" path); give each line its image")
        where = Path(ref).expanduser()
        return functools.partial(_path_image, where if where.is_absolute() else path.parent / where)

    return rows, loader


def _jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path} ({type(err).__name__}): give a UTF-8 JSONL file") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {i + 1} is not JSON ({err.msg}); one JSON object a line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {i + 1} is not a JSON object; one object a line")
        row["_line"] = i + 1
        rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no question; one JSON object a line")
    return rows


def load_cvbench(root: str | os.PathLike, limit: int | None = None) -> dict[str, list[BlinkQuestion]]:
    """{task: questions} from CV-Bench (see the module docstring); `limit`: the first that many questions per task.
    One UserError line for a missing or malformed file."""
    out: dict[str, list[BlinkQuestion]] = {}
    for path in cvbench_files(root):
        rows, loader = _cvbench_rows(path)
        for r, row in enumerate(rows):
            where = f"CV-Bench {path} row {r}"
            lacking = [c for c in CVBENCH_REQUIRED if c not in row]
            if lacking:
                raise UserError(f"malformed {where}: no field {lacking[0]} (CV-Bench has question, choices, answer, "
                                "prompt, task, image or filename)")
            task = str(row.get("task") or "all")
            if limit is not None and len(out.get(task, [])) >= limit:
                continue
            choices = _choices(row["choices"], where)
            question = str(row["question"])
            prompt = row.get("prompt") or lettered_prompt(question, choices)
            qid = row.get("idx")
            out.setdefault(task, []).append(BlinkQuestion(
                f"{task}_{r}" if qid is None else str(qid), task, question, choices,
                answer_index(row["answer"], len(choices)), str(prompt), [loader(r, row)]))
    return out


def load_mc_jsonl(path: str | os.PathLike, limit: int | None = None) -> dict[str, list[BlinkQuestion]]:
    """{task: questions} from a plain multiple-choice JSONL (module docstring); `limit` per task."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"benchmark file {path} does not exist: give a JSONL file with image, question, choices, "
                        "answer a line")
    out: dict[str, list[BlinkQuestion]] = {}
    for r, row in enumerate(_jsonl(path)):
        where = f"{path} line {row['_line']}"
        question = row.get("question") or row.get("prompt")
        refs = row.get("images") if row.get("images") is not None else row.get("image")
        lacking = [c for c, v in (("image", refs), ("question", question), ("choices", row.get("choices")),
                                  ("answer", row.get("answer"))) if v is None]
        if lacking:
            raise UserError(f"{where}: no \"{lacking[0]}\"; each line needs image (or images), question, choices and "
                            "answer")
        refs = refs if isinstance(refs, list) else [refs]
        if not refs or not all(isinstance(x, str) and x for x in refs):
            raise UserError(f"{where}: \"images\" must be a non-empty list of image paths, not {row.get('images')!r}")
        choices = _choices(row["choices"], where)
        ans = row["answer"]
        if isinstance(ans, int) and not isinstance(ans, bool):
            k = ans if 0 <= ans < len(choices) else None
        elif str(ans) in choices:
            k = choices.index(str(ans))
        else:
            k = answer_index(ans, len(choices))
        if k is None:
            raise UserError(f"{where}: the answer {ans!r} is neither one of the choices {choices} nor a letter or index "
                            "of one; give the right choice")
        task = str(row.get("task") or row.get("qtype") or "all")
        if limit is not None and len(out.get(task, [])) >= limit:
            continue
        images = [Path(x).expanduser() for x in refs]
        images = [im if im.is_absolute() else path.parent / im for im in images]
        out.setdefault(task, []).append(BlinkQuestion(str(row.get("id", r)), task, str(question), choices, k,
                                                      lettered_prompt(str(question), choices),
                                                      [functools.partial(_path_image, im) for im in images]))
    return out


def load_bench(path: str | os.PathLike, fmt: str, limit: int | None = None,
               subtasks: Sequence[str] | None = None, split: str = "val") -> dict[str, list[BlinkQuestion]]:
    """{task: questions} of a multiple-choice benchmark in `fmt` (blink, cvbench or jsonl); `subtasks` picks BLINK
    subtasks (None: all), `split` BLINK's split."""
    if fmt == "blink":
        from sightline.data.blink import load_blink

        return load_blink(path, subtasks, split, limit)
    if fmt == "cvbench":
        return load_cvbench(path, limit)
    if fmt == "jsonl":
        return load_mc_jsonl(path, limit)
    raise UserError(f"--bench-format {fmt!r}: choose blink, cvbench or jsonl")


# ---------------------------------------------------------------------------------------------
# the synthetic fixture: count and left/right questions in CV-Bench's layout


def cvbench_items(seed: int, n: int, image_size: int = 112) -> list[dict[str, Any]]:
    """Multiple-choice questions about n synthetic scenes: every count question of the world (task Count; four
    number words, the true one among them, in a random order) and every position question (task Relation; the
    two sides it names). Each: {"image" (PIL), "task", "type", "question", "choices", "answer" (index)}."""
    import numpy as np

    from sightline.data.synthetic import (
        NUMBERS,
        WorldConfig,
        derive_seed,
        questions,
        render_scene,
    )

    config = WorldConfig(image_size=image_size)
    out = []
    for i in range(n):
        scene = render_scene(derive_seed(seed, "cvbench", i), config)
        rng = np.random.default_rng([seed, i, 0xCB])
        for q in questions(scene, ("count", "position")):
            if q.qtype == "count":
                true = NUMBERS.index(q.answer)
                others = [k for k in range(5) if k != true]
                picks = [true, *rng.choice(others, 3, replace=False).tolist()]
                order = rng.permutation(4)
                choices = [NUMBERS[picks[j]] for j in order]
                task, kind = "Count", "2D"
            else:
                choices = ["left", "right"] if "left" in q.question else ["top", "bottom"]
                task, kind = "Relation", "2D"
            out.append({"image": scene.to_pil(), "task": task, "type": kind, "question": q.question,
                        "choices": choices, "answer": choices.index(q.answer)})
    return out


def write_cvbench_fixture(root: str | os.PathLike, seed: int = 0, n: int = 20, image_size: int = 112) -> Path:
    """Write `cvbench_items(seed, n)` in CV-Bench's layout: ROOT/test.parquet (idx, type, task, image as {bytes
    (PNG), path}, question, choices, answer "(A)".., prompt, filename, source) and ROOT/test_2d.jsonl with the
    images under ROOT/img/2D/<task>/. Returns ROOT."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("writing CV-Bench parquet needs pyarrow: pip install pyarrow") from None
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cols: dict[str, list] = {k: [] for k in ("idx", "type", "task", "image", "question", "choices", "answer",
                                             "prompt", "filename", "source")}
    lines = []
    for i, it in enumerate(cvbench_items(seed, n, image_size)):
        name = f"img/{it['type']}/{it['task'].lower()}/synthetic_{i}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        it["image"].save(buf, format="PNG")
        (root / name).write_bytes(buf.getvalue())
        row = {"idx": i, "type": it["type"], "task": it["task"], "question": it["question"],
               "choices": it["choices"], "answer": f"({LETTERS[it['answer']]})",
               "prompt": lettered_prompt(it["question"], it["choices"]), "filename": name, "source": "synthetic"}
        for k, v in row.items():
            cols[k].append(v)
        cols["image"].append({"bytes": buf.getvalue(), "path": Path(name).name})
        lines.append(json.dumps(row))
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("idx", pa.int64()), ("type", pa.string()), ("task", pa.string()), ("image", image_type),
                        ("question", pa.string()), ("choices", pa.list_(pa.string())), ("answer", pa.string()),
                        ("prompt", pa.string()), ("filename", pa.string()), ("source", pa.string())])
    pq.write_table(pa.table(cols, schema=schema), root / "test.parquet")
    (root / "test_2d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root

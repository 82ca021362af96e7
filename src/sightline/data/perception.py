"""Perception task loaders: each benchmark's own on-disk layout (or the synthetic world) -> a
`TaskData` of lazy units (`sightline.data.tasks`).

A unit names its images and masks by path or by a zero-argument callable (a `functools.partial`
of a module function, so units pickle); nothing is decoded until a readout asks, so a run holds one
episode / set / pair / clip in memory. `load_task(task, fmt, root, ...)` is the one entry point:

| fmt          | task     | layout read (ROOT = `root`)                                                  |
|--------------|----------|------------------------------------------------------------------------------|
| `pascal5i`   | fgseg    | VOC2012: ROOT/JPEGImages/*.jpg, ROOT/SegmentationClassAug/*.png (or           |
|              |          | SegmentationClass/), HSNet's ROOT/splits/pascal/val/fold{i}.txt (or          |
|              |          | ImageSets/Segmentation/val.txt, pairs derived from the masks)                |
| `msrc`       | coseg    | Object Discovery MSRC: ROOT/<class>/*.bmp + ROOT/<class>/GroundTruth/*, or    |
|              |          | ROOT/images/<class>/* + ROOT/GT/<class>/*                                     |
| `imagenet-s` | textseg  | ROOT[/ImageNetS{50,300,919}]/validation/<wnid>/*.JPEG + validation-segmentation/|
|              |          | <wnid>/*.png (id = R + 256 G), ImageNetS_categories_im{N}.txt, wnid names     |
| `refcoco`    | refseg   | ROOT/<dataset>/instances.json + refs(unc|umd|google).json, images in          |
|              |          | ROOT/images[/train2014]; or lmms-lab parquet files (ROOT/data/<split>-*.parquet)|
| `spair`      | semcorr  | SPair-71k: ROOT/PairAnnotation/<split>/*.json, ROOT/JPEGImages/<category>/    |
| `davis`      | tempcorr | DAVIS-2017: ROOT/JPEGImages/480p/<seq>/, ROOT/Annotations/480p/<seq>/,         |
|              |          | ROOT/ImageSets/2017/<split>.txt                                              |
| `synthetic`  | any      | drawn from `sightline.data.synthetic` (root unused)                           |
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sightline.data.images import IMAGE_EXTENSIONS
from sightline.data.synthetic import (
    PAIR_MODES,
    SHAPES,
    VOC_CLASSES,
    WorldConfig,
    derive_seed,
    referring_expressions,
    render_clip,
    render_pair,
    render_scene,
    scene_with_shape,
)
from sightline.errors import UserError
from sightline.data.tasks import (
    FORMATS,
    IGNORE,
    TASKS,
    CoSegSet,
    Episode,
    KeypointPair,
    SegSample,
    TaskData,
    VideoClip,
    load_mask,
)

__all__ = [
    "FORMAT_TASKS",
    "SYNTHETIC_OPTIONS",
    "VOC_CLASSES",
    "coco_segmentation_mask",
    "load_task",
    "polygons_to_mask",
    "rle_decode",
    "rle_from_string",
]

FORMAT_TASKS: dict[str, tuple[str, ...]] = {
    "pascal5i": ("fgseg",), "msrc": ("coseg",), "imagenet-s": ("textseg",), "refcoco": ("refseg",),
    "spair": ("semcorr",), "davis": ("tempcorr",), "synthetic": TASKS,
}
# The `synthetic` options of load_task, with their defaults (None: see SYNTHETIC_DEFAULT_N).
SYNTHETIC_OPTIONS: dict[str, Any] = {
    "n": None,  # units: episodes / sets / items / pairs / clips
    "set_size": 6,  # coseg: images per set
    "n_frames": 8,  # tempcorr: frames per clip
    "modes": ("scene",),  # semcorr: pair modes, cycled (PAIR_MODES). "scene": two unrelated scenes that share a shape,
    # as SPair pairs two instances of a category; "transform" (one scene moved, same colours) is geometric matching
    "image_size": None,  # side or (height, width); None: WorldConfig's default (112)
    "world": {},  # other WorldConfig fields (n_objects, shapes, styles, ...)
}
SYNTHETIC_DEFAULT_N = {"coseg": 8, "textseg": 100, "refseg": 100, "semcorr": 100, "tempcorr": 20}
REFCOCO_DATASETS = ("refcoco", "refcoco+", "refcocog")
_IMAGE_EXTS = IMAGE_EXTENSIONS


def load_task(task: str, fmt: str, root: str | None, *, split: str | None = None, fold: int = 0,
              shots: int = 5, episodes: int = 1000, seed: int = 0, limit: int | None = None,
              calibration_fraction: float = 0.2, refcoco_dataset: str = "refcoco",
              synthetic: dict | None = None) -> TaskData:
    """The units of perception task `task` read from dataset format `fmt` at `root` (see the module
    docstring for each layout): fgseg Episodes (fold `fold`, `shots` supports, `episodes` of them,
    seeded), coseg CoSegSets, textseg / refseg SegSamples with held-out calibration units,
    semcorr KeypointPairs, tempcorr VideoClips. `limit` caps the units; `split` picks the split
    (defaults: Pascal val, ImageNet-S validation, RefCOCO val, SPair test, DAVIS val)."""
    if task not in TASKS:
        raise UserError(f"unknown perception task {task!r}: use one of {', '.join(TASKS)}")
    if fmt not in FORMATS:
        raise UserError(f"unknown dataset format {fmt!r}: use one of {', '.join(FORMATS)}")
    if task not in FORMAT_TASKS[fmt]:
        served = "; ".join(f"{f} -> {'/'.join(t)}" for f, t in FORMAT_TASKS.items() if f != "synthetic")
        raise UserError(f"format {fmt!r} does not serve task {task!r}: {served}; synthetic serves every task")
    _check_count("shots", shots)
    _check_count("episodes", episodes)
    if limit is not None:
        _check_count("limit", limit)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative whole number, got {seed!r}")
    if not 0.0 <= calibration_fraction < 1.0:
        raise UserError(f"calibration_fraction={calibration_fraction} must be in [0, 1)")
    if synthetic is not None and fmt != "synthetic":
        raise UserError(f"synthetic options were given for format {fmt!r}: pass them only with fmt='synthetic'")
    if fmt == "synthetic":
        return _load_synthetic(task, synthetic or {}, shots=shots, episodes=episodes, seed=int(seed),
                               limit=limit, calibration_fraction=calibration_fraction)
    base = _root(root, fmt)
    if fmt == "pascal5i":
        return _load_pascal5i(base, split, fold, shots, episodes, int(seed), limit)
    if fmt == "msrc":
        return _load_msrc(base, limit)
    if fmt == "imagenet-s":
        return _load_imagenet_s(base, split, int(seed), limit, calibration_fraction)
    if fmt == "refcoco":
        return _load_refcoco(base, split, refcoco_dataset, int(seed), limit, calibration_fraction)
    if fmt == "spair":
        return _load_spair(base, split, limit)
    return _load_davis(base, split, limit)


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{name} must be a positive whole number, got {value!r}")


def _root(root: str | None, fmt: str) -> Path:
    if root is None:
        raise UserError(f"format {fmt!r} reads a dataset folder: pass its root (or use fmt='synthetic')")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(f"{fmt} dataset root {path} is not a folder: pass the folder that holds the dataset")
    return path


def _cap(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"cannot read {what} {path}: {type(err).__name__}: expected a JSON file") from None


def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in (".jpg", ".JPEG", ".jpeg", ".png", ".bmp", ".JPG", ".PNG", ".BMP"):
        candidate = folder / f"{stem}{ext}"
        if candidate.is_file():
            return candidate
    return None


def _n_held_out(n: int, fraction: float) -> int:
    """How many of n items a `fraction` holds out: at least 1 when fraction > 0 and n > 1."""
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(fraction * n)))


# ---------------------------------------------------------------------------------------------
# mask decoders (module functions, so the lazy units pickle)


def voc_class_mask(path: str, class_id: int) -> np.ndarray:
    """Binary mask of VOC class `class_id` from a label PNG: 1 there, IGNORE on 255, else 0."""
    label = load_mask(path)
    out = (label == class_id).astype(np.uint8)
    out[label == 255] = IGNORE
    return out


def binary_mask(path: str) -> np.ndarray:
    """A 0/1 mask from a black-and-white mask image (white = foreground; 0/1-valued images too)."""
    with Image.open(path) as im:
        grey = np.asarray(im.convert("L"))
    return (grey > (127 if grey.max() > 1 else 0)).astype(np.uint8)


def imagenet_s_class_mask(path: str, class_id: int, ignore_id: int = 1000) -> np.ndarray:
    """Binary mask of ImageNet-S class `class_id` from a label PNG (id = R + 256 G; `ignore_id` -> IGNORE)."""
    ids = _imagenet_s_ids(path)
    out = (ids == class_id).astype(np.uint8)
    out[ids == ignore_id] = IGNORE
    return out


def _imagenet_s_ids(path: str) -> np.ndarray:
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1]


def rle_from_string(counts: str) -> list[int]:
    """The run lengths of a COCO compressed RLE string (pycocotools' rleFrString)."""
    out: list[int] = []
    p = 0
    while p < len(counts):
        value, shift, more = 0, 0, True
        while more:
            c = ord(counts[p]) - 48
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            p += 1
            shift += 1
            if not more and c & 0x10:
                value |= -1 << (5 * shift)
        if len(out) > 2:
            value += out[-2]
        out.append(value)
    return out


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """HxW uint8 0/1 mask of a COCO RLE ({"size": [h, w], "counts": list or compressed string})."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = rle_from_string(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if sum(runs) != height * width:
        raise ValueError(f"RLE run lengths sum to {sum(runs)}, not {height} x {width}")
    values = np.zeros(len(runs), dtype=np.uint8)
    values[1::2] = 1
    return np.repeat(values, runs).reshape((width, height)).T.copy()


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """HxW uint8 0/1 union of COCO polygons ([x0, y0, x1, y1, ...] each), filled with PIL ImageDraw:
    the pixels whose centres lie inside (edges included), pixel (r, c) spanning [c, c+1) x [r, r+1)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        # PIL puts pixel centres on whole numbers, COCO on halves
        xy = [float(v) - 0.5 for v in poly]
        if len(xy) >= 6:
            draw.polygon(xy, fill=1, outline=1)
    return np.asarray(canvas, dtype=np.uint8).copy()


def coco_segmentation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """HxW uint8 0/1 mask of a COCO `segmentation`: polygons (a list of lists, or one flat list as
    lmms-lab ships it), an RLE dict (list or string counts), or JSON text of either."""
    if isinstance(segmentation, (str, bytes)):
        segmentation = json.loads(segmentation)
    if isinstance(segmentation, dict):
        if "size" not in segmentation:
            segmentation = {**segmentation, "size": [height, width]}
        return rle_decode(segmentation)
    seg = list(segmentation)
    if seg and not isinstance(seg[0], (list, tuple, np.ndarray)):
        seg = [seg]
    return polygons_to_mask(seg, height, width)


def _image_size(image: Any) -> tuple[int, int]:
    from sightline.data.tasks import load_image

    pil = load_image(image)
    return pil.height, pil.width


def coco_mask_for_image(segmentation: Any, image: Any) -> np.ndarray:
    """`coco_segmentation_mask` at the size of `image` (a path or a callable), for exports without sizes."""
    height, width = _image_size(image)
    return coco_segmentation_mask(segmentation, height, width)


# ---------------------------------------------------------------------------------------------
# Pascal-5i (fgseg)


def _voc_base(root: Path) -> Path:
    for base in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (base / "JPEGImages").is_dir():
            return base
    raise UserError(f"no JPEGImages/ folder in {root}: pass the VOC2012 folder (JPEGImages/, SegmentationClassAug/)")


def _read_fold_list(path: Path) -> list[tuple[str, int]]:
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        name, sep, cls = line.rpartition("__")
        if not sep or not name or not cls.isdigit() or not 1 <= int(cls) <= 20:
            raise UserError(f"malformed line {number} of fold list {path}: {line!r}; expected "
                            f"'<image>__<VOC class id 01..20>' as HSNet's lists have")
        pairs.append((name, int(cls)))
    return pairs


def _load_pascal5i(root: Path, split: str | None, fold: int, shots: int, episodes: int, seed: int,
                   limit: int | None) -> TaskData:
    if isinstance(fold, bool) or fold not in (0, 1, 2, 3):
        raise UserError(f"Pascal-5i fold must be 0, 1, 2 or 3, got {fold!r}")
    split = "val" if split in (None, "test") else split
    base = _voc_base(root)
    masks = next((base / d for d in ("SegmentationClassAug", "SegmentationClass") if (base / d).is_dir()), None)
    if masks is None:
        raise UserError(f"no SegmentationClassAug/ or SegmentationClass/ folder in {base}: add the VOC masks")
    classes = list(range(5 * fold + 1, 5 * fold + 6))
    lists = [d / "splits" / "pascal" / split / f"fold{fold}.txt" for d in (base, root, base.parent, root / "data")]
    fold_list = next((p for p in lists if p.is_file()), None)
    if fold_list is not None:
        pairs = [(n, c) for n, c in _read_fold_list(fold_list) if c in classes]
        source = f"Pascal-5i fold {fold} ({fold_list})"
    else:
        plain = base / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not plain.is_file():
            raise UserError(f"no Pascal-5i split list for fold {fold}: expected {lists[0]} (HSNet's "
                            f"splits/pascal/{split}/fold{fold}.txt) or {plain}")
        pairs = []
        for name in plain.read_text(encoding="utf-8").split():
            mask_path = masks / f"{name}.png"
            if not mask_path.is_file():
                raise UserError(f"missing mask {mask_path} for image {name!r} of {plain}: add it or drop the line")
            present = set(np.unique(load_mask(mask_path)).tolist())
            pairs += [(name, c) for c in classes if c in present]
        source = f"Pascal-5i fold {fold} (derived from {plain} and the masks)"
    if not pairs:
        raise UserError(f"the Pascal-5i {split} list for fold {fold} holds no image of classes {classes}")
    by_class: dict[int, list[str]] = {}
    for name, cls in pairs:
        by_class.setdefault(cls, []).append(name)

    def sample(name: str, cls: int) -> SegSample:
        image = base / "JPEGImages" / f"{name}.jpg"
        return SegSample(id=name, image=str(image), mask=functools.partial(voc_class_mask, str(masks / f"{name}.png"), cls),
                         category=VOC_CLASSES[cls - 1], meta={"class_id": cls})

    first_name = pairs[0][0]
    for path in (base / "JPEGImages" / f"{first_name}.jpg", masks / f"{first_name}.png"):
        if not path.is_file():
            raise UserError(f"missing file {path} named by the Pascal-5i list: check the VOC2012 folder")
    units = []
    for index in range(min(episodes, limit or episodes)):
        # HSNet: the query walks the fold list in order; supports are drawn from the query's class,
        # never the query itself (drawn without repeats here where the class has enough images).
        query_name, cls = pairs[index % len(pairs)]
        others = [n for n in by_class[cls] if n != query_name]
        if not others:
            raise UserError(f"class {VOC_CLASSES[cls - 1]} has one image in the fold-{fold} list: "
                            f"a {shots}-shot episode needs another")
        rng = np.random.default_rng(np.random.SeedSequence([seed, fold, index]))
        picks = rng.choice(len(others), size=shots, replace=len(others) < shots)
        units.append(Episode(id=f"fold{fold}-{index:05d}", category=VOC_CLASSES[cls - 1],
                             support=tuple(sample(others[k], cls) for k in picks),
                             query=sample(query_name, cls), fold=fold))
    return TaskData(task="fgseg", format="pascal5i", source=source, units=units,
                    categories=tuple(VOC_CLASSES[c - 1] for c in classes),
                    meta={"fold": fold, "shots": shots, "split": split, "n_pairs": len(pairs)})


# ---------------------------------------------------------------------------------------------
# MSRC / Object Discovery (coseg)


def _mask_for(folder: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}_GT", f"{stem}_gt"):
        found = _find_image(folder, name)
        if found is not None:
            return found
    return None


def _load_msrc(root: Path, limit: int | None) -> TaskData:
    base = root / "MSRC" if (root / "MSRC").is_dir() else root
    if (base / "images").is_dir() and any((base / d).is_dir() for d in ("GT", "GroundTruth")):
        gt_root = base / "GT" if (base / "GT").is_dir() else base / "GroundTruth"
        folders = [(d, gt_root / d.name) for d in sorted((base / "images").iterdir()) if d.is_dir()]
    else:
        folders = [(d, d / "GroundTruth") for d in sorted(base.iterdir()) if d.is_dir()]
    sets = []
    for image_dir, gt_dir in folders:
        if not gt_dir.is_dir():
            continue
        samples = []
        for path in sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXTS):
            mask = _mask_for(gt_dir, path.stem)
            if mask is not None:
                samples.append(SegSample(id=f"{image_dir.name}/{path.stem}", image=str(path),
                                         mask=functools.partial(binary_mask, str(mask)), category=image_dir.name))
        if samples:
            sets.append(CoSegSet(name=image_dir.name, samples=tuple(samples)))
    if not sets:
        raise UserError(f"no co-segmentation classes in {base}: expected <class>/<image>.bmp|jpg|png with "
                        f"<class>/GroundTruth/<image>.png masks (Object Discovery's MSRC layout)")
    sets = _cap(sets, limit)
    return TaskData(task="coseg", format="msrc", source=f"MSRC co-segmentation ({base})", units=sets,
                    categories=tuple(s.name for s in sets))


# ---------------------------------------------------------------------------------------------
# ImageNet-S (textseg)


def _imagenet_s_base(root: Path, split: str) -> Path:
    if (root / f"{split}-segmentation").is_dir():
        return root
    found = sorted(d for d in root.glob("ImageNetS*") if (d / f"{split}-segmentation").is_dir())
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise UserError(f"{root} holds several ImageNet-S subsets ({', '.join(d.name for d in found)}): "
                        f"pass one of them as the root")
    raise UserError(f"no {split}-segmentation/ folder in {root} or its ImageNetS*/ subfolders: pass the "
                    f"ImageNet-S root (ImageNetS50/{split}/, ImageNetS50/{split}-segmentation/)")


def _imagenet_s_wnids(base: Path, root: Path, seg: Path) -> tuple[list[str], str]:
    size = re.fullmatch(r"ImageNetS(\d+)", base.name)
    places = [base, root, base.parent, root / "data" / "categories", base.parent / "data" / "categories",
              root / "categories"]
    pattern = f"ImageNetS_categories_im{size.group(1)}.txt" if size else "ImageNetS_categories_im*.txt"
    files = sorted({f for d in places if d.is_dir() for f in d.glob(pattern)})
    if len(files) > 1 and not size:
        raise UserError(f"several ImageNet-S category lists ({', '.join(f.name for f in files)}): "
                        f"name the subset folder ImageNetS<N> so the right one is read")
    if files:
        wnids = files[0].read_text(encoding="utf-8").split()
        if not wnids or not all(re.fullmatch(r"n\d{8}", w) for w in wnids):
            raise UserError(f"malformed ImageNet-S category list {files[0]}: expected one wnid (n########) a line")
        # class id k (1..N) of the label PNGs is the k-th wnid in sorted (ImageNet) order
        return sorted(wnids), str(files[0])
    wnids = sorted(d.name for d in seg.iterdir() if d.is_dir())
    return wnids, f"the folders of {seg}"


def _imagenet_names(places: Sequence[Path]) -> dict[str, str]:
    for folder in places:
        for name in ("LOC_synset_mapping.txt", "synset_words.txt"):
            path = folder / name
            if path.is_file():
                names = {}
                for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                    if not line.strip():
                        continue
                    wnid, _, rest = line.strip().partition(" ")
                    if not re.fullmatch(r"n\d{8}", wnid) or not rest:
                        raise UserError(f"malformed line {number} of {path}: expected '<wnid> <name>, <name>, ...'")
                    names[wnid] = rest.split(",")[0].strip()
                return names
        for name in ("class_names.json", "imagenet_class_index.json"):
            path = folder / name
            if path.is_file():
                data = _read_json(path, "class-name file")
                if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
                    return {str(k): v.split(",")[0].strip() for k, v in data.items()}
                if isinstance(data, dict) and all(isinstance(v, list) and len(v) == 2 for v in data.values()):
                    return {str(v[0]): str(v[1]).replace("_", " ") for v in data.values()}
                raise UserError(f"malformed class-name file {path}: expected {{wnid: name}} or "
                                f"{{index: [wnid, name]}}")
    return {}


def _load_imagenet_s(root: Path, split: str | None, seed: int, limit: int | None, fraction: float) -> TaskData:
    split = split or "validation"
    base = _imagenet_s_base(root, split)
    seg, images = base / f"{split}-segmentation", base / split
    if not images.is_dir():
        raise UserError(f"no {split}/ image folder beside {seg}: add the ImageNet-S images")
    wnids, wnid_source = _imagenet_s_wnids(base, root, seg)
    names = _imagenet_names([base, root, base.parent, root.parent])
    missing = [w for w in wnids if w not in names]
    if missing:
        raise UserError(f"no class names for {len(missing)} ImageNet-S wnids (e.g. {missing[0]}): put ImageNet's "
                        f"LOC_synset_mapping.txt (or a class_names.json {{wnid: name}}) in {root}")
    class_names = [names[w] for w in wnids]
    records = []
    for folder in sorted(d for d in seg.iterdir() if d.is_dir()):
        for mask in sorted(folder.glob("*.png")):
            records.append((folder.name, mask))
    if not records:
        raise UserError(f"no label PNGs in {seg}/<wnid>/: check the ImageNet-S folder")
    order = np.random.default_rng(np.random.SeedSequence([seed, 7])).permutation(len(records))
    n_cal = _n_held_out(len(records), fraction)
    held = set(order[:n_cal].tolist())
    cal_cap = None if limit is None else max(1, math.ceil(limit * fraction / (1 - fraction)))

    def samples(indices: Sequence[int], cap: int | None) -> list[SegSample]:
        out: list[SegSample] = []
        for k in indices:
            wnid, mask = records[k]
            image = _find_image(images / wnid, mask.stem)
            if image is None:
                raise UserError(f"no image {images / wnid / mask.stem}.JPEG for label {mask}: add it")
            ids = _imagenet_s_ids(str(mask))  # which classes an image holds is metadata: read now
            for cls in sorted(int(c) for c in np.unique(ids) if 0 < c <= len(wnids)):
                out.append(SegSample(id=f"{wnid}/{mask.stem}:{cls}", image=str(image),
                                     mask=functools.partial(imagenet_s_class_mask, str(mask), cls),
                                     category=class_names[cls - 1], text=class_names[cls - 1],
                                     meta={"class_id": cls, "wnid": wnids[cls - 1]}))
                if cap is not None and len(out) >= cap:
                    return out
        return out

    units = samples([k for k in range(len(records)) if k not in held], limit)
    calibration = samples(sorted(held), cal_cap)
    return TaskData(task="textseg", format="imagenet-s", source=f"ImageNet-S {split} ({base}; classes from {wnid_source})",
                    units=units, calibration=calibration, categories=tuple(class_names),
                    meta={"split": split, "n_images": len(records) - len(held), "n_calibration_images": len(held)})


# ---------------------------------------------------------------------------------------------
# RefCOCO / RefCOCO+ / RefCOCOg (refseg)


def _refcoco_folder(root: Path, dataset: str) -> Path:
    return root / dataset if (root / dataset).is_dir() else root


def _load_refcoco(root: Path, split: str | None, dataset: str, seed: int, limit: int | None,
                  fraction: float) -> TaskData:
    if dataset not in REFCOCO_DATASETS:
        raise UserError(f"unknown RefCOCO dataset {dataset!r}: use one of {', '.join(REFCOCO_DATASETS)}")
    folder = _refcoco_folder(root, dataset)
    refs_json = sorted(folder.glob("refs(*).json"))
    if refs_json:
        return _load_refcoco_json(root, folder, refs_json, split, dataset, seed, limit, fraction)
    parquet = sorted(folder.rglob("*.parquet"))
    if parquet:
        return _load_refcoco_parquet(folder, parquet, split, dataset, seed, limit, fraction)
    pickles = sorted(folder.glob("refs(*).p"))
    if pickles:
        raise UserError(f"{pickles[0]} is a pickle, which sightline never loads (unpickling can run code): "
                        f"convert it once to JSON, {pickles[0].stem}.json in {folder} holding the same list of refs, "
                        "on a machine where you trust the file, or use lmms-lab's parquet export")
    raise UserError(f"no RefCOCO annotations in {folder}: expected {dataset}/instances.json with refs(unc|umd).json, "
                    f"or parquet files as lmms-lab/{dataset.replace('+', 'plus').replace('refcoco', 'RefCOCO')} ships them")


def _pick_calibration(units_split: str, splits: Sequence[str]) -> str | None:
    if units_split != "train" and "train" in splits:
        return "train"
    if units_split == "train" and "val" in splits:
        return "val"
    return None


def _split_units(units: list[SegSample], calibration_pool: list[SegSample] | None, seed: int,
                 limit: int | None, fraction: float) -> tuple[list[SegSample], list[SegSample], str]:
    """Units (capped) and calibration units: a seeded draw from `calibration_pool` (another split)
    or, with no other split, a seeded `fraction` of the images held out of `units`."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))
    if calibration_pool is None:
        images = sorted({u.meta["image_key"] for u in units})
        n_held = _n_held_out(len(images), fraction)
        held = {images[k] for k in rng.permutation(len(images))[:n_held]}
        kept = [u for u in units if u.meta["image_key"] not in held]
        calibration = [u for u in units if u.meta["image_key"] in held]
        kept = _cap(kept, limit)
        if limit is not None:
            calibration = calibration[:max(1, math.ceil(limit * fraction / (1 - fraction)))] if fraction else []
        return kept, calibration, f"{n_held} images held out of the split"
    kept = _cap(units, limit)
    n_cal = 0 if fraction <= 0 else min(len(calibration_pool), max(1, math.ceil(len(kept) * fraction / (1 - fraction))))
    picks = sorted(rng.choice(len(calibration_pool), size=n_cal, replace=False).tolist()) if n_cal else []
    return kept, [calibration_pool[k] for k in picks], "another split"


def _load_refcoco_json(root: Path, folder: Path, refs_files: list[Path], split: str | None, dataset: str,
                       seed: int, limit: int | None, fraction: float) -> TaskData:
    preferred = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}[dataset]
    refs_path = next((p for p in refs_files if p.name == f"refs({preferred}).json"), refs_files[0])
    instances_path = folder / "instances.json"
    if not instances_path.is_file():
        raise UserError(f"no {instances_path}: RefCOCO refs need the COCO instances file beside them")
    refs = _read_json(refs_path, "RefCOCO refs file")
    instances = _read_json(instances_path, "COCO instances file")
    if not isinstance(refs, list) or not isinstance(instances, dict) or "annotations" not in instances:
        raise UserError(f"malformed RefCOCO files in {folder}: expected {refs_path.name} to be a list of refs "
                        f"and instances.json a COCO dict with images and annotations")
    try:
        images = {int(im["id"]): im for im in instances["images"]}
        anns = {int(a["id"]): a for a in instances["annotations"]}
        categories = {int(c["id"]): c["name"] for c in instances.get("categories", [])}
        splits = sorted({str(r["split"]) for r in refs})
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"malformed RefCOCO files in {folder} (missing {err}): expected COCO images/annotations "
                        f"and refs with ref_id, ann_id, image_id, split, sentences") from None
    split = split or "val"
    if split not in splits:
        raise UserError(f"RefCOCO split {split!r} is not in {refs_path}: it has {', '.join(splits)}")
    image_dirs = [root / "images" / "train2014", root / "images" / "mscoco" / "images" / "train2014",
                  root / "train2014", root / "images", folder / "images", folder]
    first = images.get(int(refs[0]["image_id"])) if refs else None
    image_dir = next((d for d in image_dirs if first is not None and (d / first["file_name"]).is_file()), None)
    if image_dir is None:
        raise UserError(f"cannot find the COCO images of {refs_path} (e.g. {first and first['file_name']}): "
                        f"put train2014/ in {root / 'images'} or {root}")

    def units_of(wanted: str) -> list[SegSample]:
        out = []
        for ref in sorted((r for r in refs if r["split"] == wanted), key=lambda r: int(r["ref_id"])):
            try:
                ann, image = anns[int(ref["ann_id"])], images[int(ref["image_id"])]
                sentences = [s["sent"] for s in ref["sentences"]]
            except (KeyError, TypeError) as err:
                raise UserError(f"malformed ref {ref.get('ref_id')} in {refs_path} (missing {err}): expected "
                                f"ann_id and image_id found in instances.json and sentences [{{sent}}]") from None
            mask = functools.partial(coco_segmentation_mask, ann["segmentation"], int(image["height"]), int(image["width"]))
            for k, sentence in enumerate(sentences):
                out.append(SegSample(id=f"{ref['ref_id']}-{k}", image=str(image_dir / image["file_name"]), mask=mask,
                                     category=categories.get(int(ann.get("category_id", 0)), ""), text=sentence,
                                     meta={"ref_id": ref["ref_id"], "ann_id": ann["id"], "image_id": image["id"],
                                           "split": wanted, "image_key": image["id"]}))
        return out

    other = _pick_calibration(split, splits)
    units, calibration, how = _split_units(units_of(split), units_of(other) if other else None, seed, limit, fraction)
    return TaskData(task="refseg", format="refcoco", source=f"{dataset} {split} ({refs_path})", units=units,
                    calibration=calibration, categories=tuple(categories.values()),
                    meta={"split": split, "dataset": dataset, "calibration_from": other or how})


@functools.lru_cache(maxsize=2)
def _parquet_column(path: str, row_group: int, column: str) -> list:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(row_group, columns=[column]).column(0).to_pylist()


def parquet_image(path: str, row_group: int, row: int) -> Image.Image:
    """The image of row `row` of row group `row_group` of a parquet file ({bytes, path} struct column)."""
    value = _parquet_column(path, row_group, "image")[row]
    data = value.get("bytes") if isinstance(value, dict) else value
    return Image.open(io.BytesIO(data)).convert("RGB")


def _load_refcoco_parquet(folder: Path, files: list[Path], split: str | None, dataset: str, seed: int,
                          limit: int | None, fraction: float) -> TaskData:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading RefCOCO parquet files needs pyarrow: pip install pyarrow") from None
    by_split: dict[str, list[Path]] = {}
    for path in files:
        by_split.setdefault(re.split(r"[-_.]", path.name)[0], []).append(path)
    split = split or "val"
    if split not in by_split:
        raise UserError(f"no RefCOCO parquet files for split {split!r} in {folder}: found {', '.join(sorted(by_split))}")

    def units_of(wanted: str) -> list[SegSample]:
        out = []
        for path in by_split[wanted]:
            meta = pq.ParquetFile(path)
            names = set(meta.schema_arrow.names)
            text_col = next((c for c in ("answer", "sentences", "sent", "text") if c in names), None)
            if "segmentation" not in names or "image" not in names or text_col is None:
                raise UserError(f"malformed RefCOCO parquet {path}: expected columns image, segmentation and "
                                f"answer (the referring sentences); it has {', '.join(sorted(names))}")
            columns = [c for c in ("question_id", text_col, "segmentation", "file_name") if c in names]
            for group in range(meta.num_row_groups):
                table = meta.read_row_group(group, columns=columns).to_pydict()
                for row in range(len(table["segmentation"])):
                    texts = table[text_col][row]
                    texts = [texts] if isinstance(texts, str) else list(texts or [])
                    qid = table["question_id"][row] if "question_id" in table else f"{path.stem}:{group}:{row}"
                    image = functools.partial(parquet_image, str(path), group, row)
                    mask = functools.partial(coco_mask_for_image, table["segmentation"][row], image)
                    key = table["file_name"][row] if "file_name" in table else qid
                    for k, text in enumerate(texts):
                        out.append(SegSample(id=f"{qid}-{k}", image=image, mask=mask, text=str(text),
                                             meta={"question_id": qid, "split": wanted, "image_key": key}))
        return out

    other = _pick_calibration(split, sorted(by_split))
    units, calibration, how = _split_units(units_of(split), units_of(other) if other else None, seed, limit, fraction)
    return TaskData(task="refseg", format="refcoco", source=f"{dataset} {split} (parquet in {folder})", units=units,
                    calibration=calibration, meta={"split": split, "dataset": dataset, "calibration_from": other or how})


# ---------------------------------------------------------------------------------------------
# SPair-71k (semcorr)


def _load_spair(root: Path, split: str | None, limit: int | None) -> TaskData:
    split = {"train": "trn", None: "test"}.get(split, split)
    pair_dir = root / "PairAnnotation" / split
    if not pair_dir.is_dir():
        raise UserError(f"no SPair-71k pair folder {pair_dir}: pass the SPair-71k root and a split of trn, val, test")
    layout = root / "Layout" / "large" / f"{split}.txt"
    if layout.is_file():
        names = [line.strip() for line in layout.read_text(encoding="utf-8").splitlines() if line.strip()]
        files = [pair_dir / f"{name}.json" for name in names]
    else:
        files = sorted(pair_dir.glob("*.json"))
    if not files:
        raise UserError(f"no pair annotations in {pair_dir}: expected SPair-71k's <id>-<src>-<trg>:<category>.json files")
    units = []
    for path in _cap(files, limit):
        if not path.is_file():
            raise UserError(f"missing SPair-71k pair file {path} listed in {layout}")
        data = _read_json(path, "SPair-71k pair annotation")
        try:
            category = str(data["category"])
            kept = [(s, t) for s, t in zip(data["src_kps"], data["trg_kps"]) if s is not None and t is not None]
            if len(data["src_kps"]) != len(data["trg_kps"]):
                raise ValueError("src_kps and trg_kps differ in length")
            src = np.array([s for s, _ in kept], dtype=np.float64).reshape(-1, 2)
            trg = np.array([t for _, t in kept], dtype=np.float64).reshape(-1, 2)
            x0, y0, x1, y1 = (float(v) for v in data["trg_bndbox"])
            source = root / "JPEGImages" / category / str(data["src_imname"])
            target = root / "JPEGImages" / category / str(data["trg_imname"])
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"malformed SPair-71k pair file {path} ({type(err).__name__}: {err}): expected category, "
                            f"src_imname, trg_imname, src_kps, trg_kps (matching [x, y] lists), trg_bndbox") from None
        meta = {k: data[k] for k in ("pair_id", "kps_ids", "src_bndbox", "src_imsize", "trg_imsize",
                                     "viewpoint_variation", "scale_variation", "truncation", "occlusion", "mirror")
                if k in data}
        units.append(KeypointPair(id=path.stem, category=category, source=str(source), target=str(target),
                                  source_xy=src, target_xy=trg, target_bbox=(x0, y0, x1, y1), meta=meta))
    first = units[0]
    for image in (first.source, first.target):
        if not Path(image).is_file():
            raise UserError(f"missing SPair-71k image {image}: expected JPEGImages/<category>/<name>.jpg under {root}")
    return TaskData(task="semcorr", format="spair", source=f"SPair-71k {split} ({root})", units=units,
                    categories=tuple(sorted({u.category for u in units})), meta={"split": split})


# ---------------------------------------------------------------------------------------------
# DAVIS-2017 (tempcorr)


def _load_davis(root: Path, split: str | None, limit: int | None) -> TaskData:
    split = split or "val"
    lists = [root / "ImageSets" / "2017" / f"{split}.txt", root / "ImageSets" / f"{split}.txt"]
    set_file = next((p for p in lists if p.is_file()), None)
    if set_file is None:
        raise UserError(f"no DAVIS sequence list: expected {lists[0]} (DAVIS-2017) or {lists[1]}")
    frames_root = next((d for d in (root / "JPEGImages" / "480p", root / "JPEGImages" / "Full-Resolution",
                                    root / "JPEGImages") if d.is_dir()), None)
    masks_root = next((d for d in (root / "Annotations" / "480p", root / "Annotations" / "Full-Resolution",
                                   root / "Annotations") if d.is_dir()), None)
    if frames_root is None or masks_root is None:
        raise UserError(f"no JPEGImages/480p/ and Annotations/480p/ folders in {root}: pass the DAVIS-2017 root")
    names = [line.strip() for line in set_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    units = []
    for name in _cap(names, limit):
        frame_dir, mask_dir = frames_root / name, masks_root / name
        if not frame_dir.is_dir() or not mask_dir.is_dir():
            raise UserError(f"sequence {name!r} of {set_file} has no folder {frame_dir} or {mask_dir}")
        frames = sorted(p for p in frame_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        masks = [mask_dir / f"{p.stem}.png" for p in frames]
        missing = [m for m in masks if not m.is_file()]
        if not frames or missing:
            raise UserError(f"sequence {name!r}: {'no frames' if not frames else f'no annotation {missing[0]}'}; "
                            f"every frame needs Annotations/<seq>/<frame>.png")
        units.append(VideoClip(name=name, frames=tuple(str(p) for p in frames), masks=tuple(str(m) for m in masks)))
    return TaskData(task="tempcorr", format="davis", source=f"DAVIS {split} ({set_file})", units=units,
                    meta={"split": split})


# ---------------------------------------------------------------------------------------------
# the synthetic world (every task)


@functools.lru_cache(maxsize=8)
def _shape_scene(seed: int, config: WorldConfig, shape: str, exclusive: bool):
    return scene_with_shape(seed, config, shape, exclusive)


@functools.lru_cache(maxsize=8)
def _plain_scene(seed: int, config: WorldConfig):
    return render_scene(seed, config)


@functools.lru_cache(maxsize=4)
def _pair(seed: int, config: WorldConfig, mode: str):
    return render_pair(seed, config, mode=mode)


@functools.lru_cache(maxsize=2)
def _clip(seed: int, config: WorldConfig, n_frames: int):
    return render_clip(seed, config, n_frames=n_frames)


def synthetic_shape_image(seed: int, config: WorldConfig, shape: str, exclusive: bool) -> Image.Image:
    """The image of `scene_with_shape(seed, config, shape, exclusive)`."""
    return _shape_scene(seed, config, shape, exclusive).to_pil()


def synthetic_shape_mask(seed: int, config: WorldConfig, shape: str, exclusive: bool) -> np.ndarray:
    """0/1 mask of every pixel showing `shape` in `scene_with_shape(seed, config, shape, exclusive)`."""
    scene = _shape_scene(seed, config, shape, exclusive)
    return (scene.class_mask == SHAPES.index(shape) + 1).astype(np.uint8)


def synthetic_scene_image(seed: int, config: WorldConfig) -> Image.Image:
    """The image of `render_scene(seed, config)`."""
    return _plain_scene(seed, config).to_pil()


def synthetic_object_mask(seed: int, config: WorldConfig, index: int) -> np.ndarray:
    """0/1 visible mask of object `index` of `render_scene(seed, config)`."""
    return _plain_scene(seed, config).objects[index].mask.astype(np.uint8)


def synthetic_pair_image(seed: int, config: WorldConfig, mode: str, which: str) -> Image.Image:
    """The source or target image of `render_pair(seed, config, mode=mode)`."""
    pair = _pair(seed, config, mode)
    return (pair.source if which == "source" else pair.target).to_pil()


def synthetic_clip_frame(seed: int, config: WorldConfig, n_frames: int, t: int) -> Image.Image:
    """Frame t of `render_clip(seed, config, n_frames=n_frames)`."""
    return _clip(seed, config, n_frames).frames[t].to_pil()


def synthetic_clip_mask(seed: int, config: WorldConfig, n_frames: int, t: int) -> np.ndarray:
    """The instance map of frame t of `render_clip(seed, config, n_frames=n_frames)`."""
    return _clip(seed, config, n_frames).frames[t].instance_mask.copy()


def _synthetic_options(options: dict) -> dict[str, Any]:
    unknown = sorted(set(options) - set(SYNTHETIC_OPTIONS))
    if unknown:
        raise UserError(f"unknown synthetic option(s) {unknown}: use {', '.join(SYNTHETIC_OPTIONS)}")
    merged = {**SYNTHETIC_OPTIONS, **options}
    for key in ("set_size", "n_frames") + (("n",) if merged["n"] is not None else ()):
        _check_count(f"synthetic {key}", merged[key])
    modes = merged["modes"]
    if isinstance(modes, str) or not modes or any(m not in PAIR_MODES for m in modes):
        raise UserError(f"synthetic modes {modes!r} must be a non-empty list of {', '.join(PAIR_MODES)}")
    if not isinstance(merged["world"], dict):
        raise UserError(f"synthetic world must be a dict of WorldConfig fields, got {merged['world']!r}")
    return merged


def _shape_sample(seed: int, config: WorldConfig, shape: str, exclusive: bool, sample_id: str) -> SegSample:
    return SegSample(id=sample_id, image=functools.partial(synthetic_shape_image, seed, config, shape, exclusive),
                     mask=functools.partial(synthetic_shape_mask, seed, config, shape, exclusive),
                     category=shape, text=shape, meta={"scene_seed": seed})


def _load_synthetic(task: str, options: dict, *, shots: int, episodes: int, seed: int, limit: int | None,
                    calibration_fraction: float) -> TaskData:
    opts = _synthetic_options(options)
    world = dict(opts["world"])
    if opts["image_size"] is not None:
        world["image_size"] = opts["image_size"]
    try:
        config = WorldConfig.from_dict(world)
    except TypeError as err:
        raise UserError(f"bad synthetic world settings {world}: {err}") from None
    n = opts["n"] or (episodes if task == "fgseg" else SYNTHETIC_DEFAULT_N[task])
    n = min(n, limit) if limit is not None else n
    shapes = config.shapes

    def key(*parts: int | str) -> int:
        return derive_seed(seed, "perception", task, *parts)

    units: list = []
    calibration: list = []
    if task == "fgseg":
        for e in range(n):
            shape = shapes[e % len(shapes)]
            support = tuple(_shape_sample(key(e, "support", k), config, shape, False, f"{e}/support{k}")
                            for k in range(shots))
            units.append(Episode(id=f"synthetic-{e:05d}", category=shape, support=support,
                                 query=_shape_sample(key(e, "query"), config, shape, False, f"{e}/query")))
    elif task == "coseg":
        for s in range(n):
            shape = shapes[s % len(shapes)]
            units.append(CoSegSet(name=f"{shape}-{s}", samples=tuple(
                _shape_sample(key(s, k), config, shape, True, f"{s}/{k}") for k in range(opts["set_size"]))))
    elif task == "textseg":
        n_cal = 0 if calibration_fraction == 0 else max(1, math.ceil(n * calibration_fraction / (1 - calibration_fraction)))
        units = [_shape_sample(key(i), config, shapes[i % len(shapes)], False, f"{i}") for i in range(n)]
        calibration = [_shape_sample(key("calibration", i), config, shapes[i % len(shapes)], False, f"cal{i}")
                       for i in range(n_cal)]
    elif task == "refseg":
        n_cal = 0 if calibration_fraction == 0 else max(1, math.ceil(n * calibration_fraction / (1 - calibration_fraction)))
        units = _synthetic_refs(n, config, lambda i: key(i), "")
        calibration = _synthetic_refs(n_cal, config, lambda i: key("calibration", i), "cal")
    elif task == "semcorr":
        for i in range(n):
            mode = opts["modes"][i % len(opts["modes"])]
            pair_seed = key(i)
            pair = _pair(pair_seed, config, mode)
            visible = [c for c in pair.correspondences if c.visible]
            x0, y0, x1, y1 = pair.target.objects[pair.target_index].box or (0, 0, 0, 0)
            units.append(KeypointPair(
                id=f"synthetic-{i:05d}", category=pair.category,
                source=functools.partial(synthetic_pair_image, pair_seed, config, mode, "source"),
                target=functools.partial(synthetic_pair_image, pair_seed, config, mode, "target"),
                source_xy=np.array([c.source_xy for c in visible], dtype=np.float64).reshape(-1, 2),
                target_xy=np.array([c.target_xy for c in visible], dtype=np.float64).reshape(-1, 2),
                target_bbox=(float(x0), float(y0), float(x1), float(y1)),
                meta={"mode": mode, "pair_seed": pair_seed, "kps_names": [c.name for c in visible]}))
    else:
        n_frames = opts["n_frames"]
        for i in range(n):
            clip_seed = key(i)
            units.append(VideoClip(
                name=f"clip{i:04d}",
                frames=tuple(functools.partial(synthetic_clip_frame, clip_seed, config, n_frames, t) for t in range(n_frames)),
                masks=tuple(functools.partial(synthetic_clip_mask, clip_seed, config, n_frames, t) for t in range(n_frames))))
    categories = tuple(shapes) if task in ("fgseg", "coseg", "textseg", "refseg", "semcorr") else ()
    return TaskData(task=task, format="synthetic", source=f"synthetic world (seed {seed}, {config.size_hw[0]}x"
                    f"{config.size_hw[1]} images)", units=units, calibration=calibration, categories=categories,
                    meta={"seed": seed, "config": config.to_dict(), "options": {k: v for k, v in opts.items() if k != "world"}})


def _synthetic_refs(n: int, config: WorldConfig, seed_of: Callable[[int], int], prefix: str) -> list[SegSample]:
    """n referring-expression items: scene i's expressions, one drawn per scene (scenes with none skipped)."""
    out: list[SegSample] = []
    i = 0
    while len(out) < n:
        if i > 20 * n + 100:  # pragma: no cover - every world with objects has attribute expressions
            raise UserError("the synthetic world yields no referring expressions: allow more shapes or colours")
        scene_seed = seed_of(i)
        expressions = referring_expressions(_plain_scene(scene_seed, config))
        i += 1
        if not expressions:
            continue
        pick = int(np.random.default_rng(np.random.SeedSequence([scene_seed, 3])).integers(len(expressions)))
        text, index = expressions[pick]
        out.append(SegSample(id=f"{prefix}{i - 1}", image=functools.partial(synthetic_scene_image, scene_seed, config),
                             mask=functools.partial(synthetic_object_mask, scene_seed, config, index),
                             category=_plain_scene(scene_seed, config).objects[index].shape, text=text,
                             meta={"scene_seed": scene_seed, "object": index}))
    return out


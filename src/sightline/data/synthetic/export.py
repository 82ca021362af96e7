"""Writing synthetic worlds to disk in the layouts sightline and the field read: image folders,
JSONL question manifests, COCO instances with keypoints, SPair-style keypoint pairs, DAVIS clips,
and the perception benchmarks' own layouts (Pascal-5i, MSRC co-segmentation, ImageNet-S,
RefCOCO, SPair-71k, DAVIS-2017) that `sightline.data.perception` reads."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sightline.data.synthetic.geometry import UNIT_SHAPES
from sightline.data.synthetic.language import questions, referring_expressions
from sightline.data.synthetic.layout import WorldConfig, configure, derive_seed, rng_for, sample_objects
from sightline.data.synthetic.motion import PAIR_MODES
from sightline.data.synthetic.render import Scene, render_scene
from sightline.data.synthetic.vocab import NUMBERS, QTYPES, SHAPES
from sightline.data.synthetic.world import GENERATOR, World
from sightline.errors import UserError

__all__ = [
    "FOLDER_ATTRIBUTES",
    "IMAGENET_S_IGNORE",
    "PASCAL_SHAPE_CLASS",
    "VOC_CLASSES",
    "davis_palette",
    "export_coco",
    "export_davis",
    "export_imagefolder",
    "export_imagenet_s",
    "export_jsonl",
    "export_msrc",
    "export_pairs",
    "export_pascal5i",
    "export_refcoco",
    "export_spair",
    "label_borders",
    "mask_to_rle",
    "scene_with_shape",
    "shape_wnid",
]

FOLDER_ATTRIBUTES = ("shape", "colour", "size", "style", "count")


def _prepare(root: str | os.PathLike, n: int, what: str = "n") -> Path:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"{what} must be a positive whole number, got {n!r}")
    path = Path(root).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"export folder {path} is a file: pass a folder path")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", compress_level=3)


def _save_jpeg(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=95, subsampling=0)


def _write_json(data: Any, path: Path, indent: int | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _progress(items: Iterable[int], total: int, show: bool, desc: str) -> Iterable[int]:
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit="img")


def _world_json(world: World, **more: Any) -> dict[str, Any]:
    return {"generator": GENERATOR, "seed": world.seed, "config": world.config.to_dict(), **more}


def export_imagefolder(root: str | os.PathLike, seed: int, n: int, config: WorldConfig | None = None,
                       attribute: str = "shape", progress: bool = False) -> Path:
    """Write n scenes as root/<label>/<i>.png, the label being `attribute` of the scene
    (shape, colour or size of its single object; or style; or count as a number word)."""
    if attribute not in FOLDER_ATTRIBUTES:
        raise UserError(f"unknown folder attribute {attribute!r}: use one of {', '.join(FOLDER_ATTRIBUTES)}")
    config = config or WorldConfig()
    if attribute in ("shape", "colour", "size"):
        if config.n_objects not in (None, 1):
            raise UserError(f"an image folder by {attribute} needs one object per image, but n_objects="
                            f"{config.n_objects}: use n_objects=1 or attribute='style'/'count'")
        config = dataclasses.replace(config, n_objects=1)
    path = _prepare(root, n)
    world = World(seed, config)
    for i in _progress(range(n), n, progress, "imagefolder"):
        scene = world.scene(i)
        if attribute == "style":
            label = scene.style
        elif attribute == "count":
            label = NUMBERS[len(scene.objects)]
        else:
            label = getattr(scene.objects[0], attribute)
        _save_png(scene.to_pil(), path / label / f"{i:06d}.png")
    _write_json(_world_json(world, layout="imagefolder", attribute=attribute, n=n), path / "world.json", indent=1)
    return path


def export_jsonl(root: str | os.PathLike, seed: int, n: int, config: WorldConfig | None = None,
                 qtypes: Sequence[str] = QTYPES, per_image: int | None = None, facts: bool = True,
                 progress: bool = False) -> Path:
    """Write n scenes to root/images/ and one manifest line per question to root/manifest.jsonl:
    {"image", "prompt" (the question), "label" (the answer), "qtype", "scene", "object", "facts"}.
    `per_image` keeps that many questions per scene (a seeded draw); None keeps all. Returns the
    manifest's path."""
    bad = [q for q in qtypes if q not in QTYPES]
    if bad:
        raise UserError(f"unknown question types {bad}: use {', '.join(QTYPES)}")
    if per_image is not None and (isinstance(per_image, bool) or not isinstance(per_image, int) or per_image < 1):
        raise UserError(f"per_image must be a positive whole number or None, got {per_image!r}")
    path = _prepare(root, n)
    world = World(seed, config)
    manifest = path / "manifest.jsonl"
    tmp = manifest.with_name(manifest.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for i in _progress(range(n), n, progress, "jsonl"):
            scene = world.scene(i)
            image = f"images/{i:06d}.png"
            _save_png(scene.to_pil(), path / image)
            asked = questions(scene, qtypes)
            if per_image is not None and per_image < len(asked):
                keep = rng_for(seed, "export-questions", i).choice(len(asked), size=per_image, replace=False)
                asked = [asked[k] for k in sorted(keep)]
            scene_facts = scene.to_json() if facts else None
            for q in asked:
                record = {"image": image, "prompt": q.question, "label": q.answer, "qtype": q.qtype,
                          "scene": i, "object": q.object}
                if facts:
                    record["facts"] = scene_facts
                out.write(json.dumps(record) + "\n")
    os.replace(tmp, manifest)
    _write_json(_world_json(world, layout="jsonl", n=n, qtypes=list(qtypes), per_image=per_image),
                path / "world.json", indent=1)
    return manifest


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE of an HxW bool mask: column-major run lengths, starting with a 0-run."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def coco_categories() -> list[dict[str, Any]]:
    """One COCO category per shape (id = 1 + SHAPES index), with its keypoint names."""
    return [{"id": k + 1, "name": shape, "supercategory": "shape",
             "keypoints": list(UNIT_SHAPES[shape].keypoint_names), "skeleton": []}
            for k, shape in enumerate(SHAPES)]


def _coco_annotations(scene: Scene, image_id: int, next_id: int) -> list[dict[str, Any]]:
    out = []
    for obj in scene.objects:
        if obj.area == 0:
            continue
        x0, y0, x1, y1 = obj.box  # type: ignore[misc]
        keypoints: list[float] = []
        for p in obj.keypoints:
            keypoints += [round(p.x, 3), round(p.y, 3), p.coco_v] if p.in_image else [0, 0, 0]
        out.append({
            "id": next_id + len(out), "image_id": image_id, "category_id": SHAPES.index(obj.shape) + 1,
            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": obj.area, "iscrowd": 0,
            "segmentation": mask_to_rle(obj.mask),
            "keypoints": keypoints, "num_keypoints": sum(p.coco_v > 0 for p in obj.keypoints),
            "instance": obj.index + 1,
            "attributes": {"colour": obj.colour, "size": obj.size, "rotation": round(obj.rotation, 3),
                           "visible_fraction": round(obj.visible_fraction, 4)},
        })
    return out


def export_coco(root: str | os.PathLike, seed: int, n: int, config: WorldConfig | None = None,
                progress: bool = False) -> Path:
    """Write n scenes to root/images/ and COCO instances to root/annotations.json: bbox [x, y, w, h]
    of the visible pixels, segmentation as uncompressed RLE (column-major counts), area = visible
    pixels, keypoints [x, y, v] (v: 2 visible, 1 occluded, 0 outside, then x = y = 0). Returns the
    annotation file's path."""
    path = _prepare(root, n)
    world = World(seed, config)
    images, annotations = [], []
    for i in _progress(range(n), n, progress, "coco"):
        scene = world.scene(i)
        name = f"images/{i:06d}.png"
        _save_png(scene.to_pil(), path / name)
        images.append({"id": i + 1, "file_name": name, "width": scene.width, "height": scene.height,
                       "style": scene.style, "background": list(scene.background)})
        annotations += _coco_annotations(scene, i + 1, len(annotations) + 1)
    data = {"info": _world_json(world, layout="coco", n=n), "images": images, "annotations": annotations,
            "categories": coco_categories()}
    target = path / "annotations.json"
    _write_json(data, target)
    return target


def export_pairs(root: str | os.PathLike, seed: int, n: int, config: WorldConfig | None = None,
                 mode: str = "transform", progress: bool = False, **pair_kwargs: Any) -> Path:
    """Write n pairs to root/images/<i>_src.png, <i>_trg.png and root/pairs.json (SPair-style: per pair
    src/trg image, category, the keypoints visible in both as src_kps/trg_kps with kps_names,
    src/trg boxes (x0, y0, x1, y1), the 2x3 source->target transform or null). Returns pairs.json's path."""
    if mode not in PAIR_MODES:
        raise UserError(f"unknown pair mode {mode!r}: use one of {', '.join(PAIR_MODES)}")
    path = _prepare(root, n)
    world = World(seed, config)
    pairs = []
    for i in _progress(range(n), n, progress, "pairs"):
        pair = world.pair(i, mode=mode, **pair_kwargs)
        src, trg = f"images/{i:06d}_src.png", f"images/{i:06d}_trg.png"
        _save_png(pair.source.to_pil(), path / src)
        _save_png(pair.target.to_pil(), path / trg)
        pairs.append({"pair_id": i, "src_imname": src, "trg_imname": trg,
                      "src_imsize": [pair.source.width, pair.source.height],
                      "trg_imsize": [pair.target.width, pair.target.height], **pair.to_json()})
    target = path / "pairs.json"
    _write_json({"info": _world_json(world, layout="pairs", n=n, mode=mode), "categories": list(SHAPES),
                 "pairs": pairs}, target)
    return target


def davis_palette() -> list[int]:
    """The 256-colour PASCAL VOC / DAVIS palette as a flat [r, g, b, ...] list (index 0 black)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def export_davis(root: str | os.PathLike, seed: int, n_clips: int, config: WorldConfig | None = None,
                 n_frames: int = 12, frame_format: str = "jpg", progress: bool = False,
                 resolution: str | None = None, **clip_kwargs: Any) -> Path:
    """Write clips in the DAVIS layout: root/JPEGImages/<clip>/00000.jpg (or .png),
    root/Annotations/<clip>/00000.png (palette PNG, pixel = instance id, 0 background),
    root/ImageSets/val.txt (clip names) and root/clips.json (per-frame facts). Returns root.

    `resolution="480p"` writes DAVIS-2017's own layout instead: root/JPEGImages/480p/<clip>/,
    root/Annotations/480p/<clip>/ and root/ImageSets/2017/val.txt."""
    if frame_format not in ("jpg", "png"):
        raise UserError(f"frame_format must be 'jpg' or 'png', got {frame_format!r}")
    if resolution is not None and resolution not in ("480p", "Full-Resolution"):
        raise UserError(f"resolution must be None, '480p' or 'Full-Resolution', got {resolution!r}")
    path = _prepare(root, n_clips, "n_clips")
    images_dir = path / "JPEGImages" / resolution if resolution else path / "JPEGImages"
    annotations_dir = path / "Annotations" / resolution if resolution else path / "Annotations"
    sets_dir = path / "ImageSets" / "2017" if resolution else path / "ImageSets"
    world = World(seed, config)
    palette = davis_palette()
    names, facts = [], {}
    for i in _progress(range(n_clips), n_clips, progress, "davis"):
        clip = world.clip(i, n_frames=n_frames, **clip_kwargs)
        name = f"clip{i:04d}"
        names.append(name)
        (images_dir / name).mkdir(parents=True, exist_ok=True)
        (annotations_dir / name).mkdir(parents=True, exist_ok=True)
        for t, frame in enumerate(clip.frames):
            image = frame.to_pil()
            if frame_format == "jpg":
                _save_jpeg(image, images_dir / name / f"{t:05d}.jpg")
            else:
                _save_png(image, images_dir / name / f"{t:05d}.png")
            annotation = Image.fromarray(frame.instance_mask, "P")
            annotation.putpalette(palette)
            _save_png(annotation, annotations_dir / name / f"{t:05d}.png")
        facts[name] = clip.to_json()
    sets_dir.mkdir(parents=True, exist_ok=True)
    (sets_dir / "val.txt").write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    _write_json({"info": _world_json(world, layout="davis", n_clips=n_clips, n_frames=n_frames),
                 "clips": facts}, path / "clips.json")
    return path


# ---------------------------------------------------------------------------------------------
# the perception benchmarks' layouts (read back by sightline.data.perception)

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# Shape -> VOC class id (1..20): shape k goes to fold k % 4, as that fold's class 1 + k // 4, so
# every Pascal-5i fold holds two shapes.
PASCAL_SHAPE_CLASS: dict[str, int] = {shape: 5 * (k % 4) + 1 + k // 4 for k, shape in enumerate(SHAPES)}
IMAGENET_S_IGNORE = 1000  # ImageNet-S's "other / ignore" id in its R + 256 G label PNGs


def shape_wnid(shape: str) -> str:
    """The made-up WordNet id of a shape in an ImageNet-S export (sorted wnids follow SHAPES)."""
    return f"n{90000001 + SHAPES.index(shape):08d}"


def scene_with_shape(seed: int, config: WorldConfig | None, shape: str, exclusive: bool = False) -> Scene:
    """Scene `seed` forced to hold a `shape` (in a seeded slot); `exclusive`: no other object of it."""
    config = configure(config, {})
    rng = rng_for(seed, "objects")
    n_objects = config.n_objects or 1 + int(rng.choice(len(config.count_probs), p=np.asarray(config.count_probs, float)))
    others = config
    if exclusive:
        rest = tuple(s for s in config.shapes if s != shape)
        if rest:
            others = dataclasses.replace(config, shapes=rest)
        else:
            n_objects = 1
    slot = int(rng.integers(n_objects))
    specs = sample_objects(rng, others, n_objects=n_objects, fixed_shapes={slot: shape})
    return render_scene(seed, config, objects=specs)


def label_borders(label: np.ndarray) -> np.ndarray:
    """HxW bool: object pixels (label > 0) with a 4-neighbour of another label (VOC-style borders)."""
    border = np.zeros(label.shape, dtype=bool)
    differs_v = label[1:] != label[:-1]
    differs_h = label[:, 1:] != label[:, :-1]
    border[1:] |= differs_v
    border[:-1] |= differs_v
    border[:, 1:] |= differs_h
    border[:, :-1] |= differs_h
    return border & (label > 0)


def _cycled_shape(config: WorldConfig, i: int) -> str:
    return config.shapes[i % len(config.shapes)]


def export_pascal5i(root: str | os.PathLike, seed: int, n: int, config: WorldConfig | None = None,
                    border: bool = True, progress: bool = False) -> Path:
    """Write n scenes in the VOC2012 layout HSNet reads for Pascal-5i: root/JPEGImages/<name>.jpg,
    root/SegmentationClassAug/<name>.png (grey PNG, value = VOC class id via PASCAL_SHAPE_CLASS,
    0 background, 255 on object borders if `border`), root/ImageSets/Segmentation/val.txt and
    HSNet's fold lists root/splits/pascal/val/fold{0..3}.txt (`<name>__<class id, 2 digits>`).
    Scene i is forced to hold shape i mod len(shapes). Returns root."""
    config = configure(config, {})
    path = _prepare(root, n)
    names, present = [], []
    for i in _progress(range(n), n, progress, "pascal5i"):
        scene = scene_with_shape(derive_seed(seed, "pascal5i", i), config, _cycled_shape(config, i))
        label = np.zeros(scene.size_hw, dtype=np.uint8)
        for k, shape in enumerate(SHAPES):
            label[scene.class_mask == k + 1] = PASCAL_SHAPE_CLASS[shape]
        if border:
            label[label_borders(scene.instance_mask)] = 255
        name = f"synth_{i:06d}"
        _save_jpeg(scene.to_pil(), path / "JPEGImages" / f"{name}.jpg")
        _save_png(Image.fromarray(label, "L"), path / "SegmentationClassAug" / f"{name}.png")
        names.append(name)
        present.append(sorted(int(c) for c in np.unique(label) if 0 < c < 255))
    (path / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (path / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{m}\n" for m in names), encoding="utf-8")
    (path / "splits" / "pascal" / "val").mkdir(parents=True, exist_ok=True)
    for fold in range(4):
        lines = [f"{name}__{c:02d}\n" for c in range(5 * fold + 1, 5 * fold + 6)
                 for name, classes in zip(names, present) if c in classes]
        (path / "splits" / "pascal" / "val" / f"fold{fold}.txt").write_text("".join(lines), encoding="utf-8")
    _write_json(_world_json(World(seed, config), layout="pascal5i", n=n, border=border,
                            shape_class=PASCAL_SHAPE_CLASS), path / "world.json", indent=1)
    return path


def export_msrc(root: str | os.PathLike, seed: int, n_per_class: int, config: WorldConfig | None = None,
                progress: bool = False) -> Path:
    """Write co-segmentation sets in the Object Discovery (Rubinstein et al.) MSRC layout:
    root/<shape>/<name>.bmp and root/<shape>/GroundTruth/<name>.png (0 / 255), one folder per shape
    of `config.shapes`, each image holding exactly one object of that shape (its mask) among others.
    Image j of shape s is `scene_with_shape(derive_seed(seed, "msrc", s, j), config, s, exclusive=True)`.
    Returns root."""
    config = configure(config, {})
    path = _prepare(root, n_per_class, "n_per_class")
    total = n_per_class * len(config.shapes)
    for step in _progress(range(total), total, progress, "msrc"):
        shape, j = config.shapes[step // n_per_class], step % n_per_class
        scene = scene_with_shape(derive_seed(seed, "msrc", shape, j), config, shape, exclusive=True)
        name = f"{j + 1}_{shape}_s"
        (path / shape).mkdir(parents=True, exist_ok=True)
        scene.to_pil().save(path / shape / f"{name}.bmp", format="BMP")
        mask = np.where(scene.class_mask == SHAPES.index(shape) + 1, 255, 0).astype(np.uint8)
        _save_png(Image.fromarray(mask, "L"), path / shape / "GroundTruth" / f"{name}.png")
    _write_json(_world_json(World(seed, config), layout="msrc", n_per_class=n_per_class), path / "world.json", indent=1)
    return path


def export_imagenet_s(root: str | os.PathLike, seed: int, n: int, config: WorldConfig | None = None,
                      ignore_borders: bool = True, progress: bool = False) -> Path:
    """Write n scenes in the ImageNet-S layout: root/ImageNetS8/validation/<wnid>/<name>.JPEG and
    root/ImageNetS8/validation-segmentation/<wnid>/<name>.png (RGB, class id = R + 256 G, id =
    1 + SHAPES index, 0 background, 1000 on object borders if `ignore_borders`), the category list
    root/data/categories/ImageNetS_categories_im8.txt (wnids, shuffled as the real list is) and
    root/LOC_synset_mapping.txt (`<wnid> <name>`). Scene i holds shape i mod len(shapes) and lies in
    that shape's folder. Returns root."""
    config = configure(config, {})
    path = _prepare(root, n)
    base = path / f"ImageNetS{len(SHAPES)}"
    for i in _progress(range(n), n, progress, "imagenet-s"):
        shape = _cycled_shape(config, i)
        scene = scene_with_shape(derive_seed(seed, "imagenet-s", i), config, shape)
        ids = scene.class_mask.astype(np.int64)
        if ignore_borders:
            ids[label_borders(scene.instance_mask)] = IMAGENET_S_IGNORE
        rgb = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], -1).astype(np.uint8)
        name, wnid = f"ILSVRC2012_val_{i + 1:08d}", shape_wnid(shape)
        _save_jpeg(scene.to_pil(), base / "validation" / wnid / f"{name}.JPEG")
        _save_png(Image.fromarray(rgb, "RGB"), base / "validation-segmentation" / wnid / f"{name}.png")
    wnids = [shape_wnid(s) for s in SHAPES]
    shuffled = [wnids[k] for k in rng_for(seed, "imagenet-s-categories").permutation(len(wnids))]
    categories = path / "data" / "categories"
    categories.mkdir(parents=True, exist_ok=True)
    (categories / f"ImageNetS_categories_im{len(SHAPES)}.txt").write_text("\n".join(shuffled), encoding="utf-8")
    (path / "LOC_synset_mapping.txt").write_text(
        "".join(f"{shape_wnid(s)} {s}, synthetic {s}\n" for s in SHAPES), encoding="utf-8")
    _write_json(_world_json(World(seed, config), layout="imagenet-s", n=n, ignore_borders=ignore_borders),
                path / "world.json", indent=1)
    return path


REFCOCO_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
REFCOCO_QUESTION = "Provide a short description for this region."  # lmms-lab/RefCOCO's `question`


def export_refcoco(root: str | os.PathLike, seed: int, n: int, config: WorldConfig | None = None,
                   dataset: str = "refcoco", val_fraction: float = 0.5, fmt: str = "json",
                   progress: bool = False) -> Path:
    """Write n scenes as a RefCOCO-family dataset. fmt "json": root/images/train2014/<file>.jpg,
    root/<dataset>/instances.json (COCO: images, annotations with uncompressed-RLE segmentation,
    categories) and root/<dataset>/refs(unc|umd).json (the refs(*).p records as JSON: ref_id,
    ann_id, image_id, category_id, split, file_name, sentences [{sent, raw, tokens, sent_id}]).
    fmt "parquet" (needs pyarrow): root/data/<split>-00000-of-00001.parquet as lmms-lab/RefCOCO
    ships it, one row per ref (question_id, image {bytes, path}, question, answer = its sentences,
    segmentation as COCO JSON text, bbox [x, y, w, h], iscrowd, file_name). A ref is one object
    with its referring expressions (every expression resolves to it alone); scenes below
    round(val_fraction * n) are split "val", the rest "train". Returns root."""
    if dataset not in REFCOCO_SPLIT_BY:
        raise UserError(f"unknown RefCOCO dataset {dataset!r}: use one of {', '.join(REFCOCO_SPLIT_BY)}")
    if fmt not in ("json", "parquet"):
        raise UserError(f"RefCOCO export format must be 'json' or 'parquet', got {fmt!r}")
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("writing RefCOCO parquet needs pyarrow: pip install pyarrow") from None
    path = _prepare(root, n)
    world = World(seed, config)
    n_val = round(val_fraction * n)
    images, annotations, refs = [], [], []
    image_bytes: dict[int, bytes] = {}
    for i in _progress(range(n), n, progress, "refcoco"):
        scene = world.scene(i)
        image_id = i + 1
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        image_path = path / "images" / "train2014" / file_name
        _save_jpeg(scene.to_pil(), image_path)
        if fmt == "parquet":
            image_bytes[image_id] = image_path.read_bytes()
        images.append({"id": image_id, "file_name": file_name, "height": scene.height, "width": scene.width})
        anns = _coco_annotations(scene, image_id, len(annotations) + 1)
        annotations += anns
        by_object: dict[int, list[str]] = {}
        for text, index in referring_expressions(scene):
            by_object.setdefault(index, []).append(text)
        for ann in anns:
            sentences = by_object.get(ann["instance"] - 1)
            if not sentences:
                continue
            first = len(refs) * 10
            refs.append({
                "ref_id": len(refs), "ann_id": ann["id"], "image_id": image_id, "category_id": ann["category_id"],
                "split": "val" if i < n_val else "train", "file_name": file_name,
                "sent_ids": [first + k for k in range(len(sentences))],
                "sentences": [{"sent": s, "raw": s, "tokens": s.split(), "sent_id": first + k}
                              for k, s in enumerate(sentences)],
            })
    if fmt == "json":
        folder = path / dataset
        folder.mkdir(parents=True, exist_ok=True)
        _write_json({"info": _world_json(world, layout="refcoco", n=n), "images": images,
                     "annotations": annotations, "categories": coco_categories()}, folder / "instances.json")
        _write_json(refs, folder / f"refs({REFCOCO_SPLIT_BY[dataset]}).json")
        return path
    by_id = {a["id"]: a for a in annotations}
    (path / "data").mkdir(parents=True, exist_ok=True)
    for split in sorted({r["split"] for r in refs}):
        rows = [r for r in refs if r["split"] == split]
        table = pa.table({
            "question_id": [str(r["ann_id"]) for r in rows],
            "image": [{"bytes": image_bytes[r["image_id"]], "path": r["file_name"]} for r in rows],
            "question": [REFCOCO_QUESTION] * len(rows),
            "answer": [[s["sent"] for s in r["sentences"]] for r in rows],
            "segmentation": [json.dumps(by_id[r["ann_id"]]["segmentation"]) for r in rows],
            "bbox": [[float(v) for v in by_id[r["ann_id"]]["bbox"]] for r in rows],
            "iscrowd": [0] * len(rows),
            "file_name": [r["file_name"] for r in rows],
        })
        pq.write_table(table, path / "data" / f"{split}-00000-of-00001.parquet")
    _write_json(_world_json(world, layout="refcoco-parquet", n=n), path / "world.json", indent=1)
    return path


def export_spair(root: str | os.PathLike, seed: int, n: int, config: WorldConfig | None = None,
                 split: str = "test", modes: Sequence[str] = PAIR_MODES, progress: bool = False,
                 **pair_kwargs: Any) -> Path:
    """Write n pairs in the SPair-71k layout: root/JPEGImages/<category>/<name>.jpg,
    root/PairAnnotation/<split>/<id>-<src>-<trg>:<category>.json (src_imname, trg_imname,
    src_imsize / trg_imsize [w, h, 3], src_bndbox / trg_bndbox [x0, y0, x1, y1], category,
    src_kps / trg_kps: the keypoints visible in both, kps_ids, and SPair's variation flags; plus
    mode and transform) and root/Layout/large/<split>.txt (the pair names). Pair i is
    World(seed, config).pair(i, mode=modes[i % len(modes)]). Returns root."""
    bad = [m for m in modes if m not in PAIR_MODES]
    if bad or not modes:
        raise UserError(f"unknown pair modes {list(modes)!r}: use some of {', '.join(PAIR_MODES)}")
    if split not in ("trn", "val", "test"):
        raise UserError(f"SPair-71k split must be 'trn', 'val' or 'test', got {split!r}")
    path = _prepare(root, n)
    world = World(seed, config)
    names = []
    for i in _progress(range(n), n, progress, "spair"):
        mode = modes[i % len(modes)]
        pair = world.pair(i, mode=mode, **pair_kwargs)
        facts = pair.to_json()
        category = pair.category
        src, trg = f"synth_{i:06d}_s", f"synth_{i:06d}_t"
        _save_jpeg(pair.source.to_pil(), path / "JPEGImages" / category / f"{src}.jpg")
        _save_jpeg(pair.target.to_pil(), path / "JPEGImages" / category / f"{trg}.jpg")
        names_all = UNIT_SHAPES[category].keypoint_names
        name = f"{i + 1:06d}-{src}-{trg}:{category}"
        record = {
            "pair_id": i + 1, "filename": f"{name}.json", "src_imname": f"{src}.jpg", "trg_imname": f"{trg}.jpg",
            "src_imsize": [pair.source.width, pair.source.height, 3],
            "trg_imsize": [pair.target.width, pair.target.height, 3],
            "src_bndbox": facts["src_bndbox"], "trg_bndbox": facts["trg_bndbox"], "category": category,
            "src_pose": "Unspecified", "trg_pose": "Unspecified",
            "src_kps": facts["src_kps"], "trg_kps": facts["trg_kps"],
            "kps_ids": [names_all.index(k) for k in facts["kps_names"]],
            "viewpoint_variation": 0, "scale_variation": 0, "truncation": 0, "occlusion": 0,
            "mirror": int(pair.transform is not None and np.linalg.det(pair.transform[:, :2]) < 0),
            "mode": mode, "transform": facts["transform"],
        }
        (path / "PairAnnotation" / split).mkdir(parents=True, exist_ok=True)
        _write_json(record, path / "PairAnnotation" / split / f"{name}.json")
        names.append(name)
    (path / "Layout" / "large").mkdir(parents=True, exist_ok=True)
    (path / "Layout" / "large" / f"{split}.txt").write_text("".join(f"{m}\n" for m in names), encoding="utf-8")
    _write_json(_world_json(world, layout="spair", n=n, modes=list(modes)), path / "world.json", indent=1)
    return path

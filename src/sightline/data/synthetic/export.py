"""Writing synthetic worlds to disk in the layouts sightline and the field read: image folders,
JSONL question manifests, COCO instances with keypoints, SPair-style keypoint pairs, DAVIS clips."""

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
from sightline.data.synthetic.language import questions
from sightline.data.synthetic.layout import WorldConfig, rng_for
from sightline.data.synthetic.motion import PAIR_MODES
from sightline.data.synthetic.render import Scene
from sightline.data.synthetic.vocab import NUMBERS, QTYPES, SHAPES
from sightline.data.synthetic.world import GENERATOR, World
from sightline.errors import UserError

__all__ = [
    "FOLDER_ATTRIBUTES",
    "davis_palette",
    "export_coco",
    "export_davis",
    "export_imagefolder",
    "export_jsonl",
    "export_pairs",
    "mask_to_rle",
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
                 **clip_kwargs: Any) -> Path:
    """Write clips in the DAVIS layout: root/JPEGImages/<clip>/00000.jpg (or .png),
    root/Annotations/<clip>/00000.png (palette PNG, pixel = instance id, 0 background),
    root/ImageSets/val.txt (clip names) and root/clips.json (per-frame facts). Returns root."""
    if frame_format not in ("jpg", "png"):
        raise UserError(f"frame_format must be 'jpg' or 'png', got {frame_format!r}")
    path = _prepare(root, n_clips, "n_clips")
    world = World(seed, config)
    palette = davis_palette()
    names, facts = [], {}
    for i in _progress(range(n_clips), n_clips, progress, "davis"):
        clip = world.clip(i, n_frames=n_frames, **clip_kwargs)
        name = f"clip{i:04d}"
        names.append(name)
        (path / "JPEGImages" / name).mkdir(parents=True, exist_ok=True)
        (path / "Annotations" / name).mkdir(parents=True, exist_ok=True)
        for t, frame in enumerate(clip.frames):
            image = frame.to_pil()
            if frame_format == "jpg":
                image.save(path / "JPEGImages" / name / f"{t:05d}.jpg", format="JPEG", quality=95, subsampling=0)
            else:
                _save_png(image, path / "JPEGImages" / name / f"{t:05d}.png")
            annotation = Image.fromarray(frame.instance_mask, "P")
            annotation.putpalette(palette)
            _save_png(annotation, path / "Annotations" / name / f"{t:05d}.png")
        facts[name] = clip.to_json()
    (path / "ImageSets").mkdir(exist_ok=True)
    (path / "ImageSets" / "val.txt").write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    _write_json({"info": _world_json(world, layout="davis", n_clips=n_clips, n_frames=n_frames),
                 "clips": facts}, path / "clips.json")
    return path

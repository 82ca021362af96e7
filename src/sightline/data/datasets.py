"""Image datasets on disk (ImageNet-style folders, flat folders, jsonl manifests) as stable lists of examples."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from PIL import Image

from sightline.data.images import IMAGE_EXTENSIONS, is_image_file, load_image
from sightline.errors import UserError

__all__ = ["DATASET_KINDS", "Example", "ImageDataset", "open_dataset"]

DATASET_KINDS = ("auto", "imagefolder", "flat", "jsonl")


@dataclass(frozen=True)
class Example:
    """One image of a dataset, with its stable id and whatever the dataset says about it."""

    id: int  # position in the dataset's stable order
    path: str  # absolute path of the image
    label: str | None = None
    prompt: str | None = None  # None: the run's --prompt
    # Text placed before the image in the user turn. None: the run's --prefix; "" explicitly none
    # (rendered exactly as no prefix).
    prefix: str | None = None
    # Extra jsonl fields, JSON-able. Left out of the hash so an Example can key a dict or a set.
    meta: dict[str, Any] = field(default_factory=dict, hash=False)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict with id, path, label, prompt, prefix and meta."""
        return {"id": self.id, "path": self.path, "label": self.label, "prompt": self.prompt,
                "prefix": self.prefix, "meta": dict(self.meta)}


class ImageDataset(Sequence[Example]):
    """A listed dataset: examples 0..n-1 in a stable order; images are decoded only when asked for."""

    def __init__(
        self,
        kind: str,
        root: str,
        paths: list[str],
        labels: list[str | None] | None = None,
        prompts: list[str | None] | None = None,
        metas: list[dict[str, Any]] | None = None,
        classes: list[str] | None = None,
        prefixes: list[str | None] | None = None,
    ):
        # Stored column by column and turned into Examples on access, so that an ImageNet-sized
        # listing costs a list of strings, not a million dataclasses.
        n = len(paths)
        self.kind = kind
        self.root = root  # the folder or the .jsonl file the dataset was opened from, absolute
        self._paths = paths
        self._labels = labels if labels is not None else [None] * n
        self._prompts = prompts if prompts is not None else [None] * n
        self._prefixes = prefixes if prefixes is not None else [None] * n
        self._metas = metas
        self.classes: list[str] = (
            classes if classes is not None else sorted({x for x in self._labels if x is not None})
        )
        if (not len(self._labels) == len(self._prompts) == len(self._prefixes) == n
                or (metas is not None and len(metas) != n)):
            raise ValueError("paths, labels, prompts, prefixes and metas must have one entry per example")

    def __len__(self) -> int:
        return len(self._paths)

    @overload
    def __getitem__(self, i: int) -> Example: ...
    @overload
    def __getitem__(self, i: slice) -> list[Example]: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        index = int(i)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"example {i} out of range for a dataset of {n}")
        meta = dict(self._metas[index]) if self._metas is not None else {}
        return Example(id=index, path=self._paths[index], label=self._labels[index],
                       prompt=self._prompts[index], prefix=self._prefixes[index], meta=meta)

    def __iter__(self) -> Iterator[Example]:
        for index in range(len(self)):
            yield self[index]

    def __repr__(self) -> str:
        return (f"ImageDataset(kind={self.kind!r}, root={self.root!r}, n={len(self)}, "
                f"classes={len(self.classes)})")

    def load_image(self, i: int) -> Image.Image:
        """The decoded RGB image of example `i` (BadImageError if the file is bad)."""
        return load_image(self[i].path)

    def subset(self, ids: Iterable[int]) -> list[Example]:
        """The examples with these ids, in the order given."""
        return [self[i] for i in ids]


def open_dataset(path: str | os.PathLike, kind: str = "auto", limit: int | None = None) -> ImageDataset:
    """List the images of a folder or .jsonl manifest (no image is opened) as an ImageDataset."""
    if kind not in DATASET_KINDS:
        raise UserError(f"unknown dataset kind {kind!r}: use one of {', '.join(DATASET_KINDS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"dataset limit must be a positive whole number, got {limit!r}")
    root = os.path.abspath(os.fspath(path))
    if not os.path.exists(root):
        raise UserError(f"data path {root} does not exist: check the path")
    if kind == "auto":
        kind = _detect_kind(root)
    if kind == "jsonl":
        dataset = _open_jsonl(root)
    elif kind in ("imagefolder", "flat"):
        if not os.path.isdir(root):
            raise UserError(f"data path {root} is not a folder, but dataset kind {kind!r} needs one")
        dataset = _open_imagefolder(root) if kind == "imagefolder" else _open_flat(root)
    else:  # pragma: no cover - DATASET_KINDS is checked above
        raise AssertionError(kind)
    if len(dataset) == 0 and dataset.kind == "jsonl":
        raise UserError(f'{root} lists no images: add one line per image, e.g. {{"image": "cat.jpg"}}')
    if len(dataset) == 0:
        raise UserError(
            f"no images found in {root}: accepted extensions are {' '.join(IMAGE_EXTENSIONS)} "
            f"(any case); hidden files and folders are skipped"
        )
    if limit is not None and limit < len(dataset):
        dataset = ImageDataset(
            dataset.kind, dataset.root, dataset._paths[:limit], dataset._labels[:limit],
            dataset._prompts[:limit], None if dataset._metas is None else dataset._metas[:limit],
            # Classes come from the whole listing so that label indices do not depend on `limit`.
            classes=dataset.classes, prefixes=dataset._prefixes[:limit],
        )
    return dataset


def _detect_kind(root: str) -> str:
    """jsonl for a .jsonl file, imagefolder for a folder of class folders, flat for a folder of images."""
    if os.path.isfile(root):
        if root.lower().endswith(".jsonl"):
            return "jsonl"
        raise UserError(f"data path {root} is a file but not a .jsonl manifest: "
                        "pass a folder of images or a .jsonl file")
    top_files, top_dirs = _scan(root)
    if any(is_image_file(name) for name in top_files):
        return "flat"
    if top_dirs:
        return "imagefolder"
    return "flat"  # nothing at all: the "no images" error below names the path


def _scan(folder: str) -> tuple[list[str], list[str]]:
    """Sorted visible (file names, folder names) of one folder, following symlinks."""
    files, dirs = [], []
    try:
        entries = list(os.scandir(folder))
    except OSError as err:
        raise UserError(f"cannot list data folder {folder}: {err.strerror or err}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir():
                dirs.append(entry.name)
            elif entry.is_file():
                files.append(entry.name)
        except OSError:
            continue  # a dangling symlink or a vanished entry is not an image
    return sorted(files), sorted(dirs)


def _walk_images(folder: str, prefix: str = "", ancestors: frozenset[str] = frozenset()) -> list[str]:
    """Relative posix paths of all visible images under `folder`, sorted, following symlinked folders."""
    real = os.path.realpath(folder)
    if real in ancestors:  # a symlink pointing back up the tree would never end
        return []
    ancestors = ancestors | {real}
    files, dirs = _scan(folder)
    found = [prefix + name for name in files if is_image_file(name)]
    for name in dirs:
        found += _walk_images(os.path.join(folder, name), f"{prefix}{name}/", ancestors)
    # Plain string order of "/"-joined paths: identical on every run, process and platform.
    return sorted(found)


def _open_flat(root: str) -> ImageDataset:
    relative = _walk_images(root)
    return ImageDataset("flat", root, [_join(root, rel) for rel in relative])


def _open_imagefolder(root: str) -> ImageDataset:
    top_files, class_dirs = _scan(root)
    stray = [name for name in top_files if is_image_file(name)]
    if stray:
        raise UserError(
            f"{root} has images at its top level ({stray[0]}, ...) but an imagefolder keeps each "
            "class in its own subfolder: move them into one, or open it with kind='flat'"
        )
    paths, labels = [], []
    for label in class_dirs:  # sorted: order is (class, relative path)
        for rel in _walk_images(os.path.join(root, label)):
            paths.append(_join(root, f"{label}/{rel}"))
            labels.append(label)
    # A class folder with no image in it adds no class.
    return ImageDataset("imagefolder", root, paths, labels=labels)


def _open_jsonl(manifest: str) -> ImageDataset:
    if not os.path.isfile(manifest):
        raise UserError(f"data path {manifest} is not a file, but dataset kind 'jsonl' needs a .jsonl file")
    base = os.path.dirname(manifest)
    paths, labels, prompts, prefixes, metas = [], [], [], [], []
    try:
        with open(manifest, encoding="utf-8-sig") as lines:  # -sig: tolerate a leading BOM
            for line_no, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                record = _parse_line(manifest, line_no, line)
                paths.append(os.path.normpath(os.path.join(base, os.path.expanduser(record.pop("image")))))
                labels.append(record.pop("label", None))
                prompts.append(record.pop("prompt", None))
                prefixes.append(record.pop("prefix", None))
                metas.append(record)
    except UnicodeDecodeError as err:
        raise UserError(f"{manifest} is not UTF-8 text ({err.reason} at byte {err.start}): "
                        "save it as UTF-8") from None
    return ImageDataset("jsonl", manifest, paths, labels, prompts, metas, prefixes=prefixes)


def _parse_line(manifest: str, line_no: int, line: str) -> dict[str, Any]:
    """One manifest line as a dict with a string "image" and string-or-null "label"/"prompt"/"prefix"."""
    where = f"{manifest} line {line_no}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where} is not valid JSON ({err.msg} at column {err.colno}): fix that line") from None
    if not isinstance(record, dict):
        raise UserError(f'{where} must be a JSON object like {{"image": "cat.jpg"}}, got {type(record).__name__}')
    image = record.get("image")
    if image is None:
        raise UserError(f'{where} has no "image" key: give each line the image path, '
                        f'e.g. {{"image": "cat.jpg"}}')
    if not isinstance(image, str) or not image.strip():
        raise UserError(f'{where}: "image" must be a non-empty path string, got {image!r}')
    for key in ("label", "prompt", "prefix"):
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            raise UserError(f'{where}: "{key}" must be a string or null, got {value!r} '
                            f'(write it as "{value}")')
    return record


def _join(root: str, relative_posix: str) -> str:
    return os.path.join(root, *relative_posix.split("/"))

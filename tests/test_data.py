"""sightline.data: every image mode decodes to the right RGB pixels, bad files fail clearly, datasets list stably."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from sightline.data import IMAGE_EXTENSIONS, Example, ImageDataset, load_image, open_dataset
from sightline.data import images as images_module
from sightline.errors import BadImageError, UserError

# ---------------------------------------------------------------------------------------------
# helpers


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def png_rgb16(values_hw3: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = values_hw3.shape
    raw = b"".join(b"\x00" + values_hw3[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def noise_rgb(size_hw=(32, 32), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size_hw, 3), dtype=np.uint8))


def tiny(path: Path, colour=(10, 20, 30)) -> Path:
    return save(Image.new("RGB", (2, 2), colour), path)


# ---------------------------------------------------------------------------------------------
# load_image: modes


def test_rgb_png_round_trips_exactly(tmp_path):
    source = noise_rgb()
    image = load_image(save(source, tmp_path / "a.png"))
    assert np.array_equal(pixels(image), np.asarray(source))


def test_gray_l_and_1_bit(tmp_path):
    gray = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8))
    assert pixels(load_image(save(gray, tmp_path / "l.png")))[0].tolist() == [[0] * 3, [77] * 3, [255] * 3]
    bits = Image.new("1", (2, 1), 0)
    bits.putpixel((1, 0), 1)
    assert pixels(load_image(save(bits, tmp_path / "b.png")))[0].tolist() == [[0] * 3, [255] * 3]


@pytest.mark.parametrize("suffix", [".png", ".tif", ".pgm"])
def test_16_bit_gray_scales_by_bit_depth_not_clipping(tmp_path, suffix):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / f"g16{suffix}")
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I")  # really a high-bit file, whatever mode Pillow picks
    assert pixels(load_image(path))[0, :, 0].tolist() == [0, 1, 128, 255]


def test_32_bit_gray_tiff_scales_by_32_bits(tmp_path):
    values = np.array([[0, 2**30, 2**31 - 1]], dtype=np.int32)
    path = save(Image.fromarray(values), tmp_path / "g32.tif")
    assert pixels(load_image(path))[0, :, 0].tolist() == [0, 128, 255]


def test_float_gray_in_unit_range_scales_to_255(tmp_path):
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    path = save(Image.fromarray(values), tmp_path / "f.tif")
    assert pixels(load_image(path))[0, :, 0].tolist() == [0, 128, 255]


def test_16_bit_rgb_png(tmp_path):
    path = tmp_path / "rgb16.png"
    path.write_bytes(png_rgb16(np.array([[[65535, 0, 32768]]], dtype=np.uint16)))
    assert pixels(load_image(path))[0, 0].tolist() == [255, 0, 128]


def test_palette_opaque_and_with_transparency(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    opaque = load_image(save(palette, tmp_path / "p.png"))
    assert pixels(opaque)[0].tolist() == [[255, 0, 0], [0, 0, 255]]
    palette.info["transparency"] = 1
    for name in ("pt.png", "pt.gif"):
        seen = load_image(save(palette, tmp_path / name, transparency=1))
        assert pixels(seen)[0].tolist() == [[255, 0, 0], [255, 255, 255]], name


def test_alpha_is_composited_onto_white(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    rgba.putpixel((1, 0), (10, 20, 30, 255))  # opaque -> unchanged
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half over white -> about 127
    out = pixels(load_image(save(rgba, tmp_path / "a.png")))[0]
    assert out[0].tolist() == [255, 255, 255]
    assert out[1].tolist() == [10, 20, 30]
    assert np.all(np.abs(out[2].astype(int) - 127) <= 1)

    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (100, 0))
    la.putpixel((1, 0), (100, 255))
    assert pixels(load_image(save(la, tmp_path / "la.png")))[0].tolist() == [[255] * 3, [100] * 3]


def test_pa_mode_is_composited_onto_white():
    # No common format stores "PA", so the conversion step is checked on an in-memory image.
    pa = Image.new("P", (2, 1))
    pa.putpalette([0, 200, 0])
    pa = pa.convert("PA")
    pa.putpixel((0, 0), (0, 0))
    assert pa.mode == "PA"
    out = images_module._to_rgb(pa, "mem.png")
    assert pixels(out)[0].tolist() == [[255, 255, 255], [0, 200, 0]]


@pytest.mark.parametrize("suffix,tolerance", [(".tif", 0), (".jpg", 3)])
def test_cmyk_pure_cyan_is_rgb_cyan(tmp_path, suffix, tolerance):
    cyan = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
    path = save(cyan, tmp_path / f"c{suffix}")
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    out = pixels(load_image(path))[4, 4].astype(int)
    assert np.all(np.abs(out - [0, 255, 255]) <= tolerance), out


def test_exif_orientation_6_is_applied(tmp_path):
    # Stored 40x20: left half red, right half blue. Orientation 6 = rotate 90 degrees clockwise to
    # display, so the left column becomes the top row: top half red, bottom half blue.
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(stored, tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    image = load_image(path)
    assert image.size == (20, 40)
    top, bottom = pixels(image)[5, 10].astype(int), pixels(image)[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 50, top
    assert bottom[2] > 200 and bottom[0] < 50, bottom


def test_multi_frame_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert pixels(load_image(path))[0, 0].tolist() == [255, 0, 0]


def test_result_is_detached_from_the_file(tmp_path):
    path = save(noise_rgb(), tmp_path / "x.png")
    image = load_image(path)
    path.unlink()
    assert image.mode == "RGB" and image.size == (32, 32)
    assert image.getpixel((0, 0)) == tuple(np.asarray(noise_rgb())[0, 0].tolist())


# ---------------------------------------------------------------------------------------------
# load_image: bad files


def assert_bad(path: Path, reason_part: str) -> None:
    with pytest.raises(BadImageError) as caught:
        load_image(path)
    assert path.name in str(caught.value)
    assert reason_part in caught.value.reason, caught.value.reason
    assert "fix or remove the file" in str(caught.value)  # the command adds its own ways out (extract: --skip-bad)


def test_truncation_flag_left_at_pillow_default():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
@pytest.mark.parametrize("cut", ["end_marker", "half"])
def test_truncated_files_raise(tmp_path, fmt, suffix, cut):
    full = save(noise_rgb((64, 64)), tmp_path / f"full{suffix}", format=fmt)
    data = full.read_bytes()
    # Cutting only the final 12 bytes (PNG's IEND chunk / JPEG's end marker) is the case Pillow's
    # load() alone accepts for PNG.
    kept = len(data) - 12 if cut == "end_marker" else len(data) // 2
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[:kept])
    assert_bad(path, "truncated file")


def test_corrupt_png_checksum_raises(tmp_path):
    data = bytearray(save(noise_rgb(), tmp_path / "ok.png").read_bytes())
    data[len(data) // 2] ^= 0xFF
    path = tmp_path / "flipped.png"
    path.write_bytes(bytes(data))
    with pytest.raises(BadImageError, match="flipped.png"):
        load_image(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert_bad(path, "empty file")


def test_text_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello, I am not an image\n")
    assert_bad(path, "not an image Pillow can read")


def test_missing_file(tmp_path):
    assert_bad(tmp_path / "gone.png", "file not found")


def test_directory_is_not_an_image(tmp_path):
    (tmp_path / "folder.png").mkdir()
    assert_bad(tmp_path / "folder.png", "directory")


def test_decompression_bomb_becomes_bad_image(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (16, 16)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 256 pixels > 2 x 100: Pillow's error
    assert_bad(path, "too large")


# ---------------------------------------------------------------------------------------------
# datasets


def make_imagefolder(root: Path) -> None:
    tiny(root / "cat" / "b.png")
    tiny(root / "cat" / "a.PNG")  # extension case does not matter
    tiny(root / "cat-big" / "z.jpg")
    tiny(root / "dog" / "sub" / "c.bmp")
    tiny(root / "dog" / "a.png")
    tiny(root / "dog" / ".hidden.png")  # hidden file
    tiny(root / ".cache" / "x.png")  # hidden folder
    (root / "dog" / "labels.txt").write_text("ignored")
    (root / "README.md").write_text("top-level non-images are ignored")
    (root / "empty").mkdir()


def relative(dataset: ImageDataset, root: Path) -> list[str]:
    return [Path(example.path).relative_to(root).as_posix() for example in dataset]


def test_imagefolder_order_labels_and_classes(tmp_path):
    make_imagefolder(tmp_path)
    dataset = open_dataset(tmp_path)
    assert dataset.kind == "imagefolder"
    assert dataset.root == str(tmp_path)
    # Sorted by (class, relative path): "cat" before "cat-big", although "cat-big/" < "cat/" as text.
    assert relative(dataset, tmp_path) == ["cat/a.PNG", "cat/b.png", "cat-big/z.jpg", "dog/a.png", "dog/sub/c.bmp"]
    assert [e.label for e in dataset] == ["cat", "cat", "cat-big", "dog", "dog"]
    assert [e.id for e in dataset] == [0, 1, 2, 3, 4]
    assert dataset.classes == ["cat", "cat-big", "dog"]  # the empty folder adds no class
    assert all(os.path.isabs(e.path) for e in dataset)
    assert dataset.load_image(3).getpixel((0, 0)) == (10, 20, 30)


def test_flat_order_recursive_unlabelled(tmp_path):
    tiny(tmp_path / "b.png")
    tiny(tmp_path / "a.jpeg")
    tiny(tmp_path / "sub" / "c.webp")
    tiny(tmp_path / ".hid" / "d.png")
    (tmp_path / "x.txt").write_text("no")
    dataset = open_dataset(tmp_path)
    assert dataset.kind == "flat"
    assert relative(dataset, tmp_path) == ["a.jpeg", "b.png", "sub/c.webp"]
    assert [e.label for e in dataset] == [None] * 3
    assert dataset.classes == []


def test_explicit_kind_overrides_detection(tmp_path):
    make_imagefolder(tmp_path)
    flat = open_dataset(tmp_path, kind="flat")
    assert flat.kind == "flat" and flat.classes == [] and len(flat) == 5
    assert relative(flat, tmp_path)[:3] == ["cat-big/z.jpg", "cat/a.PNG", "cat/b.png"]  # plain text order


def test_imagefolder_with_top_level_images_is_refused(tmp_path):
    tiny(tmp_path / "top.png")
    tiny(tmp_path / "cls" / "a.png")
    assert open_dataset(tmp_path).kind == "flat"
    with pytest.raises(UserError, match="kind='flat'"):
        open_dataset(tmp_path, kind="imagefolder")


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_order_paths_prompts_labels_meta(tmp_path):
    absolute = tiny(tmp_path / "elsewhere" / "abs.png")
    (tmp_path / "data").mkdir()
    manifest = write_jsonl(tmp_path / "data" / "set.jsonl", [
        json.dumps({"image": "imgs/z.png", "prompt": "What is this?", "label": "zebra", "source": "web", "n": 3,
                    "prefix": "Look closely."}),
        "",
        "   ",
        json.dumps({"image": str(absolute), "prefix": ""}),
        json.dumps({"image": "imgs/a.png", "label": "ant", "prompt": None, "boxes": [[1, 2, 3, 4]]}),
    ])
    dataset = open_dataset(manifest)
    assert dataset.kind == "jsonl" and dataset.root == str(manifest)
    assert [e.path for e in dataset] == [
        str(tmp_path / "data" / "imgs" / "z.png"), str(absolute), str(tmp_path / "data" / "imgs" / "a.png"),
    ]
    assert [e.prompt for e in dataset] == ["What is this?", None, None]
    # a missing or null prefix (None: the run's --prefix) stays distinct from an explicit empty one
    assert [e.prefix for e in dataset] == ["Look closely.", "", None]
    assert [e.label for e in dataset] == ["zebra", None, "ant"]
    assert [e.meta for e in dataset] == [{"source": "web", "n": 3}, {}, {"boxes": [[1, 2, 3, 4]]}]
    assert dataset.classes == ["ant", "zebra"]
    first = dataset[0].to_json()
    assert first == {"id": 0, "path": str(tmp_path / "data" / "imgs" / "z.png"), "label": "zebra",
                     "prompt": "What is this?", "prefix": "Look closely.", "meta": {"source": "web", "n": 3}}
    assert json.loads(json.dumps(first)) == first


def test_jsonl_does_not_open_images_until_loaded(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [json.dumps({"image": "missing.png"})])
    dataset = open_dataset(manifest)
    assert len(dataset) == 1
    with pytest.raises(BadImageError, match="missing.png"):
        dataset.load_image(0)


def test_folder_listing_does_not_open_images(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    dataset = open_dataset(tmp_path)
    assert len(dataset) == 1
    with pytest.raises(BadImageError, match="broken.png"):
        dataset.load_image(0)


@pytest.mark.parametrize("bad_line,expected", [
    ("{not json", "line 3"),
    ('["image", "a.png"]', "line 3"),
    ('{"prompt": "no image"}', '"image"'),
    ('{"image": "a.png", "label": 7}', "string or null"),
    ('{"image": "a.png", "prefix": ["a"]}', '"prefix" must be a string or null'),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad_line, expected):
    manifest = write_jsonl(tmp_path / "m.jsonl", [json.dumps({"image": "a.png"}), "", bad_line])
    with pytest.raises(UserError) as caught:
        open_dataset(manifest)
    message = str(caught.value)
    assert "m.jsonl" in message and "line 3" in message and expected in message


def test_limit_keeps_first_n_and_all_classes(tmp_path):
    make_imagefolder(tmp_path)
    limited = open_dataset(tmp_path, limit=2)
    assert len(limited) == 2
    assert relative(limited, tmp_path) == ["cat/a.PNG", "cat/b.png"]
    assert limited.classes == ["cat", "cat-big", "dog"]
    assert len(open_dataset(tmp_path, limit=100)) == 5
    with pytest.raises(UserError, match="limit"):
        open_dataset(tmp_path, limit=0)


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(UserError) as caught:
        open_dataset(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(caught.value) and ".png" in str(caught.value)
    empty_manifest = write_jsonl(tmp_path / "e.jsonl", ["", ""])
    with pytest.raises(UserError, match="e.jsonl"):
        open_dataset(empty_manifest)


def test_wrong_kinds_are_user_errors(tmp_path):
    tiny(tmp_path / "a.png")
    with pytest.raises(UserError, match="unknown dataset kind"):
        open_dataset(tmp_path, kind="coco")
    with pytest.raises(UserError, match="jsonl"):
        open_dataset(tmp_path, kind="jsonl")
    with pytest.raises(UserError, match=".jsonl"):
        open_dataset(tmp_path / "a.png")


def test_sequence_behaviour(tmp_path):
    for name in "abc":
        tiny(tmp_path / f"{name}.png")
    dataset = open_dataset(tmp_path)
    assert dataset[-1].id == 2 and dataset[-1].path.endswith("c.png")
    assert [e.id for e in dataset[1:]] == [1, 2]
    assert [e.id for e in dataset.subset([2, 0])] == [2, 0]
    with pytest.raises(IndexError):
        dataset[3]
    assert len({dataset[0], dataset[0]}) == 1  # hashable despite the meta dict
    assert isinstance(dataset[0], Example)


def test_ids_identical_in_another_process(tmp_path):
    make_imagefolder(tmp_path)
    here = [e.to_json() for e in open_dataset(tmp_path)]
    code = ("import json, sys; from sightline.data import open_dataset; "
            "print(json.dumps([e.to_json() for e in open_dataset(sys.argv[1])]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == here


def test_extensions_constant():
    assert set(IMAGE_EXTENSIONS) == {f".{x}" for x in "jpg jpeg png bmp gif webp tif tiff ppm pgm pbm".split()}


names = st.lists(
    st.tuples(st.sampled_from(["", "d/", "d/e/", "D/", "d-x/"]), st.text("aAb_-.1", min_size=1, max_size=4),
              st.sampled_from([".png", ".JPG", ".txt"])),
    max_size=8,
)


@settings(max_examples=15, deadline=None)
@given(names)
def test_flat_ids_follow_sorted_relative_paths(entries):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        expected = set()
        for prefix, stem, suffix in entries:
            rel = f"{prefix}{stem}{suffix}"
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"x")
            if suffix != ".txt":
                expected.add(rel)
        if not expected:
            with pytest.raises(UserError):
                open_dataset(root, kind="flat")
            return
        dataset = open_dataset(root, kind="flat")
        assert relative(dataset, root) == sorted(expected)
        assert [e.id for e in dataset] == list(range(len(expected)))

"""Decode one image file into a fully loaded 8-bit RGB PIL image, or fail with a BadImageError."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sightline.errors import BadImageError

__all__ = ["IMAGE_EXTENSIONS", "is_image_file", "load_image"]

# Lower-case, with the dot, as `str.endswith` and torchvision's IMG_EXTENSIONS take them.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
)

# Truncated files must fail, not come back half grey: ImageFile.LOAD_TRUNCATED_IMAGES stays at
# Pillow's default (False). It is a process-wide switch, so this module never touches it.

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_WHITE = (255, 255, 255, 255)


def is_image_file(name: str) -> bool:
    """Whether a file name has one of IMAGE_EXTENSIONS (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode `path` into a fully loaded RGB image, EXIF orientation applied; BadImageError if it cannot."""
    path = os.fspath(path)
    _check_file(path)
    try:
        image = _decode(path)
    except BadImageError:
        raise
    except Image.DecompressionBombError as err:
        # Pillow's default MAX_IMAGE_PIXELS is kept: a file this large is refused like any bad file.
        raise BadImageError(path, f"too large to decode safely ({err})") from None
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image Pillow can read") from None
    except OSError as err:
        if "truncated" in str(err).lower():
            raise BadImageError(path, "truncated file") from None
        raise BadImageError(path, f"corrupt image data ({_short(err)})") from None
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001
        # Pillow's plugins parse untrusted bytes and raise many types (SyntaxError, ValueError,
        # struct.error, zlib.error, EOFError, IndexError, ...). Every one of them, raised inside
        # `_decode`, says the file is bad, not that this code is.
        raise BadImageError(path, f"corrupt image data ({_short(err)})") from None
    return _to_rgb(image, path)


def _check_file(path: str) -> None:
    """Turn the file-system failures into BadImageError before Pillow sees the path."""
    try:
        size_bytes = os.stat(path).st_size
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except PermissionError:
        raise BadImageError(path, "permission denied") from None
    except OSError as err:
        raise BadImageError(path, f"cannot read file ({_short(err)})") from None
    if os.path.isdir(path):
        raise BadImageError(path, "is a directory, not an image file")
    if size_bytes == 0:
        raise BadImageError(path, "empty file")


def _decode(path: str) -> Image.Image:
    """Open, verify (PNG), decode the first frame and apply EXIF orientation; no mode change yet."""
    with Image.open(path) as image:
        is_png = image.format == "PNG"
        if is_png:
            # A PNG cut inside its last chunks still decodes: zlib stops once it has all rows and
            # Pillow's load() treats a missing IEND as the end. verify() walks every chunk to IEND
            # and checks its CRC, which catches exactly those cuts. It must run on a fresh open.
            image.verify()
    with Image.open(path) as image:
        image.seek(0)  # multi-frame GIF/TIFF/APNG: the first frame
        image.load()
        # exif_transpose returns a new image (a copy when there is no orientation tag), so the
        # result no longer depends on the file handle closed by this `with`.
        return ImageOps.exif_transpose(image)


def _to_rgb(image: Image.Image, path: str) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB with the pixel values a viewer would show."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return _high_bit_gray_to_rgb(image)
    if mode == "F":
        return _float_gray_to_rgb(image)
    if mode in _ALPHA_MODES or _has_transparency(image):
        # A model gets no alpha channel, and the colour under a fully transparent pixel is
        # arbitrary (often black, sometimes leftover paint). Compositing onto white shows the
        # image as a browser or document viewer does, which is how such images (logos, icons,
        # product shots) were seen by people who captioned or labelled them.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    try:
        # Covers RGB, L, 1, P (opaque), CMYK (JPEG CMYK included: Pillow undoes Adobe's inversion
        # when it decodes), YCbCr, HSV and RGBX. The CMYK conversion is Pillow's naive formula;
        # an embedded ICC profile is not applied.
        return image.convert("RGB")
    except ValueError:
        raise BadImageError(path, f"unsupported colour mode {mode}") from None


def _has_transparency(image: Image.Image) -> bool:
    """Whether a mode without an alpha band still marks pixels transparent (tRNS, GIF, RGBA palette)."""
    flag = getattr(image, "has_transparency_data", None)  # Pillow >= 10.1
    if flag is not None:
        return bool(flag)
    return "transparency" in image.info or (image.mode == "P" and image.palette.mode == "RGBA")


def _high_bit_gray_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit grayscale scaled by its bit depth (Pillow's own convert clips at 255 instead)."""
    values = np.asarray(image).astype(np.float64)
    black, white = _integer_range(image, values)
    scaled = np.rint((values - black) * (255.0 / (white - black)))
    gray_8bit = np.clip(scaled, 0, 255).astype(np.uint8)
    return Image.fromarray(gray_8bit).convert("RGB")


def _integer_range(image: Image.Image, values: np.ndarray) -> tuple[float, float]:
    """The value that maps to black and the one that maps to white, from the file's bit depth."""
    bits, signed = 16, False
    tags = getattr(image, "tag_v2", None)  # TIFF states its depth and signedness outright
    if tags is not None and 258 in tags:
        bits = int(_first(tags[258]))
        signed = int(_first(tags.get(339, 1))) == 2
    elif image.mode == "I" and image.format not in ("PNG", "PPM"):
        # Mode "I" with no header to ask (PNG and PGM use it for 16 bits): a value beyond 16 bits
        # means the samples are 32-bit; otherwise 16-bit is the depth such files are written at.
        if values.size and (values.min() < 0 or values.max() > 65535):
            bits, signed = 32, True
    # Signed samples keep 0 as black (Pillow writes every mode "I" TIFF as signed even when the data
    # never goes below 0); the rare negative value is clipped to black.
    return 0.0, 2.0 ** (bits - 1 if signed else bits) - 1


def _float_gray_to_rgb(image: Image.Image) -> Image.Image:
    """32-bit float grayscale: [0, 1] data is scaled to [0, 255]; anything else is clipped there."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
    # Float images in [0, 1] are the scientific convention; other ranges carry no stated scale,
    # so they are read as 8-bit intensities as Pillow's own convert() does.
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    gray_8bit = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray_8bit).convert("RGB")


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _short(err: BaseException, limit: int = 120) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""Decoding images the same way everywhere: 8-bit RGB, high bit depths scaled (never clipped).

`to_rgb8(image)` is the one conversion of a decoded Pillow image to 8-bit RGB. Pillow's own
`image.convert("RGB")` clips 16-bit samples to 255, so a 16-bit grayscale PNG (mode `I;16`, or
`I` in older Pillow) comes out almost white; `to_rgb8` scales them. Readers that decode shard
images (the training pipeline) should use it instead of `convert("RGB")`.

`prepare_image(data)` is what the builder does with every image before writing it: decode it
fully, check that it converts to RGB, and store it as it came if readers can decode it as it is
(JPEG, PNG, WebP, BMP with 8-bit samples), else re-encoded losslessly as an 8-bit RGB PNG
(16-bit and 32-bit grayscale, float images, TIFF, GIF, ...); with `resize`, as a resized JPEG.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
from PIL import Image

# Pillow format -> the shard member extension of images stored as they came (schema.IMAGE_EXTS).
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}
# Modes with more than 8 bits per sample: `convert("RGB")` would clip them.
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_U16_MAX = 65535


def _scaled_to_u8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Samples of a high-depth image -> uint8, scaled linearly (rounded), never clipped:

    - `I;16*`: 0..65535 -> 0..255;
    - `I` (32-bit integers): as 16-bit when every value is in 0..65535 (how some Pillow versions
      open 16-bit files), else the range [min, max] -> 0..255;
    - `F` (floats): [0, 1] -> 0..255 when every value is in it, else [min, max] -> 0..255
      (NaN -> 0).
    """
    a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if a.size == 0:
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(a.min()), float(a.max())
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= _U16_MAX):
        scaled = a * (255.0 / _U16_MAX)
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = a * 255.0
    else:
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb8(image: Image.Image) -> Image.Image:
    """A decoded Pillow image as 8-bit RGB: high bit depths (modes `I;16`, `I;16B`, `I`, `F`)
    scaled to 0..255, alpha dropped, palettes and other colour spaces converted. Raises
    ValueError (or OSError) for a mode that cannot be converted."""
    if image.mode == "RGB":
        return image
    if image.mode in HIGH_DEPTH_MODES:
        return Image.fromarray(_scaled_to_u8(np.asarray(image), image.mode), "L").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:  # a mode without a direct conversion (e.g. "La"): through another mode
        pass
    for via in ("RGBA", "LA"):
        try:
            return image.convert(via).convert("RGB")
        except ValueError:
            continue
    return to_rgb8(image.getchannel(0))  # (the first band as grey; raises if even that is impossible)


def decode_rgb8(data: bytes) -> Image.Image:
    """Encoded image bytes -> an 8-bit RGB Pillow image (see `to_rgb8`); raises on corrupt data."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        rgb = to_rgb8(im)
        return rgb.copy() if rgb is im else rgb


@dataclasses.dataclass
class PreparedImage:
    """An image as it will be stored: encoded bytes, member extension, size, and what was done."""

    data: bytes
    ext: str
    width: int
    height: int
    converted: str = ""  # e.g. "PNG I;16 -> PNG RGB" when re-encoded; "" when stored as it came


def prepare_image(data: bytes, resize: tuple[int, int] | None = None) -> PreparedImage:
    """Decode `data` fully and return what to store (see the module docstring). `resize` is (H, W).
    Raises (any exception) when the image cannot be decoded or converted to RGB, including
    Pillow's decompression-bomb warning (an image of more than `Image.MAX_IMAGE_PIXELS` pixels)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return _prepare(data, resize)


def _prepare(data: bytes, resize: tuple[int, int] | None) -> PreparedImage:
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # decodes everything: catches truncated files, not only bad headers
        fmt, mode = im.format or "?", im.mode
        if resize is not None:
            out = io.BytesIO()
            to_rgb8(im).resize((resize[1], resize[0]), Image.BICUBIC).save(out, format="JPEG", quality=95)
            return PreparedImage(out.getvalue(), "jpg", resize[1], resize[0])
        rgb = to_rgb8(im)  # the conversion a reader does: it must work
        if fmt in STORED_FORMATS and mode not in HIGH_DEPTH_MODES:
            return PreparedImage(data, STORED_FORMATS[fmt], *im.size)
        out = io.BytesIO()
        rgb.save(out, format="PNG")
        return PreparedImage(out.getvalue(), "png", *im.size, converted=f"{fmt} {mode} -> PNG RGB")


def failure_reason(error: BaseException) -> tuple[str, str]:
    """(reason, detail) for rejects.jsonl of an image `prepare_image` could not prepare."""
    detail = f"{type(error).__name__}: {str(error)[:300]}"
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return "image file too large", detail
    return "unreadable or truncated image", detail

"""Decoding images the same way everywhere: 8-bit RGB, high bit depths scaled (never clipped).

`to_rgb8(image)` is the one conversion of a decoded Pillow image to 8-bit RGB. Pillow's own
`image.convert("RGB")` clips 16-bit samples to 255, so a 16-bit grayscale PNG (mode `I;16`, or
`I` in older Pillow) comes out almost white; `to_rgb8` scales them. Readers that decode shard
images (the training pipeline) should use it instead of `convert("RGB")`.

`decode_array(data)` is the one decoder of the project: the builder validates every image with
it, and the training reader, evaluation, galleries and thumbnails decode with it, so an image the
build accepts is one the readers read, pixel for pixel. Its policy: the pixel count is checked
against Pillow's decompression-bomb limit from the header, before any pixel is decoded; JPEGs go
through libjpeg-turbo (simplejpeg, 2-3x faster than Pillow), and through Pillow when libjpeg-turbo
refuses one (a damaged stream Pillow still decodes, a sampling libjpeg-turbo's API does not take);
other formats through Pillow, only those of `FORMATS` (whatever the file's name: Pillow would pick
any of its decoders from the bytes); a JPEG of more than `MAX_JPEG_SCANS` scans is refused before
decoding (each scan decodes every pixel again); the EXIF orientation is applied (a phone photo stored sideways comes
out upright); samples become 8-bit RGB with `to_rgb8`.

`prepare_image(data)` is what the builder does with every image before writing it: decode it with
`decode_array`, and store it as it came if readers decode it to the same pixels (JPEG, PNG, WebP,
BMP with 8-bit samples and no EXIF rotation), else re-encoded losslessly as an 8-bit RGB PNG,
upright (16-bit and 32-bit grayscale, float images, TIFF, GIF, EXIF-rotated photos, ...); with
`resize`, as a resized JPEG.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
from PIL import Image

from .schema import MAX_IMAGE_BYTES

try:  # libjpeg-turbo (a declared dependency); Pillow alone where it is missing
    import simplejpeg
except ImportError:  # pragma: no cover - exercised where simplejpeg is not installed
    simplejpeg = None

# Pillow format -> the shard member extension of images stored as they came (schema.IMAGE_EXTS).
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}
# The formats an image may be in (Pillow's names): photos, and the lossless formats a dataset uses.
# Pillow otherwise picks a decoder from the bytes, whatever the file's name, and some of its
# decoders run other programs (EPS and PostScript through Ghostscript): a file named .png holding
# PostScript, or any other format, is refused unread.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM")  # (a multi-picture JPEG opens as JPEG)
# Most scans a JPEG may have: a progressive photo has about 10, and each scan is another pass over
# every pixel (a 400 KB file of 1,000 repeated scans took 106 s to decode).
MAX_JPEG_SCANS = 100
# Modes with more than 8 bits per sample: `convert("RGB")` would clip them.
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_U16_MAX = 65535
_BAND_SAMPLES = 1 << 22  # samples converted at once (32 MiB of float64)


def _scaled_to_u8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Samples of a high-depth image -> uint8, scaled linearly (rounded), never clipped:

    - `I;16*`: 0..65535 -> 0..255;
    - `I` (32-bit integers): as 16-bit when every value is in 0..65535 (how some Pillow versions
      open 16-bit files), else the range [min, max] -> 0..255;
    - `F` (floats): [0, 1] -> 0..255 when every value is in it, else [min, max] -> 0..255
      (NaN and infinities -> 0).

    Computed in float64 a band of rows at a time (a 9400 x 9400 16-bit image took 3.2 GB at once)."""
    out = np.zeros(arr.shape, np.uint8)
    if arr.size == 0:
        return out
    rows = max(1, _BAND_SAMPLES // max(1, arr.size // arr.shape[0]))
    bands = [slice(i, i + rows) for i in range(0, arr.shape[0], rows)]
    finite = lambda band: np.nan_to_num(arr[band].astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)  # noqa: E731
    lo = min(float(finite(b).min()) for b in bands)
    hi = max(float(finite(b).max()) for b in bands)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= _U16_MAX):
        scale, offset = 255.0 / _U16_MAX, 0.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        scale, offset = 255.0, 0.0
    elif hi > lo:
        scale, offset = 255.0 / (hi - lo), lo
    else:
        return out
    for b in bands:
        a = finite(b)
        scaled = (a - offset) * scale if offset else a * scale
        out[b] = np.clip(np.rint(scaled), 0, 255)
    return out


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


ORIENTATION_TAG = 0x0112
# EXIF orientation -> the numpy steps that make the stored pixels upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1..8) of encoded image bytes; 1 (upright) when there is none. Only
    images carrying EXIF are opened for it (a JPEG's EXIF segment comes before its pixels)."""
    if data.find(b"Exif", 0, 1 << 16) < 0 and data.find(b"eXIf") < 0:
        return 1
    try:
        with open_image(data) as im:
            value = im.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF is no rotation; the decode judges the image
        return 1
    return value if isinstance(value, int) and value in range(1, 9) else 1


def open_image(data: bytes) -> Image.Image:
    """Pillow's lazy open of encoded bytes, in one of `FORMATS` only (PIL.UnidentifiedImageError
    for any other)."""
    if not all(f in Image.OPEN for f in FORMATS):  # (Pillow registers most plugins on first need)
        Image.init()
    return Image.open(io.BytesIO(data), formats=FORMATS)


def check_pixels(width: int, height: int) -> None:
    """Image.DecompressionBombError unless width x height is within Pillow's limit
    (`Image.MAX_IMAGE_PIXELS`, about 89 million): checked from the header, before decoding."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise Image.DecompressionBombError(f"{width}x{height} pixels, more than the {limit} accepted "
                                           "(Pillow's decompression-bomb limit)")


def decode_array(data: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """Encoded image bytes -> uint8 array [H, W, 3] (RGB, upright): the project's one decoder (see
    the module docstring). With `size` (H, W), a large JPEG may be decoded at a reduced scale that
    still covers it. Raises on corrupt data and on images over the pixel limit."""
    scans = data.count(b"\xff\xda") if data[:2] == b"\xff\xd8" else 0  # (SOS markers: a scan starts at each)
    if scans > MAX_JPEG_SCANS:
        raise Image.DecompressionBombError(f"a JPEG of {scans} scans, more than the {MAX_JPEG_SCANS} decoded (each "
                                           "one decodes every pixel again)")
    orientation = exif_orientation(data)
    if size is not None and orientation >= 5:  # (stored sideways: the stored width becomes the height)
        size = (size[1], size[0])
    arr = _decode_jpeg(data, size) if simplejpeg is not None and data[:2] == b"\xff\xd8" else None
    if arr is None:
        arr = _decode_pillow(data, size)
    if orientation != 1:
        arr = _UPRIGHT[orientation](arr)
    return np.ascontiguousarray(arr)


def _decode_jpeg(data: bytes, size) -> np.ndarray | None:
    """libjpeg-turbo's decode, or None where it refuses the stream (Pillow then decides)."""
    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    check_pixels(w, h)
    try:
        if size is not None and h >= 2 * size[0] and w >= 2 * size[1]:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size[0], min_width=size[1])
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:
        return None


def _decode_pillow(data: bytes, size) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with open_image(data) as im:
            check_pixels(*im.size)
            if size is not None:
                im.draft("RGB", (size[1], size[0]))
            im.load()  # (every pixel: a truncated file raises here)
            return np.array(to_rgb8(im))


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
    pixels = decode_array(data)  # what every reader will decode: it must work
    with open_image(data) as im:
        fmt, mode = im.format or "?", im.mode
    rgb = Image.fromarray(pixels, "RGB")
    if resize is not None:
        out = io.BytesIO()
        rgb.resize((resize[1], resize[0]), Image.BICUBIC).save(out, format="JPEG", quality=95)
        return PreparedImage(out.getvalue(), "jpg", resize[1], resize[0])
    orientation = exif_orientation(data)
    if fmt in STORED_FORMATS and mode not in HIGH_DEPTH_MODES and orientation == 1:
        return PreparedImage(data, STORED_FORMATS[fmt], rgb.width, rgb.height)
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    if out.tell() > MAX_IMAGE_BYTES:  # (an 80-megapixel photo turned upright: readers would refuse it)
        raise Image.DecompressionBombError(f"stored as PNG it takes {out.tell()} bytes, more than the "
                                           f"{MAX_IMAGE_BYTES} an image may")
    turned = f" (EXIF orientation {orientation} applied)" if orientation != 1 else ""
    return PreparedImage(out.getvalue(), "png", rgb.width, rgb.height, converted=f"{fmt} {mode} -> PNG RGB{turned}")


def failure_reason(error: BaseException) -> tuple[str, str]:
    """(reason, detail) for rejects.jsonl of an image `prepare_image` could not prepare."""
    detail = f"{type(error).__name__}: {str(error)[:300]}"
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return "image file too large", detail
    return "unreadable or truncated image", detail

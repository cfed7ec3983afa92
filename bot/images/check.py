"""Checking untrusted image bytes: type by content, bounded bytes and pixels, first frame, re-encoded."""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from bot.errors import CorruptImage, ImageError, ImageTooLarge, NotAnImage, TooManyImages, TooManyPixels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    """Largest file accepted, before decoding."""
    max_pixels: int = 40_000_000
    """Largest width x height accepted (decompression bombs are refused before decoding)."""
    max_count: int = 4
    """Most images taken from one message."""
    timeout_s: float = 10.0
    """Longest a download may take, connect to last byte."""


MAX_SIDE = 1536
"""Longest side of the stored image. IDEFICS resizes every image to 224 px (490 for the 80b model) before
the vision encoder, so more is never seen by the model; 1536 keeps enough for a person looking at the stored
copy, and bounds storage and memory per image (1536 x 1536 x 3 bytes = 7 MB decoded at most)."""

SMALL_PIXELS = 512 * 512
"""At or under this many pixels the re-encoded image is always PNG: it is small either way, and lossless."""

PNG_BUDGET_BYTES = 2 * 1024 * 1024
"""A lossless source (PNG, GIF, BMP, lossless WebP: screenshots, diagrams, text, pixel art, whose sharp edges
JPEG smears) is kept as PNG while its PNG stays under this; beyond it the content is photo-like, and JPEG at
quality 90 is visually the same at a fraction of the size."""

JPEG_QUALITY = 90

ACCEPTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
"""PIL format names tried when opening; PIL detects by content, the file name is never looked at."""

# Leading bytes of the accepted formats. Only used to tell "not an image" (no known signature) from
# "a damaged image" (signature present, but PIL cannot open it), so that the user gets the right message.
_SIGNATURES: tuple[bytes, ...] = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")

_WHITE = (255, 255, 255)

# EXIF orientation tag (0x0112) -> the transposition that makes the image upright (EXIF 2.3, section 4.6.4).
_ORIENTATION_TAG = 0x0112
_ORIENTATION_FIX: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True, eq=False)
class CheckedImage:
    """An image that passed every check, ready for the model and for storage.

    `eq=False`: a PIL image is not hashable, and two checks of the same bytes are compared by `sha256`.
    """

    image: Image.Image
    """Upright RGB image, first frame only, longest side at most MAX_SIDE; what the model gets."""
    data: bytes
    """`image` encoded again (PNG or JPEG, see `_encode`); what storage keeps. Nothing of the original file
    (metadata, later frames, trailing bytes) survives."""
    mime: str
    """"image/png" or "image/jpeg", the type of `data`."""
    width: int
    """Width of `image` (and of `data`), after orientation and downscaling."""
    height: int
    """Height of `image` (and of `data`)."""
    sha256: str
    """Hex digest of `data`: the storage key, equal for equal stored images."""


def check_image(data: bytes, limits: ImageLimits) -> CheckedImage:
    """Check untrusted bytes and return the image they hold, or raise an `ImageError`.

    For any input, this returns or raises an `ImageError` subclass, nothing else. It is CPU work (up to a
    fraction of a second for large photos): call it through `asyncio.to_thread` from the event loop.
    """
    started = time.perf_counter()
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(limits.max_bytes, detail=f"{len(data)} bytes")
    try:
        checked = _check(bytes(data), limits)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL's own bomb guard (its limit is fixed and global, ours is per call): same answer.
        raise TooManyPixels(limits.max_pixels, detail=f"PIL: {exc}") from exc
    except MemoryError as exc:
        raise TooManyPixels(limits.max_pixels, detail="out of memory while decoding") from exc
    except Exception as exc:
        # PIL reports damaged files with many types (OSError, SyntaxError, ValueError, EOFError,
        # struct.error, IndexError, ...), varying by plugin and version: every one means "damaged".
        raise CorruptImage(detail=f"{type(exc).__name__}: {exc}"[:200]) from exc
    log.debug(
        "image checked: %d bytes in, %dx%d %s %d bytes out, %.1f ms",
        len(data),
        checked.width,
        checked.height,
        checked.mime,
        len(checked.data),
        (time.perf_counter() - started) * 1000,
    )
    return checked


def check_images(blobs: Sequence[bytes], limits: ImageLimits) -> list[CheckedImage]:
    """Check every blob in order; too many is refused as a whole, before any decoding."""
    if len(blobs) > limits.max_count:
        raise TooManyImages(limits.max_count, detail=f"{len(blobs)} images")
    return [check_image(blob, limits) for blob in blobs]


def _check(data: bytes, limits: ImageLimits) -> CheckedImage:
    try:
        src = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as exc:
        if _has_image_signature(data):
            raise CorruptImage(detail=f"known signature, PIL cannot open: {exc}"[:200]) from exc
        raise NotAnImage(detail=f"{len(data)} bytes, leading {data[:8].hex()}") from exc
    with src:
        width, height = src.size
        # The header alone gives the size: refuse before a single pixel is decoded.
        if width <= 0 or height <= 0:
            raise CorruptImage(detail=f"size {width}x{height}")
        if width * height > limits.max_pixels:
            raise TooManyPixels(limits.max_pixels, detail=f"{width}x{height} from header")
        source_format = src.format or ""
        lossless = _is_lossless(source_format, data)
        if source_format in ("JPEG", "MPO"):
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the result is still >= MAX_SIDE: large
            # photos then cost a fraction of the memory and time. Never goes below what we keep.
            src.draft("RGB", (MAX_SIDE, MAX_SIDE))
        # Animated GIF/WebP/APNG: `open` leaves us on frame 0, and `load` decodes only that frame.
        src.load()
        orientation = _orientation(src)
        rgb = _to_rgb(src)
    rgb = _apply_orientation(rgb, orientation)
    if max(rgb.size) > MAX_SIDE:
        rgb.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    encoded, mime = _encode(rgb, lossless=lossless)
    return CheckedImage(
        image=rgb,
        data=encoded,
        mime=mime,
        width=rgb.width,
        height=rgb.height,
        sha256=hashlib.sha256(encoded).hexdigest(),
    )


def _has_image_signature(data: bytes) -> bool:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    return any(data.startswith(sig) for sig in _SIGNATURES)


def _is_lossless(source_format: str, data: bytes) -> bool:
    if source_format in ("PNG", "GIF", "BMP"):
        return True
    # A simple-format WebP names its codec in the first chunk: "VP8L" is the lossless one.
    return source_format == "WEBP" and data[12:16] == b"VP8L"


def _orientation(src: Image.Image) -> int:
    # A broken EXIF block is common (phones, editors) and says nothing about the pixels: keep the
    # image as stored rather than refusing it.
    try:
        value = src.getexif().get(_ORIENTATION_TAG, 1)
        return value if isinstance(value, int) else 1
    except Exception:
        return 1


def _apply_orientation(img: Image.Image, orientation: int) -> Image.Image:
    method = _ORIENTATION_FIX.get(orientation)
    return img.transpose(method) if method is not None else img


def _to_rgb(src: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: transparency onto white, 16/32-bit grey scaled (not clipped) to 8 bits."""
    mode = src.mode
    has_key_colour = "transparency" in src.info and mode in ("P", "1", "L", "RGB")
    if has_key_colour or mode in ("PA", "RGBA", "LA", "La", "RGBa"):
        # The model has no alpha channel; transparent areas read as white, as Discord shows them on
        # light theme and as most people expect a "blank" background.
        rgba = src.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # 16-bit PNG grey comes as I;16 (or I holding 0..65535). PIL's convert("L") clips at 255, which
        # turns everything above 1/256 of full scale white: scale by 255/65535 instead, rounding half up.
        wide = src.convert("I") if mode != "I" else src
        return wide.point(lambda v: v * (255 / 65535) + 0.5).convert("L").convert("RGB")
    if mode == "RGB":
        return src.copy()
    # 1, L, CMYK, YCbCr, LAB, HSV, P without transparency: PIL's own conversions are right.
    return src.convert("RGB")


def _encode(img: Image.Image, *, lossless: bool) -> tuple[bytes, str]:
    if img.width * img.height <= SMALL_PIXELS or lossless:
        png = _save(img, "PNG", optimize=False, compress_level=6)
        if img.width * img.height <= SMALL_PIXELS or len(png) <= PNG_BUDGET_BYTES:
            return png, "image/png"
    return _save(img, "JPEG", quality=JPEG_QUALITY, optimize=True), "image/jpeg"


def _save(img: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **params)
    return out.getvalue()

"""Real image files built in memory for the image and fetch tests (no fixtures on disk to go stale)."""

from __future__ import annotations

import io
import random
import struct
import zlib

from PIL import Image


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **params)
    return out.getvalue()


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Incompressible RGB noise: its PNG is large and every byte of the IDAT matters."""
    rng = random.Random(seed)
    return Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))


def photo_like(width: int, height: int) -> Image.Image:
    """Smooth gradients plus grain, like a photo: many colours, no sharp edges."""
    red = Image.linear_gradient("L").resize((width, height))
    green = Image.radial_gradient("L").resize((width, height))
    blue = Image.effect_noise((width, height), 40)
    return Image.merge("RGB", (red, green, blue))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG that claims `width` x `height` RGB pixels but carries one tiny IDAT.

    A decompression bomb in shape: a few dozen bytes that would need width*height*3 bytes of memory if
    anything decoded it.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def small_samples() -> dict[str, bytes]:
    """One small valid file per accepted format, used as seeds for mutation."""
    base = noise_image(24, 16, seed=1)
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    return {
        "png": encode(base, "PNG"),
        "jpeg": encode(base, "JPEG", quality=80),
        "gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),
        "webp": encode(base, "WEBP", quality=70),
        "bmp": encode(base, "BMP"),
    }

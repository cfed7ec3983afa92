"""Images re-encoded for a request body, and shrunk until the body fits the server's size limit.

Images are re-encoded as JPEG and scaled down: the IDEFICS models look at a few hundred pixels a side, so a large
photo carries nothing the model sees, and servers refuse request bodies over their limit (TGI's `--payload-limit`
is 2,000,000 bytes by default). When several images still push a body past the limit, all of them shrink further
until it fits.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image

from model_server.errors import GenerationFailed

IMAGE_SIDE = 448
"""Longest side of an image sent at first: twice what the IDEFICS v1 image processor keeps."""
JPEG_QUALITY = 85
MIN_IMAGE_SIDE = 32


def encode_image(image: Image.Image, side: int, quality: int) -> bytes:
    """JPEG bytes of `image` with its longest side at most `side` pixels."""
    image = image.convert("RGB")
    scale = side / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


@dataclass(frozen=True)
class FittedBody:
    body: bytes
    """The JSON to POST, under the byte limit."""
    image_bytes: tuple[int, ...]
    """Size of each JPEG sent, for logs."""


def fit_body(images: Sequence[Image.Image], render: Callable[[list[bytes]], bytes], max_bytes: int) -> FittedBody:
    """`render(jpegs)` with `images` encoded small enough that the body is under `max_bytes`.

    Runs image encoding: call it off the event loop. Raises `GenerationFailed` when even tiny images do not
    fit (then the text alone is too large).
    """
    side, quality = IMAGE_SIDE, JPEG_QUALITY
    while True:
        jpegs = [encode_image(image, side, quality) for image in images]
        body = render(jpegs)
        if len(body) < max_bytes:
            return FittedBody(body, tuple(len(j) for j in jpegs))
        if not images or side <= MIN_IMAGE_SIDE:
            raise GenerationFailed("this request is too large for the model server; try fewer images",
                                   detail=f"request body {len(body)} bytes with {len(images)} images, "
                                   f"limit {max_bytes}")
        # JPEG size goes roughly with the pixel count: scale the side by the square root of what must go.
        image_share = sum(len(j) for j in jpegs) * 4 / 3
        fixed = len(body) - image_share
        room = max(max_bytes * 0.95 - fixed, 0.0)
        factor = math.sqrt(room / image_share) if image_share else 0.5
        side = max(MIN_IMAGE_SIDE, min(int(side * factor), int(side * 0.8)))
        quality = max(50, quality - 10)

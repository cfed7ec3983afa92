"""Stored pictures are decoded once while they stay in a channel's window, within a bound on their pixels."""

from __future__ import annotations

import hashlib
import io

from PIL import Image

from bot.pipeline.decoded_images import DecodedImages
from storage import StoredImage
from tests.conftest import noise_image


def stored(seed: int, size: tuple[int, int] = (40, 30)) -> StoredImage:
    out = io.BytesIO()
    noise_image(seed, size).save(out, format="PNG")
    data = out.getvalue()
    return StoredImage(sha256=hashlib.sha256(data).hexdigest(), mime="image/png", width=size[0], height=size[1],
                       data=data)


def test_a_picture_is_decoded_once_and_equals_its_pixels():
    cache = DecodedImages()
    first = cache.get(stored(1))
    assert cache.get(stored(1)) is first
    assert first.mode == "RGB" and first.tobytes() == noise_image(1).tobytes()
    assert cache.get(stored(2)).tobytes() == noise_image(2).tobytes()


def test_the_least_recently_used_pictures_leave_past_the_bound():
    cache = DecodedImages(capacity_bytes=2 * 40 * 30 * 3)  # room for two
    a, b = cache.get(stored(1)), cache.get(stored(2))
    assert cache.get(stored(1)) is a  # now the most recently used
    cache.get(stored(3))
    assert len(cache) == 2 and cache.get(stored(1)) is a and cache.get(stored(2)) is not b
    big = cache.get(stored(4, (100, 100)))  # larger than the bound: decoded, not kept
    assert isinstance(big, Image.Image) and len(cache) == 2

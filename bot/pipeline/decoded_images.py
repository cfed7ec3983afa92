"""Stored images decoded for the model, kept by content hash between requests.

A channel's window is loaded for every message, and its newest pictures are in it turn after turn;
decoding a photo again each time costs milliseconds. Decoded pictures are kept, least recently used
out first, up to a bound on their pixel bytes. Nothing changes a decoded picture after this: the
renderer and the model server only read it (resizing makes copies).
"""

from __future__ import annotations

import io

from PIL import Image

from model_server.bounded_cache import BoundedCache
from storage import StoredImage

DEFAULT_CAPACITY_BYTES = 64 * 2**20


class DecodedImages:
    def __init__(self, capacity_bytes: int = DEFAULT_CAPACITY_BYTES) -> None:
        self._images: BoundedCache[str, Image.Image] = BoundedCache(capacity_bytes, _pixel_bytes)

    def get(self, stored: StoredImage) -> Image.Image:
        """`stored` as an RGB picture; the same object for the same content while it stays in the cache.

        Keyed by the sha256 the store computed from the bytes itself, never by anything the file says.
        """
        image = self._images.get(stored.sha256)
        if image is None:
            image = Image.open(io.BytesIO(stored.data)).convert("RGB")
            self._images.put(stored.sha256, image)
        return image

    def __len__(self) -> int:
        return len(self._images)


def _pixel_bytes(image: Image.Image) -> int:
    return image.width * image.height * len(image.getbands())

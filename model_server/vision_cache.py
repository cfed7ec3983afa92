"""Image features kept between requests, keyed by the image's content, bounded by bytes.

A channel's history shows the same picture turn after turn ("and what colour is the car?"), and a
picture posted once may be asked about in several requests. Its vision-tower (and perceiver) output
depends on the pixels alone, so it is computed once and reused until the least recently used entries
are pushed out by newer ones. Only the model thread touches the cache: no lock.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from PIL import Image

from model_server.bounded_cache import BoundedCache, CacheStats

if TYPE_CHECKING:  # the executor imports this module and must not load torch (TGI runs without it)
    import torch

_KEYS: dict[int, tuple[weakref.ref[Any], Hashable]] = {}
"""id(image) -> (a weak reference to it, its key): a picture kept between requests (the bot keeps decoded
history pictures) is hashed once, not at every request. An entry leaves with its image (the finalizer may run
on any thread; single dict operations are atomic)."""


def image_key(image: Image.Image) -> Hashable:
    """The content of an image: equal for equal pixels, whatever object or message they came from.

    Hashing a large picture's pixels takes milliseconds (SHA-256, which CPUs accelerate, over a copy of
    them), so the key is remembered for as long as the image object lives.
    """
    known = _KEYS.get(id(image))
    if known is not None and known[0]() is image:
        return known[1]
    key = image.mode, image.size, hashlib.sha256(image.tobytes()).digest()
    _KEYS[id(image)] = (weakref.ref(image), key)
    weakref.finalize(image, _KEYS.pop, id(image), None)
    return key


VisionCacheStats = CacheStats


class VisionCache(BoundedCache[Hashable, "torch.Tensor"]):
    """`image_key` -> feature tensor (which must own its storage, not view a batch), within `capacity_bytes`."""

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes, _nbytes)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()

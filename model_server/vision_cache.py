"""Image features kept between requests, keyed by the image's content, bounded by bytes.

A channel's history shows the same picture turn after turn ("and what colour is the car?"), and a
picture posted once may be asked about in several requests. Its vision-tower (and perceiver) output
depends on the pixels alone, so it is computed once and reused until the least recently used entries
are pushed out by newer ones. Only the model thread touches the cache: no lock.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch
from PIL import Image

_KEYS: dict[int, tuple[weakref.ref, Hashable]] = {}
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


@dataclass(frozen=True)
class VisionCacheStats:
    entries: int
    bytes: int
    capacity_bytes: int
    hits: int
    misses: int


class VisionCache:
    """Least-recently-used map from `image_key` to a feature tensor, holding at most `capacity_bytes`."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> torch.Tensor | None:
        features = self._entries.get(key)
        if features is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return features

    def put(self, key: Hashable, features: torch.Tensor) -> None:
        """Keep `features` (which must own its storage, not view a batch) unless it alone is over capacity."""
        size = _nbytes(features)
        if size > self.capacity_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= _nbytes(old)
        self._entries[key] = features
        self._bytes += size
        while self._bytes > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= _nbytes(evicted)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def stats(self) -> VisionCacheStats:
        return VisionCacheStats(len(self._entries), self._bytes, self.capacity_bytes, self.hits, self.misses)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()

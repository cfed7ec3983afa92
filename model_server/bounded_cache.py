"""A map that keeps its most recently used entries within a bound on their total size.

Used for image features in the model server (`vision_cache`) and decoded pictures in the bot
(`bot.pipeline.decoded_images`). Not thread-safe: each user touches its cache from one thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True)
class CacheStats:
    entries: int
    bytes: int
    capacity_bytes: int
    hits: int
    misses: int


class BoundedCache(Generic[K, V]):
    """Least-recently-used map holding values whose `size` adds up to at most `capacity_bytes`."""

    def __init__(self, capacity_bytes: int, size: Callable[[V], int]) -> None:
        self.capacity_bytes = capacity_bytes
        self._size = size
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: K, value: V) -> None:
        """Keep `value` (the least recently used entries make room) unless it alone is over capacity."""
        size = self._size(value)
        if size > self.capacity_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= self._size(old)
        self._entries[key] = value
        self._bytes += size
        while self._bytes > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= self._size(evicted)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> CacheStats:
        return CacheStats(len(self._entries), self._bytes, self.capacity_bytes, self.hits, self.misses)

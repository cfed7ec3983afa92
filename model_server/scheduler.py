"""Choosing the next batch: a pure function of the waiting requests, tested with plain values."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Waiting(Generic[T]):
    item: T
    key: Hashable
    """Requests share a batch only when their keys are equal (same decoding loop and settings)."""
    weight: int = 1
    """Rows the request occupies (beam search uses one per beam)."""


def pick_batch(waiting: Sequence[Waiting[T]], max_rows: int) -> list[Waiting[T]]:
    """The oldest request, then, in arrival order, every later one with the same key that still fits.

    Taking the oldest first means no request waits behind an endless stream of others; skipping
    incompatible ones (rather than stopping at them) keeps batches full when settings are mixed.
    """
    if not waiting:
        return []
    head = waiting[0]
    batch = [head]
    rows = head.weight
    for candidate in waiting[1:]:
        if candidate.key == head.key and rows + candidate.weight <= max_rows:
            batch.append(candidate)
            rows += candidate.weight
    return batch


def split_in_halves(items: Sequence[T]) -> list[list[T]]:
    """After an out-of-memory error a batch is retried as two smaller ones."""
    mid = (len(items) + 1) // 2
    return [list(items[:mid]), list(items[mid:])]

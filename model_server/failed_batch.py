"""What happens to a batch the model raised on: which requests are retried together, and what the others get.

Out of memory, the batch is retried in halves (smaller batches fit); any other error, one request at a time, so a
request that breaks the model fails alone and the others are answered. Retried rows skip the text they already
streamed. A request that fails on its own gets `GenerationFailed`, with a hint to shorten it when out of memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from model_server.errors import GenerationFailed
from model_server.scheduler import split_in_halves

T = TypeVar("T")

OUT_OF_MEMORY_MESSAGE = "the model ran out of memory on this request; try fewer images or a shorter message"


def retry_parts(pending: Sequence[T], oom: bool) -> list[list[T]]:
    """The batches to retry `pending` (the failed batch's unfinished requests) in, in order; none is empty."""
    parts = split_in_halves(pending) if oom else [[item] for item in pending]
    return [part for part in parts if part]


def failure(exc: BaseException, oom: bool) -> GenerationFailed:
    """The error a request that failed on its own is answered with."""
    return GenerationFailed(OUT_OF_MEMORY_MESSAGE if oom else None, detail=f"{type(exc).__name__}: {exc}")

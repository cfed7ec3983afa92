"""Choosing what the model thread runs next: pure functions of plain values (no model, clock or thread).

The executor describes its queue as `Request`s and its running batch by row and step counts, and applies the
`Decision` it gets back. Tested with tables of plain values (`tests/model_server/test_scheduler.py`)."""

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


# -- what runs next: the executor's admission rules over plain values ----------------------------------------
JOIN_WAIT_STEPS = 16
"""Continuous batching: while fewer than half the batch's rows are free, waiting requests join once the oldest
has waited this many decode steps (or half the rows are free). Each join is a prefill that pauses every running
row, so under full load requests join a few at a time rather than one per finished row (text-generation-
inference's `max_waiting_tokens` is the same idea). A request that finds half the batch free starts at once."""


@dataclass(frozen=True)
class Request:
    """A waiting request, as the scheduler sees it."""

    id: int
    kind: str
    """"generate", "beam" (runs alone, all rows its beams) or "rank" (scoring: one forward pass, alone)."""
    deadline: float
    """Past it (on the caller's clock) the request expires in the queue."""
    steps_at_submit: int = 0
    """The running batch's decode-step count when the request was queued (`JOIN_WAIT_STEPS`)."""
    key: Hashable = None
    """Static batching: requests share a batch only when their keys are equal (`batch_key`)."""
    weight: int = 1
    """Rows the request occupies (beam search uses one per beam)."""


@dataclass(frozen=True)
class Decision:
    """What the model thread does next. Ids refer to `Request.id`; every list is in arrival order."""

    expired: tuple[int, ...] = ()
    """Requests past their deadline: they fail with `RequestTimeout` and leave the queue."""
    join: tuple[int, ...] = ()
    """Requests that start now: they join the running batch (continuous) or form the next batch (static)."""
    alone: int | None = None
    """A scoring or beam request that runs now, on its own (continuous batching)."""


def batch_key(kind: str, request_id: int, params_key: Hashable) -> Hashable:
    """Static batching's key: scoring runs alone (its rows are the categories, not other requests)."""
    return ("rank", request_id) if kind == "rank" else params_key


def weight(kind: str, num_beams: int) -> int:
    return num_beams if kind == "beam" else 1


def _live(waiting: Sequence[Request], now: float) -> tuple[tuple[int, ...], list[Request]]:
    expired = tuple(r.id for r in waiting if r.deadline < now)
    return expired, [r for r in waiting if r.deadline >= now]


def admit(waiting: Sequence[Request], *, running: int, steps: int, max_rows: int, now: float,
          join_wait_steps: int = JOIN_WAIT_STEPS) -> Decision:
    """Continuous batching: who joins a running batch of `running` rows (at decode step `steps`) now.

    - Expired requests leave first.
    - A scoring request at the head runs alone at once (between two steps); a beam search at the head runs
      alone once no row runs (it cannot share the decode loop).
    - While fewer than half the rows are free, the head joins only after waiting `join_wait_steps` steps.
    - Then waiting generations join in arrival order up to `max_rows`; nothing overtakes a waiting beam search.
    """
    expired, live = _live(waiting, now)
    head = live[0] if live else None
    if head is None:
        return Decision(expired=expired)
    if head.kind != "generate" and (head.kind == "rank" or running == 0):
        return Decision(expired=expired, alone=head.id)
    free = max_rows - running
    if running and free < max(1, max_rows // 2) and steps - head.steps_at_submit < join_wait_steps:
        return Decision(expired=expired)
    join: list[int] = []
    for request in live:
        if request.kind != "generate" or running + len(join) >= max_rows:
            break
        join.append(request.id)
    return Decision(expired=expired, join=tuple(join))


def next_batch(waiting: Sequence[Request], *, max_rows: int, now: float) -> Decision:
    """Static batching: expired requests leave, then the next batch is `pick_batch` over the rest."""
    expired, live = _live(waiting, now)
    chosen = pick_batch([Waiting(r.id, r.key, r.weight) for r in live], max_rows)
    return Decision(expired=expired, join=tuple(w.item for w in chosen))

"""The in-process executor's requests (`LocalJob`) and how their outcomes get back to the event loops.

The model thread produces text deltas and results; `Delivery` hands them to the loop each request came from. Each
outcome is handed back once (`settle`): a late result for a request the watchdog already failed is dropped. Deltas
of one step are collected and handed over together (`flush`), one wake-up of a loop per step rather than one per
row. `Delivery` also keeps the counts `stats()` reports and tells the observers (metrics) each outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from model_server import scheduler
from model_server.backend import Job, Observer, Outcome, deliver_deltas, notify_observers, resolve_job
from model_server.types import FinishReason, GenerationResult

log = logging.getLogger(__name__)

ERROR_KINDS = ("oom", "error", "timeout", "watchdog")
"""Keys of `ExecutorStats.errors`: "oom" and "error" count exceptions the model raised (a batch retried after one
counts once), "timeout" requests that ran past their deadline, "watchdog" times the model thread was declared
stuck."""


@dataclass(eq=False, kw_only=True)
class LocalJob(Job):
    """A request on the in-process executor (all its times are `time.monotonic()`)."""

    loop: asyncio.AbstractEventLoop
    cancelled: threading.Event = field(default_factory=threading.Event)
    batch_size: int = 0
    steps_at_submit: int = 0
    """The executor's decode-step count when the request was queued (`scheduler.JOIN_WAIT_STEPS`)."""
    settled: bool = False
    """The outcome was handed back (a late result after the watchdog failed the job is dropped)."""

    def post(self, callback: Callable[..., object], *args: object) -> None:
        # The loop may already be closed when a cancelled request finishes late; nobody is waiting then.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(callback, *args)

    def describe(self) -> scheduler.Request:
        """This request as the scheduler sees it."""
        params = self.prompt.params
        return scheduler.Request(
            id=self.id, kind=self.kind, deadline=self.deadline, steps_at_submit=self.steps_at_submit,
            key=scheduler.batch_key(self.kind, self.id, params.batch_key()),
            weight=scheduler.weight(self.kind, params.num_beams),
        )


class Delivery:
    """Settles `LocalJob`s from any thread; `lock` is the executor's, which also guards its queue."""

    def __init__(self, lock: threading.Condition) -> None:
        self._lock = lock
        self.latencies: deque[float] = deque(maxlen=200)
        self.completed = 0
        self.failed = 0
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        """Guarded by the lock."""
        self.observers: list[Observer] = []
        """Told each request's outcome (see `backend.Observer`), from the model thread, the watchdog or the loop."""
        self._outbox: list[tuple[LocalJob, str]] = []
        self._outbox_lock = threading.Lock()

    def count(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def settle(self, job: LocalJob) -> bool:
        """Mark `job`'s outcome as handed back; False if it already was (by the watchdog, a cancel)."""
        with self._lock:
            if job.settled:
                return False
            job.settled = True
            return True

    def delta(self, job: LocalJob, delta: str) -> None:
        job.sent += delta
        if not job.settled:
            with self._outbox_lock:
                self._outbox.append((job, delta))

    def flush(self) -> None:
        """Hand the deltas collected since the last flush to their event loops, in order."""
        with self._outbox_lock:
            pending, self._outbox = self._outbox, []
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, str]]] = {}
            for job, delta in pending:
                by_loop.setdefault(job.loop, []).append((job, delta))
            for loop, items in by_loop.items():
                # The loop may already be closed when a cancelled request finishes late; nobody waits then.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(deliver_deltas, items)

    def complete(self, job: LocalJob, text: str, reason: FinishReason, prompt_tokens: int,
                 completion_tokens: int, first_token_at: float | None = None) -> None:
        if not self.settle(job):
            log.info("request %d: late result (%s) dropped, it was already answered", job.id, reason.value)
            return
        if reason is FinishReason.TIMEOUT:
            self.count("timeout")
        now = time.monotonic()
        result = GenerationResult(
            text=text, finish_reason=reason, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            queued_s=((job.started or now) - job.submitted),
            first_token_s=None if first_token_at is None else first_token_at - job.submitted,
            total_s=now - job.submitted, batch_size=job.batch_size,
        )
        self.record_latency(job)
        log.info("request %d done: %s, %d+%d tokens, batch %d, %.2fs", job.id, reason.value, prompt_tokens,
                 completion_tokens, job.batch_size, result.total_s)
        self.observe(result)  # before the result is handed back: whoever awaits it sees it counted
        self.flush()  # its last deltas go before the end of its stream
        job.post(resolve_job, job, result)

    def ranked(self, job: LocalJob, ranking: object) -> None:
        """A rank request's ranking (not reported to observers)."""
        if not self.settle(job):
            return
        self.record_latency(job)
        job.post(resolve_job, job, ranking)

    def record_latency(self, job: LocalJob) -> None:
        self.completed += 1
        self.latencies.append(time.monotonic() - job.submitted)

    def fail(self, job: LocalJob, exc: Exception) -> None:
        if not self.settle(job):
            return
        self.failed += 1
        log.warning("request %d failed: %s", job.id, exc)
        self.observe(exc)
        self.flush()
        job.post(resolve_job, job, exc)

    def observe(self, outcome: Outcome) -> None:
        notify_observers(self.observers, outcome)

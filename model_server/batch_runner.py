"""Running batches on the model, on the model thread: one model call at a time, its outcome applied.

`BatchRunner` turns requests into the engine's rows, makes the model call (`prefill`, `step`, a whole `generate`,
`beam_search` or `score`), applies the `StepOutcome` it returns (deltas streamed, finished rows answered through
`Delivery`) and, when the model raises, retries what `failed_batch` says. The executor decides what runs
(`scheduler`); this runs it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from model_server.backend import BatchRecord, rank_by_scores
from model_server.delivery import Delivery, LocalJob
from model_server.failed_batch import failure, retry_parts
from model_server.types import Prompt
from model_server.vision_cache import VisionCacheStats
from model_server.watchdog import Watchdog

if TYPE_CHECKING:
    from model_server.engine import Row, StepOutcome

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the executor needs from a model: `engine.LocalEngine` is the in-process one."""

    def generate(self, rows: Sequence[Row], after_step: Callable[[StepOutcome], None]) -> None: ...
    def prefill(self, rows: Sequence[Row]) -> StepOutcome: ...
    def step(self, batch: Any) -> StepOutcome: ...
    def beam_search(self, rows: Sequence[Row]) -> StepOutcome: ...
    def score(self, prompt: Prompt, continuations: Sequence[str], chunk: int) -> list[float]: ...
    def free_memory(self) -> None: ...
    def is_out_of_memory(self, exc: BaseException) -> bool: ...
    def vision_cache_stats(self) -> VisionCacheStats | None: ...
    def memory(self) -> dict[str, int]: ...


class BatchRunner:
    """Model calls for one executor; used from its model thread only."""

    def __init__(self, engine: Engine, *, max_rows: int, delivery: Delivery, watchdog: Watchdog[LocalJob],
                 batches: deque[BatchRecord]) -> None:
        self.engine = engine
        self.max_rows = max_rows
        self.delivery = delivery
        self.watchdog = watchdog
        self.batches = batches
        self._by_id: dict[int, LocalJob] = {}
        """The requests whose rows are in a model call, by id (the engine's outcomes name rows by it)."""

    def keep(self, running: Sequence[LocalJob]) -> None:
        """After a model call: only `running` still has rows; rows that failed or were given up on are forgotten."""
        self._by_id = {j.id: j for j in running}

    def prefill(self, jobs: list[LocalJob], running: int) -> tuple[Any, list[Row]]:
        """Start `jobs` beside `running` rows; on failure they are retried on their own and the batch is None."""
        self.batches.append(BatchRecord(running + len(jobs), "generate", time.monotonic()))
        rows = self._rows(jobs)
        try:
            outcome = self.engine.prefill(rows)
        except Exception as exc:
            self._recover(jobs, exc)
            return None, rows
        self._update(outcome)
        return outcome.batch, rows

    def step(self, batch: Any, live: list[tuple[LocalJob, Row]]) -> Any:
        """One decode step of the running batch; on failure its rows are retried on their own."""
        try:
            outcome = self.engine.step(batch)
        except Exception as exc:
            self._recover([j for j, _ in live], exc)
            return None
        self._update(outcome)
        return outcome.batch

    def execute(self, jobs: list[LocalJob]) -> None:
        """Run `jobs` as one batch to its end (scoring and beam search alone)."""
        rows = self._rows(jobs)
        try:
            if jobs[0].kind == "rank":
                self._rank(jobs[0])
            elif jobs[0].kind == "beam":
                self._update(self.engine.beam_search(rows))
            else:
                self.engine.generate(rows, after_step=self._update)
        except Exception as exc:
            self._recover(jobs, exc)

    def _rows(self, jobs: list[LocalJob]) -> list[Row]:
        from model_server.engine import Row

        self._by_id.update((j.id, j) for j in jobs)
        return [Row(prompt=j.prompt, deadline=j.deadline, cancelled=j.cancelled, key=j.id, sent=j.sent,
                    on_step=self.watchdog.beat) for j in jobs]

    def _update(self, outcome: StepOutcome) -> None:
        """Apply what one model call did: stream each row's new text, answer the rows that ended."""
        for row, delta in outcome.deltas:
            self.watchdog.beat()
            self.delivery.delta(self._by_id[row.key], delta)
        for done in outcome.finished:
            job = self._by_id.pop(done.row.key)
            self.delivery.complete(job, done.text, done.reason, done.prompt_tokens, done.completion_tokens,
                                   done.first_token_at)
        self.delivery.flush()

    def _recover(self, jobs: list[LocalJob], exc: Exception) -> None:
        """After a model error: retried as `failed_batch.retry_parts` says; a request alone fails."""
        pending = [j for j in jobs if not j.settled]
        oom = self.engine.is_out_of_memory(exc)
        self.delivery.count("oom" if oom else "error")
        log.warning("batch of %d failed (%s%s); %d to retry", len(jobs), type(exc).__name__,
                    ", out of memory" if oom else "", len(pending) if len(jobs) > 1 else 0, exc_info=not oom)
        if oom:
            self.engine.free_memory()
        if len(jobs) == 1 or not pending:
            for job in pending:
                self.delivery.fail(job, failure(exc, oom))
            return
        for part in retry_parts(pending, oom):
            self.execute(part)

    def _rank(self, job: LocalJob) -> None:
        scores = self.engine.score(job.prompt, job.categories, self.max_rows)
        self.watchdog.beat()
        self.delivery.ranked(job, rank_by_scores(job.categories, scores))

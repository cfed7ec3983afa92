"""The generation executor: coroutines submit, one model thread batches and generates.

The event loop never runs model code. `submit` puts a request in a bounded queue (past the bound it
raises `Busy`) and the model thread generates, handing each row's text deltas (once per step) and
result back to the loop that asked (`delivery`). The model thread's loop is schedule -> execute -> update:
`scheduler` decides from plain values who expires, joins or runs alone; `batch_runner` makes the model call
and applies the `StepOutcome` it returns. With `config.batching == "continuous"` waiting requests join the
running batch between decode steps, up to `max_batch_size` rows, and leave it when done; with "static" the
oldest request and every compatible one behind it run as one batch to its end. A batch that runs out of
memory is split in halves and retried; a batch that raises otherwise is retried one request at a time
(`failed_batch`), so one bad request fails alone and the executor keeps serving.

A watchdog (`watchdog`) declares the model thread stuck when a running batch makes no progress for
`config.watchdog_s`: every running and waiting request fails at once with `ModelStuck`, new submits are
refused with it, and `fault` says so (shown by `/status`). If the stuck call returns, the fault clears; if it
is still silent at twice the deadline, `on_fatal` is called (once) so the process can exit and be restarted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

from model_server import scheduler
from model_server.backend import (
    BatchRecord,
    ExecutorStats,
    GenerationBackend,
    Observer,
    RequestHandle,
)
from model_server.batch_runner import BatchRunner, Engine
from model_server.config import ModelConfig
from model_server.delivery import Delivery, LocalJob
from model_server.errors import Busy, ExecutorClosed, ModelStuck, RequestTimeout
from model_server.types import FinishReason, GenerationResult, Prompt, RankedCategory
from model_server.watchdog import Watchdog

if TYPE_CHECKING:
    from model_server.engine import Row

log = logging.getLogger(__name__)


class Executor:
    """Batched generation on one model thread. Use as `async with Executor(engine, config) as ex:`."""

    def __init__(self, engine: Engine, config: ModelConfig, *, batch_window_s: float = 0.005) -> None:
        self.config = config
        self.batch_window_s = batch_window_s
        self._waiting: list[LocalJob] = []
        self._running: list[LocalJob] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self.delivery = Delivery(self._cond)
        self.batches: deque[BatchRecord] = deque(maxlen=1000)
        self.on_fatal: Callable[[str], object] | None = None
        """Called once, from the watchdog thread, when the model thread stays stuck past twice
        `config.watchdog_s`; the app sets it to stop the process with a non-zero exit status."""
        self._steps = 0
        """Decode steps of the running batch so far (continuous batching)."""
        self.watchdog: Watchdog[LocalJob] = Watchdog(
            config.watchdog_s, self._cond, busy=lambda: bool(self._running), declare_stuck=self._declare_stuck,
            fail_stuck=self._fail_stuck, on_fatal=self._fatal,
        )
        self.runner = BatchRunner(engine, max_rows=config.max_batch_size, delivery=self.delivery,
                                  watchdog=self.watchdog, batches=self.batches)

    @property
    def engine(self) -> Engine:
        """The model (tests wrap it to inject faults; the next model call uses the new one)."""
        return self.runner.engine

    @engine.setter
    def engine(self, engine: Engine) -> None:
        self.runner.engine = engine

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> Executor:
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="model-thread", daemon=True)
        self._thread.start()
        self.watchdog.start()

    async def close(self, grace_s: float = 0.0) -> None:
        """Refuse new requests; let queued and running ones finish for `grace_s`, then cancel the rest."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if grace_s > 0:
            await asyncio.to_thread(self._wait_idle, grace_s)
        with self._cond:
            dropped, self._waiting = self._waiting, []
            for job in self._running:
                job.cancelled.set()
            self._cond.notify_all()
        for job in dropped:
            self.delivery.fail(job, ExecutorClosed(detail="executor closed before the request started"))
        await asyncio.to_thread(self.watchdog.stop)
        if self._thread is not None:
            # A stuck model thread will not come back for this: it is a daemon and ends with the process.
            await asyncio.to_thread(self._thread.join, 30.0 if self.watchdog.stuck_since is None else 1.0)

    def _wait_idle(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._waiting and not self._running, timeout_s)

    # -- submitting ------------------------------------------------------------------------------
    def submit(self, prompt: Prompt, *, timeout_s: float | None = None) -> RequestHandle:
        kind = "beam" if prompt.params.decoding == "beam" and prompt.params.num_beams > 1 else "generate"
        return RequestHandle(self, self._enqueue(kind, prompt, (), timeout_s))

    async def generate(self, prompt: Prompt, *, timeout_s: float | None = None) -> GenerationResult:
        return await self.submit(prompt, timeout_s=timeout_s).result()

    async def rank(self, prompt: Prompt, categories: Sequence[str], *,
                   timeout_s: float | None = None) -> list[RankedCategory]:
        """Every category scored by its likelihood after `prompt`, most likely first."""
        job = self._enqueue("rank", prompt, tuple(categories), timeout_s)
        return await RequestHandle(self, job).ranking()

    def _enqueue(self, kind: str, prompt: Prompt, categories: tuple[str, ...],
                 timeout_s: float | None) -> LocalJob:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        job = LocalJob(
            id=next(self._ids), kind=kind, prompt=prompt, categories=categories, loop=loop,
            future=loop.create_future(), deltas=asyncio.Queue(), submitted=now,
            deadline=now + (timeout_s or self.config.request_timeout_s), steps_at_submit=self._steps,
        )
        try:
            with self._cond:
                if self._closing:
                    raise ExecutorClosed(detail="executor is closing")
                if self.watchdog.stuck_since is not None:
                    raise ModelStuck(detail=f"request refused: {self.fault}")
                if len(self._waiting) >= self.config.max_queue:
                    raise Busy(len(self._waiting), self.config.max_queue)
                self._waiting.append(job)
                self._cond.notify()
        except Exception as exc:
            self.delivery.observe(exc)
            raise
        log.debug("request %d queued: kind=%s images=%d", job.id, kind, len(prompt.images))
        return job

    # -- what a RequestHandle asks (backend.JobOwner) --------------------------------------------
    def wait_budget(self, job: LocalJob) -> float:
        # The model thread enforces the deadline; the extra minute only guards against a stuck thread.
        return job.deadline - time.monotonic() + 60.0

    def timed_out(self, job: LocalJob) -> Exception:
        self.delivery.count("timeout")
        return RequestTimeout(detail="no result from the model thread")

    def position(self, job: LocalJob) -> int:
        with self._cond:
            try:
                return self._waiting.index(job)
            except ValueError:
                return 0

    def cancel_job(self, job: LocalJob) -> None:
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
            else:
                return
        self.delivery.complete(job, "", FinishReason.CANCELLED, 0, 0)

    # -- what front ends read (backend.GenerationBackend) ----------------------------------------
    def stats(self) -> ExecutorStats:
        with self._cond:
            waiting, running = len(self._waiting), len(self._running)
            errors = dict(self.delivery.errors)
        latencies = tuple(self.delivery.latencies)
        return ExecutorStats(
            queue_length=waiting, running=running, completed=self.delivery.completed, failed=self.delivery.failed,
            median_latency_s=statistics.median(latencies) if latencies else None, batches=len(self.batches),
            errors=errors, fault=self.fault, vision_cache=self.engine.vision_cache_stats(), latencies_s=latencies,
        )

    @property
    def alive(self) -> bool:
        """The model thread runs: started, and neither closed nor crashed."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def fault(self) -> str | None:
        """What is wrong right now ("model thread stuck for 130 s"), None when healthy."""
        return self.watchdog.fault

    async def health(self) -> str | None:
        return self.fault or (None if self.alive else "model thread not running")

    def memory(self) -> dict[str, int]:
        return self.engine.memory()

    @property
    def observers(self) -> list[Observer]:
        """Told each request's outcome (see `backend.Observer`), from the model thread, the watchdog or the loop."""
        return self.delivery.observers

    def add_observer(self, observer: Observer) -> None:
        self.observers.append(observer)

    def remove_observer(self, observer: Observer) -> None:
        if observer in self.observers:
            self.observers.remove(observer)

    # -- the watchdog (see `watchdog.Watchdog`) --------------------------------------------------
    def _declare_stuck(self) -> list[LocalJob]:
        """With `_cond` held: every running and waiting request, which fail now; the queue is emptied."""
        self.delivery.errors["watchdog"] += 1
        victims = [*self._running, *self._waiting]
        self._waiting = []
        for job in self._running:
            job.cancelled.set()  # if the call ever returns, the batch ends at its next step
        self._cond.notify_all()
        return victims

    def _fail_stuck(self, victims: Sequence[LocalJob], silent: float) -> None:
        log.error("model thread made no progress for %.1f s (limit %.1f s): failing %d requests (ids %s)",
                  silent, self.config.watchdog_s, len(victims), ",".join(str(j.id) for j in victims))
        for job in victims:
            self.delivery.fail(job, ModelStuck(detail=f"request {job.id}: model thread silent for {silent:.1f} s"))

    def _fatal(self, reason: str) -> None:
        log.critical("%s; %s", reason, "asking the process to exit" if self.on_fatal else "no on_fatal hook set")
        if self.on_fatal is not None:
            try:
                self.on_fatal(reason)
            except Exception:
                log.exception("on_fatal hook failed")

    # -- the model thread: schedule, execute, update ---------------------------------------------
    def _run(self) -> None:
        if self.config.batching == "continuous":
            self._run_continuous()
        else:
            self._run_static()

    def _run_static(self) -> None:
        """A batch runs to its end; the next one starts from whatever waits then."""
        while True:
            with self._cond:
                if not self._wait_for_work(idle=True):
                    return
                decision = scheduler.next_batch([j.describe() for j in self._waiting],
                                                max_rows=self.config.max_batch_size, now=time.monotonic())
                batch, _ = self._apply(decision)
            if batch:
                self.batches.append(BatchRecord(len(batch), batch[0].kind, time.monotonic()))
                self.runner.execute(batch)
                self._after_model_call([])

    def _run_continuous(self) -> None:
        """Between decode steps, waiting requests are prefilled and join the running batch.

        Finished rows leave at the step that ends them, so a one-line answer does not wait behind a
        long story; when and who joins is `scheduler.admit`. Beam search and scoring run on their own:
        scoring (one forward pass) between two steps, beam search once the running rows are done.
        """
        batch = None
        live: list[tuple[LocalJob, Row]] = []
        while True:
            with self._cond:
                if not self._wait_for_work(idle=batch is None):
                    return
                running = 0 if batch is None else len(batch)  # rows the watchdog gave up on still count
                decision = scheduler.admit([j.describe() for j in self._waiting], running=running,
                                           steps=self._steps, max_rows=self.config.max_batch_size,
                                           now=time.monotonic())
                admitted, alone = self._apply(decision, running)
            if alone is not None:
                self.batches.append(BatchRecord(1, alone.kind, time.monotonic()))
                self.runner.execute([alone])
            if admitted:
                joined, rows = self.runner.prefill(admitted, running)
                if joined is not None:
                    live += [(j, r) for j, r in zip(admitted, rows, strict=True) if not r.done]
                    if batch is None:
                        batch = joined
                    else:
                        batch.join(joined)
            if batch is not None:
                batch = self.runner.step(batch, live)
                self._steps += 1
            self.delivery.flush()
            live = [(j, r) for j, r in live if not r.done and not j.settled]
            self._after_model_call([j for j, _ in live])

    def _wait_for_work(self, idle: bool) -> bool:
        """With `_cond` held: wait while there is nothing to do; False when closing and nothing is left."""
        if not idle:
            return True
        while not self._waiting and not self._closing:
            self._cond.wait()
        if not self._waiting:
            return False
        if self.batch_window_s > 0 and len(self._waiting) < self.config.max_batch_size:
            # A short pause lets requests that arrive together (several channels) share a batch.
            self._cond.wait(self.batch_window_s)
        return True

    def _apply(self, decision: scheduler.Decision, running: int = 0) -> tuple[list[LocalJob], LocalJob | None]:
        """With `_cond` held: carry out the scheduler's decision; the jobs that start now (and the one alone)."""
        now = time.monotonic()
        by_id = {j.id: j for j in self._waiting}
        for job_id in decision.expired:
            job = by_id[job_id]
            self._waiting.remove(job)
            self.delivery.errors["timeout"] += 1
            self.delivery.fail(job, RequestTimeout(detail=f"request {job.id} expired in the queue"))
        alone = None if decision.alone is None else by_id[decision.alone]
        started = [alone] if alone is not None else [by_id[i] for i in decision.join]
        size = 1 if alone is not None else running + len(started)
        for job in started:
            self._waiting.remove(job)
            job.started = now
            job.batch_size = size
            job.post(job.started_event.set)
        if started:
            self.watchdog.progress_at = now
            self._running = started if self.config.batching != "continuous" else [*self._running, *started]
        return ([] if alone is not None else started), alone

    def _after_model_call(self, running: list[LocalJob]) -> None:
        """The model thread came back: record who still runs; a stuck call that returned clears the fault."""
        self.runner.keep(running)
        with self._cond:
            self._running = running
            stuck_for = self.watchdog.recovered()
            self._cond.notify_all()
        if stuck_for is not None:
            log.warning("model thread recovered after %.1f s without progress; serving again", stuck_for)


if TYPE_CHECKING:
    def _keeps_the_contract(backend: Executor) -> GenerationBackend:
        return backend  # mypy checks that `Executor` is a `GenerationBackend`

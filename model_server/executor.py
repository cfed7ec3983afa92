"""The generation executor: coroutines submit, one model thread batches and generates.

The event loop never runs model code. `submit` puts a request in a bounded queue (past the bound it
raises `Busy`) and the model thread generates, handing each row's text deltas (once per step) and
result back to the loop that asked. With `config.batching == "continuous"` waiting requests join the
running batch between decode steps, up to `max_batch_size` rows, and leave it when done
(`_run_continuous`); with "static" the oldest request and every compatible one behind it
(`scheduler.pick_batch`) run as one batch to its end. A batch that runs out of memory is split in
halves and retried; a batch that raises otherwise is retried one request at a time, so one bad
request fails alone and the executor keeps serving.

A watchdog thread watches the model thread: each batch start, decode step and finished row counts as
progress. A running batch silent for `config.watchdog_s` is declared stuck: every running and waiting
request fails at once with `ModelStuck`, new submits are refused with it, and `fault` says so (shown by
`/status`). If the stuck call returns, the fault clears and the executor serves again; if it is still
silent at twice the deadline, `on_fatal` is called (once) so the process can exit and be restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from model_server.config import ModelConfig
from model_server.errors import Busy, ExecutorClosed, GenerationFailed, ModelStuck, RequestTimeout
from model_server.scheduler import Waiting, pick_batch, split_in_halves
from model_server.types import FinishReason, GenerationResult, Prompt, RankedCategory
from model_server.vision_cache import VisionCacheStats

log = logging.getLogger(__name__)

END_OF_STREAM = object()
"""Put on a job's delta queue after its last delta."""

ERROR_KINDS = ("oom", "error", "timeout", "watchdog")
"""Keys of `ExecutorStats.errors`."""

JOIN_WAIT_STEPS = 16
"""Continuous batching: while fewer than half the batch's rows are free, waiting requests join once the oldest
has waited this many decode steps (or half the rows are free). Each join is a prefill that pauses every running
row, so under full load requests join a few at a time rather than one per finished row (text-generation-
inference's `max_waiting_tokens` is the same idea). A request that finds half the batch free starts at once."""


class Engine(Protocol):
    """What the executor needs from a model: `engine.LocalEngine` is the in-process one."""

    def generate(self, rows: Sequence, after_step: Callable[[], None] | None = None) -> None: ...
    def prefill(self, rows: Sequence) -> Any: ...
    def step(self, batch: Any) -> Any: ...
    def beam_search(self, rows: Sequence) -> None: ...
    def score(self, prompt: Prompt, continuations: Sequence[str], chunk: int) -> list[float]: ...
    def free_memory(self) -> None: ...


@dataclass(frozen=True)
class BatchRecord:
    """One batch the model thread started, or (continuous batching) one group of requests that joined the
    running batch, for `/status`, metrics, tests and benchmarks."""

    size: int
    """Rows in the batch once it started (or once the group joined it)."""
    kind: str
    started: float
    """`time.monotonic()` when the batch started; recorded before its first result is handed back."""


@dataclass(frozen=True)
class ExecutorStats:
    queue_length: int
    running: int
    completed: int
    failed: int
    median_latency_s: float | None
    """Median of the last 200 results, submission to last token."""
    batches: int
    errors: dict[str, int]
    """Faults seen since start, by kind: "oom" and "error" count exceptions the model raised (a batch
    retried after one counts once), "timeout" requests that ran past their deadline, "watchdog" times the
    model thread was declared stuck."""
    fault: str | None
    """What is wrong right now (e.g. "model thread stuck for 130 s"), None when the executor is healthy."""
    vision_cache: VisionCacheStats | None = None
    """The in-process model's image-feature cache (None on text-generation-inference)."""


@dataclass(eq=False)
class _Job:
    id: int
    kind: str
    """"generate", "beam" or "rank"."""
    prompt: Prompt
    categories: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    deltas: asyncio.Queue
    submitted: float
    deadline: float
    cancelled: threading.Event = field(default_factory=threading.Event)
    started_event: asyncio.Event = field(default_factory=asyncio.Event)
    started: float | None = None
    sent: str = ""
    batch_size: int = 0
    steps_at_submit: int = 0
    """The executor's decode-step count when the request was queued (`JOIN_WAIT_STEPS`)."""
    settled: bool = False
    """The outcome was handed back (a late result after the watchdog failed the job is dropped)."""

    def post(self, callback, *args) -> None:
        # The loop may already be closed when a cancelled request finishes late; nobody is waiting then.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(callback, *args)


class _HandleOwner(Protocol):
    """What a `RequestHandle` asks of the executor it came from (in-process or TGI)."""

    def _ahead(self, job: Any) -> int: ...
    def _cancel(self, job: Any) -> None: ...
    def _wait_budget(self, job: Any) -> float: ...
    def _timed_out(self, job: Any) -> Exception: ...


class RequestHandle:
    """A submitted request: iterate it for text deltas, await `result()` for the final answer.

    The job behind it has `id`, `deltas` (an asyncio.Queue ending with `END_OF_STREAM`), `future` and
    `started_event`; the executor that made it answers the questions of `_HandleOwner`.
    """

    def __init__(self, executor: _HandleOwner, job: Any) -> None:
        self._executor = executor
        self._job = job

    @property
    def id(self) -> int:
        return self._job.id

    def ahead(self) -> int:
        """Requests that will start before this one (0 once it runs)."""
        return self._executor._ahead(self._job)

    def cancel(self) -> None:
        self._executor._cancel(self._job)

    async def wait_started(self, timeout_s: float) -> bool:
        """True once the request runs (or ended); False if it is still queued after `timeout_s`."""
        try:
            await asyncio.wait_for(self._job.started_event.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            item = await self._job.deltas.get()
            if item is END_OF_STREAM:
                return
            yield item

    async def result(self) -> GenerationResult:
        try:
            budget = max(self._executor._wait_budget(self._job), 1.0)
            return await asyncio.wait_for(asyncio.shield(self._job.future), timeout=budget)
        except asyncio.CancelledError:
            self.cancel()
            raise
        except TimeoutError as exc:
            self.cancel()
            raise self._executor._timed_out(self._job) from exc


class Executor:
    """Batched generation on one model thread. Use as `async with Executor(engine, config) as ex:`."""

    def __init__(self, engine: Engine, config: ModelConfig, *, batch_window_s: float = 0.005) -> None:
        self.engine = engine
        self.config = config
        self.batch_window_s = batch_window_s
        self._waiting: list[_Job] = []
        self._running: list[_Job] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._latencies: deque[float] = deque(maxlen=200)
        self._completed = 0
        self._failed = 0
        self._errors = dict.fromkeys(ERROR_KINDS, 0)
        self.batches: deque[BatchRecord] = deque(maxlen=1000)
        self.on_fatal: Callable[[str], None] | None = None
        """Called once, from the watchdog thread, when the model thread stays stuck past twice
        `config.watchdog_s`; the app sets it to stop the process with a non-zero exit status."""
        self.observers: list[Callable[[GenerationResult | Exception], None]] = []
        """Told each request's outcome (metrics): its `GenerationResult`, or the exception it failed with or
        was refused with at `submit` (`Busy`, ...); rank results are not reported. Called from the model
        thread, the watchdog or the event loop: must be quick and thread-safe."""
        self._steps = 0
        """Decode steps of the running batch so far (continuous batching)."""
        self._outbox: list[tuple[_Job, str]] = []
        """Text deltas of the current step, handed to the event loops together (`_flush`): one wake-up of a loop
        per step rather than one per row."""
        self._outbox_lock = threading.Lock()
        self._progress_at = time.monotonic()
        """Last sign of life of the model thread (batch start, decode step, finished row)."""
        self._stuck_since: float | None = None
        """`_progress_at` when the watchdog declared the model thread stuck; None when healthy."""
        self._fatal_called = False
        self._watch_stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> Executor:
        self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="model-thread", daemon=True)
        self._thread.start()
        if self.config.watchdog_s > 0:
            self._watchdog = threading.Thread(target=self._watch, name="model-watchdog", daemon=True)
            self._watchdog.start()

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
            self._fail(job, ExecutorClosed(detail="executor closed before the request started"))
        self._watch_stop.set()
        if self._watchdog is not None:
            await asyncio.to_thread(self._watchdog.join, 5.0)
        if self._thread is not None:
            # A stuck model thread will not come back for this: it is a daemon and ends with the process.
            await asyncio.to_thread(self._thread.join, 30.0 if self._stuck_since is None else 1.0)

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
        return await RequestHandle(self, job).result()  # type: ignore[return-value]

    def _enqueue(self, kind: str, prompt: Prompt, categories: tuple[str, ...],
                 timeout_s: float | None) -> _Job:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        job = _Job(
            id=next(self._ids), kind=kind, prompt=prompt, categories=categories, loop=loop,
            future=loop.create_future(), deltas=asyncio.Queue(), submitted=now,
            deadline=now + (timeout_s or self.config.request_timeout_s), steps_at_submit=self._steps,
        )
        try:
            with self._cond:
                if self._closing:
                    raise ExecutorClosed(detail="executor is closing")
                if self._stuck_since is not None:
                    raise ModelStuck(detail=f"request refused: {self.fault}")
                if len(self._waiting) >= self.config.max_queue:
                    raise Busy(len(self._waiting), self.config.max_queue)
                self._waiting.append(job)
                self._cond.notify()
        except Exception as exc:
            self._observe(exc)
            raise
        log.debug("request %d queued: kind=%s images=%d", job.id, kind, len(prompt.images))
        return job

    def _wait_budget(self, job: _Job) -> float:
        # The model thread enforces the deadline; the extra minute only guards against a stuck thread.
        return job.deadline - time.monotonic() + 60.0

    def _timed_out(self, job: _Job) -> Exception:
        self._count("timeout")
        return RequestTimeout(detail="no result from the model thread")

    def _ahead(self, job: _Job) -> int:
        with self._cond:
            try:
                return self._waiting.index(job)
            except ValueError:
                return 0

    def _cancel(self, job: _Job) -> None:
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
            else:
                return
        self._complete(job, "", FinishReason.CANCELLED, 0, 0)

    def stats(self) -> ExecutorStats:
        with self._cond:
            waiting, running = len(self._waiting), len(self._running)
            errors = dict(self._errors)
        latencies = list(self._latencies)
        return ExecutorStats(
            queue_length=waiting, running=running, completed=self._completed, failed=self._failed,
            median_latency_s=statistics.median(latencies) if latencies else None, batches=len(self.batches),
            errors=errors, fault=self.fault, vision_cache=self._vision_cache_stats(),
        )

    def _vision_cache_stats(self) -> VisionCacheStats | None:
        cache = getattr(self.engine, "vision_cache", None)
        return None if cache is None else cache.stats()

    @property
    def alive(self) -> bool:
        """The model thread runs: started, and neither closed nor crashed."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def fault(self) -> str | None:
        """What is wrong right now ("model thread stuck for 130 s"), None when healthy."""
        stuck = self._stuck_since
        return None if stuck is None else f"model thread stuck for {time.monotonic() - stuck:.0f} s"

    def _count(self, kind: str) -> None:
        with self._cond:
            self._errors[kind] += 1

    # -- the watchdog ----------------------------------------------------------------------------
    def _beat(self) -> None:
        self._progress_at = time.monotonic()

    def _watch(self) -> None:
        interval = min(1.0, max(0.01, self.config.watchdog_s / 10))
        while not self._watch_stop.wait(interval):
            try:
                self._check_progress(time.monotonic())
            except Exception:  # the watchdog must outlive its own bugs
                log.exception("watchdog check failed")

    def _check_progress(self, now: float) -> None:
        """Declare the model thread stuck, or past the second deadline call `on_fatal`; idle is never stuck."""
        limit = self.config.watchdog_s
        victims: list[_Job] = []
        fatal = False
        with self._cond:
            silent = now - self._progress_at
            if not self._running or silent <= limit:
                return
            if self._stuck_since is None:
                self._stuck_since = self._progress_at
                self._errors["watchdog"] += 1
                victims = [*self._running, *self._waiting]
                self._waiting = []
                for job in self._running:
                    job.cancelled.set()  # if the call ever returns, the batch ends at its next step
                self._cond.notify_all()
            elif silent > 2 * limit and not self._fatal_called:
                self._fatal_called = fatal = True
        if victims:
            log.error("model thread made no progress for %.1f s (limit %.1f s): failing %d requests (ids %s)",
                      silent, limit, len(victims), ",".join(str(j.id) for j in victims))
            for job in victims:
                self._fail(job, ModelStuck(detail=f"request {job.id}: model thread silent for {silent:.1f} s"))
        if fatal:
            reason = f"model thread stuck for {silent:.0f} s (watchdog {limit:g} s)"
            log.critical("%s; %s", reason, "asking the process to exit" if self.on_fatal else "no on_fatal hook set")
            if self.on_fatal is not None:
                try:
                    self.on_fatal(reason)
                except Exception:
                    log.exception("on_fatal hook failed")

    # -- the model thread ------------------------------------------------------------------------
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
                batch = self._take_batch()
            if batch:
                self.batches.append(BatchRecord(len(batch), batch[0].kind, time.monotonic()))
                self._execute(batch)
                self._after_model_call([])

    def _run_continuous(self) -> None:
        """Between decode steps, waiting requests are prefilled and join the running batch.

        Finished rows leave at the step that ends them, so a one-line answer does not wait behind a
        long story; a new request starts at the next step, or within `JOIN_WAIT_STEPS` when fewer than
        half the rows are free. Beam search and scoring run on their own: scoring (one forward pass)
        between two steps, beam search once the running rows are done, so no later request overtakes it.
        """
        batch = None
        live: list[tuple[_Job, Any]] = []
        while True:
            with self._cond:
                if not self._wait_for_work(idle=batch is None):
                    return
                running = 0 if batch is None else len(batch)  # rows the watchdog gave up on still count
                admitted, alone = self._admit(running)
            if alone is not None:
                self.batches.append(BatchRecord(1, alone.kind, time.monotonic()))
                self._execute([alone])
            if admitted:
                joined, rows = self._prefill(admitted, running)
                if joined is not None:
                    live += [(j, r) for j, r in zip(admitted, rows, strict=True) if not r.done]
                    if batch is None:
                        batch = joined
                    else:
                        batch.join(joined)
            if batch is not None:
                batch = self._step(batch, live)
                self._steps += 1
            self._flush()
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

    def _after_model_call(self, running: list[_Job]) -> None:
        """The model thread came back: record who still runs; a stuck call that returned clears the fault."""
        with self._cond:
            self._running = running
            stuck, self._stuck_since = self._stuck_since, None
            self._cond.notify_all()
        if stuck is not None:
            log.warning("model thread recovered after %.1f s without progress; serving again",
                        time.monotonic() - stuck)

    def _expire_waiting(self, now: float) -> None:
        expired = [j for j in self._waiting if j.deadline < now]
        for job in expired:
            self._waiting.remove(job)
            self._errors["timeout"] += 1
            self._fail(job, RequestTimeout(detail=f"request {job.id} expired in the queue"))

    def _start(self, jobs: list[_Job], now: float, batch_size: int) -> None:
        for job in jobs:
            self._waiting.remove(job)
            job.started = now
            job.batch_size = batch_size
            job.post(job.started_event.set)
        self._progress_at = now

    def _admit(self, running: int) -> tuple[list[_Job], _Job | None]:
        """With `_cond` held: the waiting requests that join a batch of `running` rows now, in arrival
        order, and a scoring or beam request that runs alone now (or None)."""
        now = time.monotonic()
        self._expire_waiting(now)
        head = self._waiting[0] if self._waiting else None
        if head is not None and head.kind != "generate" and (head.kind == "rank" or running == 0):
            self._start([head], now, 1)
            self._running = [*self._running, head]
            return [], head
        free = self.config.max_batch_size - running
        if (head is not None and running and free < max(1, self.config.max_batch_size // 2)
                and self._steps - head.steps_at_submit < JOIN_WAIT_STEPS):
            return [], None
        admitted: list[_Job] = []
        for job in self._waiting:
            if job.kind != "generate" or running + len(admitted) >= self.config.max_batch_size:
                break  # first come, first served: nothing overtakes a waiting beam search
            admitted.append(job)
        if admitted:
            self._start(admitted, now, running + len(admitted))
            self._running = [*self._running, *admitted]
        return admitted, None

    def _rows(self, jobs: list[_Job]) -> list:
        from model_server.engine import Row

        return [
            Row(prompt=j.prompt, deadline=j.deadline, cancelled=j.cancelled, sent=j.sent,
                on_delta=lambda delta, j=j: self._delta(j, delta),
                on_done=lambda text, reason, p, c, first, j=j: self._complete(j, text, reason, p, c, first),
                on_step=self._beat)
            for j in jobs
        ]

    def _prefill(self, jobs: list[_Job], running: int) -> tuple[Any, list]:
        """Start `jobs`; on failure they are retried on their own (see `_recover`) and None comes back."""
        self.batches.append(BatchRecord(running + len(jobs), "generate", time.monotonic()))
        rows = self._rows(jobs)
        try:
            return self.engine.prefill(rows), rows
        except Exception as exc:
            self._recover(jobs, rows, exc)
            return None, rows

    def _step(self, batch: Any, live: list[tuple[_Job, Any]]) -> Any:
        """One decode step of the running batch; on failure its rows are retried on their own."""
        try:
            return self.engine.step(batch)
        except Exception as exc:
            jobs = [j for j, _ in live]
            self._recover(jobs, [r for _, r in live], exc)
            return None

    def _take_batch(self) -> list[_Job]:
        now = time.monotonic()
        self._expire_waiting(now)
        entries = [Waiting(j, self._batch_key(j), self._weight(j)) for j in self._waiting]
        chosen = [w.item for w in pick_batch(entries, self.config.max_batch_size)]
        self._start(chosen, now, len(chosen))
        self._running = chosen
        return chosen

    @staticmethod
    def _batch_key(job: _Job) -> object:
        # Scoring runs alone: its rows are the categories, not other requests.
        return ("rank", job.id) if job.kind == "rank" else job.prompt.params.batch_key()

    @staticmethod
    def _weight(job: _Job) -> int:
        return job.prompt.params.num_beams if job.kind == "beam" else 1

    def _execute(self, jobs: list[_Job]) -> None:
        """Run `jobs` as one batch to its end (scoring and beam search alone)."""
        rows = self._rows(jobs)
        try:
            if jobs[0].kind == "rank":
                self._rank(jobs[0])
            elif jobs[0].kind == "beam":
                self.engine.beam_search(rows)
            else:
                self.engine.generate(rows, after_step=self._flush)
        except Exception as exc:
            self._recover(jobs, rows, exc)

    def _recover(self, jobs: list[_Job], rows: list, exc: Exception) -> None:
        """After a model error: out of memory, retry in halves; otherwise one request at a time, so a
        request that breaks the model fails alone. Retried rows skip the text they already streamed."""
        from model_server.engine import is_out_of_memory

        pending = [j for j, r in zip(jobs, rows, strict=True) if not r.done and not j.settled]
        oom = is_out_of_memory(exc)
        self._count("oom" if oom else "error")
        log.warning("batch of %d failed (%s%s); %d to retry", len(jobs), type(exc).__name__,
                    ", out of memory" if oom else "", len(pending) if len(jobs) > 1 else 0,
                    exc_info=not oom)
        if oom:
            self.engine.free_memory()
        if len(jobs) == 1 or not pending:
            for job in pending:
                message = ("the model ran out of memory on this request; try fewer images or a shorter "
                           "message") if oom else None
                self._fail(job, GenerationFailed(message, detail=f"{type(exc).__name__}: {exc}"))
            return
        for part in (split_in_halves(pending) if oom else [[j] for j in pending]):
            if part:
                self._execute(part)

    def _rank(self, job: _Job) -> None:
        scores = self.engine.score(job.prompt, job.categories, self.config.max_batch_size)
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        total = sum(weights)
        ranked = sorted(
            (RankedCategory(c, w / total, s) for c, w, s in zip(job.categories, weights, scores, strict=True)),
            key=lambda r: r.probability, reverse=True,
        )
        self._beat()
        if not self._settle(job):
            return
        self._record_latency(job)
        job.post(resolve_job, job, ranked)

    # -- handing results back to the event loop --------------------------------------------------
    def _settle(self, job: _Job) -> bool:
        """Mark `job`'s outcome as handed back; False if it already was (by the watchdog, a cancel)."""
        with self._cond:
            if job.settled:
                return False
            job.settled = True
            return True

    def _delta(self, job: _Job, delta: str) -> None:
        self._beat()
        job.sent += delta
        if not job.settled:
            with self._outbox_lock:
                self._outbox.append((job, delta))

    def _flush(self) -> None:
        """Hand the deltas collected since the last flush to their event loops, in order."""
        with self._outbox_lock:
            pending, self._outbox = self._outbox, []
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, str]]] = {}
            for job, delta in pending:
                by_loop.setdefault(job.loop, []).append((job, delta))
            for loop, items in by_loop.items():
                # The loop may already be closed when a cancelled request finishes late; nobody waits then.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_deliver, items)

    def _complete(self, job: _Job, text: str, reason: FinishReason, prompt_tokens: int,
                  completion_tokens: int, first_token_at: float | None = None) -> None:
        if not self._settle(job):
            log.info("request %d: late result (%s) dropped, it was already answered", job.id, reason.value)
            return
        if reason is FinishReason.TIMEOUT:
            self._count("timeout")
        now = time.monotonic()
        result = GenerationResult(
            text=text, finish_reason=reason, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            queued_s=((job.started or now) - job.submitted),
            first_token_s=None if first_token_at is None else first_token_at - job.submitted,
            total_s=now - job.submitted, batch_size=job.batch_size,
        )
        self._record_latency(job)
        log.info("request %d done: %s, %d+%d tokens, batch %d, %.2fs", job.id, reason.value, prompt_tokens,
                 completion_tokens, job.batch_size, result.total_s)
        self._observe(result)  # before the result is handed back: whoever awaits it sees it counted
        self._flush()  # its last deltas go before the end of its stream
        job.post(resolve_job, job, result)

    def _record_latency(self, job: _Job) -> None:
        self._completed += 1
        self._latencies.append(time.monotonic() - job.submitted)

    def _fail(self, job: _Job, exc: Exception) -> None:
        if not self._settle(job):
            return
        self._failed += 1
        log.warning("request %d failed: %s", job.id, exc)
        self._observe(exc)
        self._flush()
        job.post(resolve_job, job, exc)

    def _observe(self, outcome: GenerationResult | Exception) -> None:
        notify_observers(self.observers, outcome)



def notify_observers(observers: Sequence[Callable[[GenerationResult | Exception], None]],
                     outcome: GenerationResult | Exception) -> None:
    """Hand one request's outcome to each observer (metrics); an observer's failure never breaks generation."""
    for observer in observers:
        try:
            observer(outcome)
        except Exception:
            log.exception("executor observer failed")


def _deliver(items: list[tuple[Any, str]]) -> None:
    """On an event loop: the text deltas of one step, to each job's stream."""
    for job, delta in items:
        job.deltas.put_nowait(delta)


def resolve_job(job: Any, outcome: object) -> None:
    """On the job's event loop: settle its future with `outcome` and end its delta stream."""
    job.started_event.set()
    if not job.future.done():
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)
    job.deltas.put_nowait(END_OF_STREAM)

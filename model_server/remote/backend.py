"""`RemoteExecutor`: the `backend.GenerationBackend` contract, with generation done by a server over HTTP.

The part every remote backend shares (text-generation-inference in `tgi`, OpenAI-compatible servers in
`openai`); a subclass says how to start (`start`), how one generation runs (`_generate`), how categories are
ranked (`_rank`) and how the server's health is asked (`_probe_health`).

The server batches continuously on its side, so there is no batch picking here: requests wait in a bounded
local queue (past `max_queue` `submit` raises `Busy`) and at most `max_batch_size` of them are sent at once;
each takes the next free slot, oldest first. Everything runs on the event loop (it is all I/O).

Deadlines: past its deadline a request that already streamed text ends with TIMEOUT and that text (as on the
local engine); one that streamed nothing raises `RequestTimeout`. Cancelling a running request closes its
stream, so the server stops generating for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Self

from model_server.backend import (
    BatchRecord,
    ExecutorStats,
    GenerationBackend,
    Job,
    Observer,
    Outcome,
    RequestHandle,
    notify_observers,
    resolve_job,
)
from model_server.config import RemoteConfig
from model_server.errors import (
    Busy,
    ExecutorClosed,
    GenerationFailed,
    ModelServerError,
    RequestRejected,
    RequestTimeout,
    ServerUnavailable,
    StreamBroken,
)
from model_server.prompt import END_OF_UTTERANCE
from model_server.remote.http import FAILED_MESSAGE
from model_server.types import FinishReason, GenerationResult, Prompt, RankedCategory

log = logging.getLogger(__name__)


ERROR_KINDS = ("timeout", "rejected", "unavailable", "broken", "error")
"""Keys of `ExecutorStats.errors` for a remote server: past the deadline or stalled, refused as invalid (422,
400), not reachable or overloaded through every retry, stream cut mid-answer, anything else it failed with."""

HEALTH_INTERVAL_S = 5.0
"""`health()` asks the server at most this often; calls in between get the last answer."""


@dataclass
class StreamProgress:
    """What one streamed request has received so far (kept for a result on cancel or timeout)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    """The event loop's clock at the first token."""


def stop_reason(raw: str, stops: Sequence[str]) -> FinishReason:
    """END_OF_UTTERANCE when `<end_of_utterance>` is the first stop string in `raw`, else STOP_STRING."""
    found = [(raw.find(s), s) for s in stops if s and raw.find(s) >= 0]
    first = min(found)[1] if found else ""
    return FinishReason.END_OF_UTTERANCE if first == END_OF_UTTERANCE else FinishReason.STOP_STRING


@dataclass(eq=False, kw_only=True)
class RemoteJob(Job):
    """A request on a server: "generate" or "rank"; all its times are the event loop's clock (`loop.time()`)."""

    task: asyncio.Task[None] | None = None
    cancelled: bool = False


class RemoteExecutor:
    """Generation on a server. Use as `async with SomeExecutor(config) as ex:`."""

    server_name = "the model server"
    """Shown in `fault` ("... unavailable for N s") and in log lines."""

    def __init__(self, config: RemoteConfig) -> None:
        self.config = config
        self._waiting: deque[RemoteJob] = deque()
        self._running: set[RemoteJob] = set()
        self._closing = False
        self._ids = itertools.count(1)
        self._latencies: deque[float] = deque(maxlen=200)
        self._completed = 0
        self._failed = 0
        self._errors = dict.fromkeys(ERROR_KINDS, 0)
        self._unavailable_since: float | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._warned_beam = False
        self.batches: deque[BatchRecord] = deque(maxlen=1000)
        """One record per request sent to the server (size 1: the server does the batching)."""
        self.on_fatal: Callable[[str], object] | None = None
        """Never called: no thread here can hang, and an unreachable server fails requests (and shows in `fault`)
        rather than the process. Kept so front ends treat every backend alike."""
        self.observers: list[Observer] = []
        """Told each request's outcome (see `backend.Observer`); called on the event loop."""
        self.health_interval_s = HEALTH_INTERVAL_S
        self._health_checked_at: float | None = None
        self._health_problem: str | None = None
        self._health_lock = asyncio.Lock()

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self._close_client()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()

    # -- what a subclass provides -----------------------------------------------------------------
    async def start(self) -> object:
        """Check the server is there and ready (raises `ModelLoadError` with a clear message when not)."""
        raise NotImplementedError

    async def _generate(self, job: RemoteJob, state: StreamProgress) -> None:
        """Stream one answer: `_delta` for each piece of text, then `_complete` (or raise)."""
        raise NotImplementedError

    async def _rank(self, job: RemoteJob) -> list[RankedCategory]:
        raise NotImplementedError

    async def _probe_health(self) -> str | None:
        """Ask the server whether it can answer (None when it can)."""
        raise NotImplementedError

    async def _close_client(self) -> None:
        raise NotImplementedError

    def _beam_note(self) -> str:
        return f"beam search is not available on {self.server_name}: beam requests run greedy"

    async def close(self, grace_s: float = 0.0) -> None:
        """Refuse new requests; let queued and running ones finish for `grace_s`, then cancel the rest."""
        self._closing = True
        if grace_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace_s)
        while self._waiting:
            job = self._waiting.popleft()
            self._fail(job, ExecutorClosed(detail="executor closed before the request started"))
        tasks = [job.task for job in self._running if job.task is not None]
        for job in list(self._running):
            self.cancel_job(job)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._close_client()

    # -- submitting ------------------------------------------------------------------------------
    def submit(self, prompt: Prompt, *, timeout_s: float | None = None) -> RequestHandle:
        if prompt.params.decoding == "beam" and prompt.params.num_beams > 1 and not self._warned_beam:
            self._warned_beam = True
            log.info("%s", self._beam_note())
        return RequestHandle(self, self._enqueue("generate", prompt, (), timeout_s))

    async def generate(self, prompt: Prompt, *, timeout_s: float | None = None) -> GenerationResult:
        return await self.submit(prompt, timeout_s=timeout_s).result()

    async def rank(self, prompt: Prompt, categories: Sequence[str], *,
                   timeout_s: float | None = None) -> list[RankedCategory]:
        """Every category scored by its likelihood after `prompt`, most likely first."""
        job = self._enqueue("rank", prompt, tuple(categories), timeout_s)
        return await RequestHandle(self, job).ranking()

    def _enqueue(self, kind: str, prompt: Prompt, categories: tuple[str, ...], timeout_s: float | None
                 ) -> RemoteJob:
        loop = asyncio.get_running_loop()
        refusal: Exception | None = None
        if self._closing:
            refusal = ExecutorClosed(detail="executor is closing")
        elif len(self._waiting) >= self.config.max_queue:
            refusal = Busy(len(self._waiting), self.config.max_queue)
        if refusal is not None:
            self._observe(refusal)
            raise refusal
        now = loop.time()
        job = RemoteJob(id=next(self._ids), kind=kind, prompt=prompt, categories=categories,
                        future=loop.create_future(), deltas=asyncio.Queue(), submitted=now,
                        deadline=now + (timeout_s or self.config.request_timeout_s))
        self._waiting.append(job)
        self._idle.clear()
        log.debug("request %d queued: kind=%s images=%d", job.id, kind, len(prompt.images))
        self._dispatch()
        return job

    def _dispatch(self) -> None:
        """Start waiting requests, oldest first, while fewer than `max_batch_size` run."""
        while self._waiting and len(self._running) < self.config.max_batch_size:
            job = self._waiting.popleft()
            job.started = asyncio.get_running_loop().time()
            job.started_event.set()
            self._running.add(job)
            self.batches.append(BatchRecord(1, job.kind, time.monotonic()))
            job.task = asyncio.get_running_loop().create_task(self._run(job), name=f"remote-request-{job.id}")
        if not self._waiting and not self._running:
            self._idle.set()

    # -- what a RequestHandle asks (backend.JobOwner) --------------------------------------------
    def wait_budget(self, job: RemoteJob) -> float:
        # A running request enforces its own deadline; this also ends one still queued past it.
        return job.deadline - asyncio.get_running_loop().time() + 5.0

    def timed_out(self, job: RemoteJob) -> Exception:
        return RequestTimeout(detail=f"request {job.id} passed its deadline while queued")

    def position(self, job: RemoteJob) -> int:
        try:
            return self._waiting.index(job)
        except ValueError:
            return 0

    def cancel_job(self, job: RemoteJob) -> None:
        if job.future.done() or job.cancelled:
            return
        job.cancelled = True
        if job in self._waiting:
            self._waiting.remove(job)
            self._complete(job, "", FinishReason.CANCELLED, 0, 0, None)
            self._dispatch()
        elif job.task is not None:
            job.task.cancel()  # closes the stream: see `_run`

    # -- what front ends read (backend.GenerationBackend) ----------------------------------------
    def stats(self) -> ExecutorStats:
        latencies = tuple(self._latencies)
        return ExecutorStats(
            queue_length=len(self._waiting), running=len(self._running), completed=self._completed,
            failed=self._failed, median_latency_s=statistics.median(latencies) if latencies else None,
            batches=len(self.batches), errors=dict(self._errors), fault=self.fault, latencies_s=latencies,
        )

    @property
    def alive(self) -> bool:
        """Always true: no thread here can die (an unreachable server shows in `fault` and `health`)."""
        return True

    async def health(self) -> str | None:
        """The fault, else what the server said at the last check (at most `health_interval_s` ago)."""
        if self.fault:
            return self.fault
        async with self._health_lock:  # one check at a time; calls that come meanwhile share its result
            loop = asyncio.get_running_loop()
            if self._health_checked_at is None or loop.time() - self._health_checked_at >= self.health_interval_s:
                self._health_problem = await self._probe_health()
                self._health_checked_at = loop.time()
            return self._health_problem

    def memory(self) -> dict[str, int]:
        return {}  # no local model

    def add_observer(self, observer: Observer) -> None:
        self.observers.append(observer)

    def remove_observer(self, observer: Observer) -> None:
        if observer in self.observers:
            self.observers.remove(observer)

    @property
    def fault(self) -> str | None:
        """"<server> unavailable for N s" while requests keep failing to reach it."""
        since = self._unavailable_since
        if since is None:
            return None
        return f"{self.server_name} unavailable for {time.monotonic() - since:.0f} s"

    # -- running one request ---------------------------------------------------------------------
    async def _run(self, job: RemoteJob) -> None:
        state = StreamProgress()
        try:
            async with asyncio.timeout_at(job.deadline):
                if job.kind == "rank":
                    ranked = await self._rank(job)
                    self._record_latency(job)
                    resolve_job(job, ranked)
                else:
                    await self._generate(job, state)
        except asyncio.CancelledError:
            if job.cancelled:
                self._complete(job, job.sent, FinishReason.CANCELLED, state.prompt_tokens, state.completion_tokens,
                               state.first_token_at)
            else:  # the loop itself is going away
                self._fail(job, ExecutorClosed(detail="request task cancelled"))
                raise
        except TimeoutError:
            if job.sent:
                self._complete(job, job.sent, FinishReason.TIMEOUT, state.prompt_tokens, state.completion_tokens,
                               state.first_token_at)
            else:
                self._fail(job, RequestTimeout(detail=f"request {job.id} passed its deadline"))
        except ModelServerError as exc:
            self._fail(job, exc)
        except Exception as exc:
            log.exception("request %d failed unexpectedly", job.id)
            self._fail(job, GenerationFailed(FAILED_MESSAGE, detail=f"{type(exc).__name__}: {exc}"))
        finally:
            self._running.discard(job)
            self._dispatch()

    # -- handing results back --------------------------------------------------------------------
    def _delta(self, job: RemoteJob, delta: str) -> None:
        if delta:
            job.sent += delta
            job.deltas.put_nowait(delta)

    def _complete(self, job: RemoteJob, text: str, reason: FinishReason, prompt_tokens: int, completion_tokens: int,
                  first_token_at: float | None) -> None:
        now = asyncio.get_running_loop().time()
        result = GenerationResult(
            text=text, finish_reason=reason, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            queued_s=(job.started or now) - job.submitted,
            first_token_s=None if first_token_at is None else first_token_at - job.submitted,
            total_s=now - job.submitted, batch_size=1,
        )
        self._record_latency(job)
        log.info("request %d done: %s, %d+%d tokens, %.2fs", job.id, reason.value, prompt_tokens,
                 completion_tokens, result.total_s)
        self._observe(result)
        resolve_job(job, result)

    def _record_latency(self, job: RemoteJob) -> None:
        self._completed += 1
        self._unavailable_since = None
        self._latencies.append(asyncio.get_running_loop().time() - job.submitted)

    def _fail(self, job: RemoteJob, exc: Exception) -> None:
        self._failed += 1
        self._errors[error_kind(exc)] += 1
        if isinstance(exc, ServerUnavailable):
            self._unavailable_since = self._unavailable_since or time.monotonic()
        log.warning("request %d failed: %s", job.id, exc)
        self._observe(exc)
        resolve_job(job, exc)

    def _observe(self, outcome: Outcome) -> None:
        notify_observers(self.observers, outcome)



def error_kind(exc: Exception) -> str:
    if isinstance(exc, RequestTimeout):
        return "timeout"
    if isinstance(exc, RequestRejected):
        return "rejected"
    if isinstance(exc, ServerUnavailable):
        return "unavailable"
    if isinstance(exc, StreamBroken):
        return "broken"
    return "error"


def text_only(prompt: Prompt) -> str:
    return "".join(item for item in prompt.items if isinstance(item, str))


if TYPE_CHECKING:
    def _keeps_the_contract(backend: RemoteExecutor) -> GenerationBackend:
        return backend  # mypy checks that `RemoteExecutor` is a `GenerationBackend`

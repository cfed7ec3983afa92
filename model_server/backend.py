"""The contract every generation backend keeps, and the pieces the backends share.

`GenerationBackend` is what front ends (Discord, the terminal, metrics, health) know of a backend; they are typed
against it and nothing else. Three classes keep it: `executor.Executor` (an in-process model on its own thread),
`replicas.ReplicaPool` (several of those, used as one), `tgi.TgiExecutor` (a text-generation-inference
server) and `openai.OpenAIExecutor` (an OpenAI-compatible server); the last two share `remote.backend`. Only the
code that opens backends (`bot.pipeline.services`) names them.

Shared here: the request (`Job`) and the handle a caller holds for it (`RequestHandle`), the figures a backend
reports (`ExecutorStats`, `BatchRecord`), settling a request on its event loop (`resolve_job`, `deliver_deltas`),
telling observers (`notify_observers`) and turning category scores into a ranking (`rank_by_scores`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, TypeVar

from model_server.types import GenerationResult, Prompt, RankedCategory
from model_server.vision_cache import VisionCacheStats

log = logging.getLogger(__name__)

END_OF_STREAM = object()
"""Put on a job's delta queue after its last delta."""

Outcome = GenerationResult | Exception
Observer = Callable[[Outcome], None]
"""Told one request's outcome (metrics): its `GenerationResult`, or the exception it failed with or was refused
with at `submit` (`Busy`, ...); rank results are not reported. Called from any thread: quick and thread-safe."""


@dataclass(frozen=True)
class BatchRecord:
    """One batch the model thread started, or (continuous batching) one group of requests that joined the
    running batch, for `/status`, metrics, tests and benchmarks. On TGI, one per request sent (size 1)."""

    size: int
    """Rows in the batch once it started (or once the group joined it)."""
    kind: str
    """"generate", "beam" or "rank"."""
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
    """Faults seen since start, by kind (each backend documents its kinds in its `ERROR_KINDS`)."""
    fault: str | None
    """What is wrong right now (e.g. "model thread stuck for 130 s"), None when the backend is healthy."""
    vision_cache: VisionCacheStats | None = None
    """The in-process model's image-feature cache (None on text-generation-inference)."""
    latencies_s: tuple[float, ...] = ()
    """The last 200 latencies themselves (a pool's median is taken over all of its replicas' latencies)."""


@dataclass(eq=False, kw_only=True)
class Job:
    """One submitted request, as both backends keep it. Its times are `time.monotonic()` on the in-process
    executor and the event loop's clock on TGI (each backend compares only its own)."""

    id: int
    kind: str
    """"generate", "beam" or "rank"."""
    prompt: Prompt
    categories: tuple[str, ...]
    """The categories of a "rank" request (empty otherwise)."""
    future: asyncio.Future[Any]
    deltas: asyncio.Queue[object]
    """Text deltas (str), then `END_OF_STREAM`."""
    submitted: float
    deadline: float
    started_event: asyncio.Event = field(default_factory=asyncio.Event)
    started: float | None = None
    sent: str = ""
    """The text streamed so far."""


J_contra = TypeVar("J_contra", bound=Job, contravariant=True)


class JobOwner(Protocol[J_contra]):
    """What a `RequestHandle` asks of the backend its job came from."""

    def position(self, job: J_contra) -> int:
        """Requests that will start before `job` (0 once it runs)."""

    def cancel_job(self, job: J_contra) -> None:
        """Stop `job`: dropped if waiting, its row ends at the next step if running."""

    def wait_budget(self, job: J_contra) -> float:
        """Seconds the caller waits for `job`'s outcome before giving up on the backend."""

    def timed_out(self, job: J_contra) -> Exception:
        """The exception a caller gets when `wait_budget` ran out (counted as a timeout)."""


class RequestHandle:
    """A submitted request: iterate it for text deltas, await `result()` for the final answer."""

    def __init__(self, owner: JobOwner[Any], job: Job) -> None:
        self._owner = owner
        self._job = job

    @property
    def id(self) -> int:
        return self._job.id

    def ahead(self) -> int:
        """Requests that will start before this one (0 once it runs)."""
        return self._owner.position(self._job)

    def cancel(self) -> None:
        self._owner.cancel_job(self._job)

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
            assert isinstance(item, str)
            yield item

    async def outcome(self) -> object:
        """The job's outcome, whatever its kind (a `GenerationResult`, or a ranking); raises what it failed with."""
        try:
            budget = max(self._owner.wait_budget(self._job), 1.0)
            return await asyncio.wait_for(asyncio.shield(self._job.future), timeout=budget)
        except asyncio.CancelledError:
            self.cancel()
            raise
        except TimeoutError as exc:
            self.cancel()
            raise self._owner.timed_out(self._job) from exc

    async def result(self) -> GenerationResult:
        outcome = await self.outcome()
        assert isinstance(outcome, GenerationResult), "a rank request's handle has no GenerationResult"
        return outcome

    async def ranking(self) -> list[RankedCategory]:
        outcome = await self.outcome()
        assert isinstance(outcome, list), "only a rank request has a ranking"
        return outcome


class GenerationBackend(Protocol):
    """What every generation backend offers its front ends. Use it as `async with backend:`."""

    on_fatal: Callable[[str], object] | None
    """Called once (from any thread) when the backend failed beyond recovery (a model thread stuck past twice its
    watchdog); the app sets it to stop the process with a non-zero exit status. Never called on TGI."""

    async def __aenter__(self) -> GenerationBackend:
        """Start the backend (model threads, or the check that TGI is ready)."""

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        """`close()`."""

    async def close(self, grace_s: float = 0.0) -> None:
        """Refuse new requests; let queued and running ones finish for `grace_s`, then cancel the rest."""

    def submit(self, prompt: Prompt, *, timeout_s: float | None = None) -> RequestHandle:
        """Queue a generation (raises `Busy`, `ExecutorClosed` or `ModelStuck` at once when refused)."""

    async def generate(self, prompt: Prompt, *, timeout_s: float | None = None) -> GenerationResult:
        """`submit`, then its result."""

    async def rank(self, prompt: Prompt, categories: Sequence[str], *,
                   timeout_s: float | None = None) -> list[RankedCategory]:
        """Every category scored by its likelihood after `prompt`, most likely first."""

    def stats(self) -> ExecutorStats:
        """Counts and figures for `/status` and metrics (quick: safe to call on the event loop)."""

    @property
    def batches(self) -> Sequence[BatchRecord]:
        """The last batches run (about 1000, oldest first): metrics read the sizes of the new ones at each scrape."""

    @property
    def fault(self) -> str | None:
        """What is wrong right now ("model thread stuck for 130 s"), None when healthy."""

    @property
    def alive(self) -> bool:
        """The backend can run requests: every model thread started and running (always true on TGI)."""

    async def health(self) -> str | None:
        """Why the backend cannot answer now (fault, a dead model thread, TGI's `/health` failing), else None."""

    def memory(self) -> dict[str, int]:
        """Bytes of tensors allocated on each local GPU, by device name (empty without a local model)."""

    def add_observer(self, observer: Observer) -> None:
        """Tell `observer` every request's outcome from now on (see `Observer`)."""

    def remove_observer(self, observer: Observer) -> None:
        """Stop telling `observer` (no error if it was not added)."""


def notify_observers(observers: Sequence[Observer], outcome: Outcome) -> None:
    """Hand one request's outcome to each observer (metrics); an observer's failure never breaks generation."""
    for observer in observers:
        try:
            observer(outcome)
        except Exception:
            log.exception("executor observer failed")


def deliver_deltas(items: Sequence[tuple[Job, str]]) -> None:
    """On an event loop: the text deltas of one step, to each job's stream."""
    for job, delta in items:
        job.deltas.put_nowait(delta)


def resolve_job(job: Job, outcome: object) -> None:
    """On the job's event loop: settle its future with `outcome` and end its delta stream."""
    job.started_event.set()
    if not job.future.done():
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)
    job.deltas.put_nowait(END_OF_STREAM)


def rank_by_scores(categories: Sequence[str], scores: Sequence[float]) -> list[RankedCategory]:
    """Categories by their summed log-probabilities, most likely first, with probabilities normalised over them
    (a softmax of the scores)."""
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return sorted(
        (RankedCategory(c, w / total, s) for c, w, s in zip(categories, weights, scores, strict=True)),
        key=lambda r: r.probability, reverse=True,
    )


def continuation_start(ids: Sequence[int], prompt_ids: Sequence[int], *, keep: int = 1) -> int:
    """Where the category begins in `ids` (prompt then category): the first token where they leave `prompt_ids`,
    the prompt's own tokens; at least 1 (the BOS has no log-probability) and leaving at least `keep` tokens.

    A tokenizer may merge across the boundary, and then that merged token is scored too, as the local engine does.
    """
    common = next((k for k, (a, b) in enumerate(zip(ids, prompt_ids, strict=False)) if a != b),
                  min(len(ids), len(prompt_ids)))
    return max(1, min(common, len(ids) - keep))


def continuation_score(ids: Sequence[int], logprobs: Sequence[float], prompt_ids: Sequence[int]) -> float:
    """The summed log-probabilities of the tokens of `ids` (prompt then category, each token's log-probability
    in `logprobs`) from `continuation_start`."""
    return sum(logprobs[continuation_start(ids, prompt_ids):])

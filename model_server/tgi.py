"""`TgiExecutor`: the executor's public surface, with generation done by a text-generation-inference server.

TGI batches continuously on its side, so there is no batch picking here: requests wait in a bounded local
queue (past `max_queue` `submit` raises `Busy`) and at most `max_batch_size` of them are sent to TGI at once;
each takes the next free slot, oldest first. Everything runs on the event loop (it is all I/O).

What a request does (see `tgi_render` for the body, `tgi_client` for the wire and the retries):

- generate: `POST /generate_stream`; token texts go through the same `TextAssembler` as the local engine,
  so deltas never show a stop string or half of one, and the deltas concatenate to the result's text;
  special tokens (`</s>`, `<end_of_utterance>`) are not text. TGI's finish reasons map to ours:
  `length` -> LENGTH, `eos_token` -> END_OF_UTTERANCE, `stop_sequence` -> STOP_STRING, except that a stop on
  `<end_of_utterance>` (which TGI handles as a stop sequence, since the checkpoint's EOS is `</s>`) is the
  model ending its turn: END_OF_UTTERANCE, as on the local engine.
- beam: TGI has no beam search; it runs greedy (logged once).
- rank: one `POST /generate` per category with `decoder_input_details`, summing the prompt log-probabilities
  TGI returns for the category's tokens, from the first token where the text leaves the prompt's own
  tokens (the prompt alone is asked once and cached). Normalised like the local executor's.

Deadlines: past its deadline a request that already streamed text ends with TIMEOUT and that text (as on the
local engine); one that streamed nothing raises `RequestTimeout`. Cancelling a running request closes its
stream, so TGI stops generating for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import math
import statistics
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from model_server.errors import Busy, ExecutorClosed, GenerationFailed, ModelServerError, RequestTimeout
from model_server.executor import (
    BatchRecord,
    ExecutorStats,
    RequestHandle,
    notify_observers,
    resolve_job,
)
from model_server.prompt import END_OF_UTTERANCE, estimate_tokens
from model_server.streaming import TextAssembler
from model_server.tgi_client import (
    FAILED_MESSAGE,
    RequestRejected,
    RetryPolicy,
    ServerUnavailable,
    StreamBroken,
    TgiClient,
    closing_stream,
)
from model_server.tgi_render import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_STOP_SEQUENCES,
    build_body,
    tgi_parameters,
)
from model_server.types import FinishReason, GenerationResult, Prompt, RankedCategory

log = logging.getLogger(__name__)


ERROR_KINDS = ("timeout", "rejected", "unavailable", "broken", "error")
"""Keys of `ExecutorStats.errors` for TGI: past the deadline or stalled, refused with 422, not reachable or
overloaded through every retry, stream cut mid-answer, anything else TGI failed with."""

FINISH_REASONS = {
    "length": FinishReason.LENGTH,
    "eos_token": FinishReason.END_OF_UTTERANCE,
    "stop_sequence": FinishReason.STOP_STRING,
}


@dataclass(frozen=True)
class TgiConfig:
    url: str
    """Base URL of the TGI server (`TGI_URL`), e.g. `http://tgi:80`."""
    max_batch_size: int = 8
    """Most requests sent to TGI at once (TGI batches them continuously)."""
    max_queue: int = 64
    """Most requests waiting here; past it `submit` raises `Busy`."""
    request_timeout_s: float = 180.0
    """Longest a request may take from submission to its last token, retries included."""
    connect_timeout_s: float = 10.0
    """Connecting to TGI, and each of `/health` and `/info`."""
    stall_s: float = 60.0
    """Longest wait for the next streamed event (first token included) before the request fails."""
    max_retries: int = 3
    """Retries of connection errors, 429 and 503, only before any token was streamed."""
    backoff_s: float = 0.5
    """First retry pause, doubled each time; a `Retry-After` header wins."""
    start_wait_s: float = 0.0
    """How long `start()` waits for TGI to become ready before giving up."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """TGI's `--payload-limit`: images are shrunk until a request body is under it."""


@dataclass(frozen=True)
class TgiServerInfo:
    """What `GET /info` says that matters here."""

    model_id: str
    max_input_tokens: int | None
    max_total_tokens: int | None
    max_stop_sequences: int = DEFAULT_MAX_STOP_SEQUENCES
    version: str | None = None

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> TgiServerInfo:
        def number(*keys: str) -> int | None:
            for key in keys:
                value = info.get(key)
                if isinstance(value, int) and value > 0:
                    return value
            return None

        return cls(
            model_id=str(info.get("model_id") or "unknown"),
            max_input_tokens=number("max_input_tokens", "max_input_length"),
            max_total_tokens=number("max_total_tokens"),
            max_stop_sequences=number("max_stop_sequences") or DEFAULT_MAX_STOP_SEQUENCES,
            version=info.get("version") if isinstance(info.get("version"), str) else None,
        )

    def max_positions(self, max_new_tokens: int) -> int:
        """Positions to tell the prompt renderer, which keeps prompts to this minus `max_new_tokens`.

        TGI refuses prompts over `max_input_tokens` and prompt plus answer over `max_total_tokens`.
        """
        limits = [2048]
        if self.max_total_tokens:
            limits.append(self.max_total_tokens)
        if self.max_input_tokens:
            limits.append(self.max_input_tokens + max_new_tokens)
        return min(limits)


@dataclass(eq=False)
class _Job:
    id: int
    kind: str
    """"generate" or "rank"."""
    prompt: Prompt
    categories: tuple[str, ...]
    future: asyncio.Future
    deltas: asyncio.Queue
    submitted: float
    deadline: float
    """`loop.time()` after which the request times out (all times of a job are the loop's clock)."""
    started_event: asyncio.Event = field(default_factory=asyncio.Event)
    started: float | None = None
    task: asyncio.Task | None = None
    cancelled: bool = False
    sent: str = ""


class TgiExecutor:
    """Generation on a TGI server. Use as `async with TgiExecutor(config) as ex:`; `ex.server` is `/info`."""

    def __init__(self, config: TgiConfig, *, client: TgiClient | None = None) -> None:
        self.config = config
        self.client = client or TgiClient(
            config.url, connect_timeout_s=config.connect_timeout_s, stall_s=config.stall_s,
            retry=RetryPolicy(max_retries=config.max_retries, backoff_s=config.backoff_s),
            max_connections=config.max_batch_size + 2,
        )
        self.server: TgiServerInfo | None = None
        self._waiting: deque[_Job] = deque()
        self._running: set[_Job] = set()
        self._closing = False
        self._ids = itertools.count(1)
        self._latencies: deque[float] = deque(maxlen=200)
        self._completed = 0
        self._failed = 0
        self._errors = dict.fromkeys(ERROR_KINDS, 0)
        self._unavailable_since: float | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._prefill_cache: OrderedDict[str, list[int]] = OrderedDict()
        self._warned_beam = False
        self.batches: deque[BatchRecord] = deque(maxlen=1000)
        """One record per request sent to TGI (size 1: TGI does the batching)."""
        self.on_fatal: Callable[[str], None] | None = None
        """Never called: no thread here can hang, and an unreachable TGI fails requests (and shows in `fault`)
        rather than the process. Kept so front ends treat both executors alike."""
        self.observers: list[Callable[[GenerationResult | Exception], None]] = []
        """Told each request's outcome (metrics), as `Executor.observers`; called on the event loop."""

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> TgiExecutor:
        try:
            await self.start()
        except BaseException:
            await self.client.close()
            raise
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def start(self) -> TgiServerInfo:
        """Check `/health` and `/info` (raises `ModelLoadError` with a clear message when TGI is not there)."""
        info = await self.client.check_ready(self.config.start_wait_s)
        self.server = TgiServerInfo.from_info(info)
        log.info("text-generation-inference ready at %s: model %s, version %s, max input %s, max total %s",
                 self.config.url, self.server.model_id, self.server.version, self.server.max_input_tokens,
                 self.server.max_total_tokens)
        return self.server

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
            self._cancel(job)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.close()

    # -- submitting ------------------------------------------------------------------------------
    def submit(self, prompt: Prompt, *, timeout_s: float | None = None) -> RequestHandle:
        if prompt.params.decoding == "beam" and prompt.params.num_beams > 1 and not self._warned_beam:
            self._warned_beam = True
            log.info("beam search is not available on text-generation-inference: beam requests run greedy")
        return RequestHandle(self, self._enqueue("generate", prompt, (), timeout_s))

    async def generate(self, prompt: Prompt, *, timeout_s: float | None = None) -> GenerationResult:
        return await self.submit(prompt, timeout_s=timeout_s).result()

    async def rank(self, prompt: Prompt, categories: Sequence[str], *,
                   timeout_s: float | None = None) -> list[RankedCategory]:
        """Every category scored by its likelihood after `prompt`, most likely first."""
        job = self._enqueue("rank", prompt, tuple(categories), timeout_s)
        return await RequestHandle(self, job).result()  # type: ignore[return-value]

    def _enqueue(self, kind: str, prompt: Prompt, categories: tuple[str, ...], timeout_s: float | None) -> _Job:
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
        job = _Job(id=next(self._ids), kind=kind, prompt=prompt, categories=categories,
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
            job.task = asyncio.get_running_loop().create_task(self._run(job), name=f"tgi-request-{job.id}")
        if not self._waiting and not self._running:
            self._idle.set()

    def _wait_budget(self, job: _Job) -> float:
        # A running request enforces its own deadline; this also ends one still queued past it.
        return job.deadline - asyncio.get_running_loop().time() + 5.0

    def _timed_out(self, job: _Job) -> Exception:
        return RequestTimeout(detail=f"request {job.id} passed its deadline while queued")

    def _ahead(self, job: _Job) -> int:
        try:
            return self._waiting.index(job)
        except ValueError:
            return 0

    def _cancel(self, job: _Job) -> None:
        if job.future.done() or job.cancelled:
            return
        job.cancelled = True
        if job in self._waiting:
            self._waiting.remove(job)
            self._complete(job, "", FinishReason.CANCELLED, 0, 0, None)
            self._dispatch()
        elif job.task is not None:
            job.task.cancel()  # closes the stream: see `_run`

    def stats(self) -> ExecutorStats:
        latencies = list(self._latencies)
        return ExecutorStats(
            queue_length=len(self._waiting), running=len(self._running), completed=self._completed,
            failed=self._failed, median_latency_s=statistics.median(latencies) if latencies else None,
            batches=len(self.batches), errors=dict(self._errors), fault=self.fault,
        )

    @property
    def fault(self) -> str | None:
        """"text-generation-inference unavailable for N s" while requests keep failing to reach it."""
        since = self._unavailable_since
        if since is None:
            return None
        return f"text-generation-inference unavailable for {time.monotonic() - since:.0f} s"

    # -- running one request ---------------------------------------------------------------------
    async def _run(self, job: _Job) -> None:
        state = _Progress()
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

    async def _body(self, prompt: Prompt, parameters: dict[str, Any], suffix: str = "") -> bytes:
        built = await asyncio.to_thread(build_body, prompt.items, parameters, suffix=suffix,
                                        max_bytes=self.config.max_body_bytes)
        if built.image_bytes:
            log.debug("request body %d bytes, images %s bytes", len(built.body), list(built.image_bytes))
        return built.body

    async def _generate(self, job: _Job, state: _Progress) -> None:
        params = job.prompt.params
        server = self.server or TgiServerInfo("unknown", None, None)
        body = await self._body(job.prompt, tgi_parameters(params, max_stop_sequences=server.max_stop_sequences))
        stops = (END_OF_UTTERANCE, *params.stop_strings)
        pieces: list[str] = []
        assembler = TextAssembler(lambda ids: "".join(pieces[:len(ids)]), stops)
        reason: FinishReason | None = None
        last_text = ""
        async with closing_stream(self.client, body) as events:
            async for event in events:
                token = event.get("token") or {}
                if token:
                    state.completion_tokens += 1
                    if state.first_token_at is None:
                        state.first_token_at = asyncio.get_running_loop().time()
                    last_text = str(token.get("text") or "")
                    if not token.get("special"):
                        pieces.append(last_text)
                        self._delta(job, assembler.add(len(pieces) - 1))
                details = event.get("details")
                if isinstance(details, dict):
                    state.completion_tokens = int(details.get("generated_tokens") or state.completion_tokens)
                    if isinstance(details.get("input_length"), int):
                        state.prompt_tokens = details["input_length"]
                    reason = FINISH_REASONS.get(str(details.get("finish_reason")), FinishReason.END_OF_UTTERANCE)
                    if reason is FinishReason.STOP_STRING and last_text.endswith(END_OF_UTTERANCE):
                        reason = FinishReason.END_OF_UTTERANCE
                if assembler.stopped:
                    # A stop string TGI was not told about (past its `max_stop_sequences`), or one split so
                    # that it matched here first: leaving the block closes the stream.
                    reason = _stop_reason("".join(pieces), stops)
                    break
                if event.get("generated_text") is not None and reason is None:
                    reason = FinishReason.END_OF_UTTERANCE
        if reason is None:
            raise GenerationFailed(FAILED_MESSAGE, detail="TGI stream ended without a final event")
        self._delta(job, assembler.finish())
        if not state.prompt_tokens:
            state.prompt_tokens = estimate_tokens(_text_only(job.prompt))
        self._complete(job, assembler.text, reason, state.prompt_tokens, state.completion_tokens,
                       state.first_token_at)

    # -- rank classification ---------------------------------------------------------------------
    async def _prefill(self, body: bytes) -> list[dict[str, Any]]:
        answer = await self.client.generate(body)
        prefill = (answer.get("details") or {}).get("prefill")
        if not isinstance(prefill, list) or not prefill:
            raise GenerationFailed(FAILED_MESSAGE, detail="TGI returned no prefill details (decoder_input_details)")
        return prefill

    async def _prompt_ids(self, prompt: Prompt, parameters: dict[str, Any]) -> list[int]:
        """Token ids of the prompt alone, as TGI tokenizes it (cached: /classify often repeats a prompt)."""
        body = await self._body(prompt, parameters)
        key = hashlib.sha256(body).hexdigest()
        if key in self._prefill_cache:
            self._prefill_cache.move_to_end(key)
            return self._prefill_cache[key]
        ids = [int(t.get("id", -1)) for t in await self._prefill(body)]
        self._prefill_cache[key] = ids
        while len(self._prefill_cache) > 64:
            self._prefill_cache.popitem(last=False)
        return ids

    async def _rank(self, job: _Job) -> list[RankedCategory]:
        # One token is the least TGI generates; only the prompt's own log-probabilities are used.
        parameters = {"max_new_tokens": 1, "details": True, "decoder_input_details": True, "do_sample": False}
        base_ids = await self._prompt_ids(job.prompt, parameters)
        scores: list[float] = []
        # Categories go one at a time: the request holds one of the `max_batch_size` slots.
        for category in job.categories:
            prefill = await self._prefill(await self._body(job.prompt, parameters, " " + category))
            ids = [int(t.get("id", -1)) for t in prefill]
            # Score from the first token where the full text's tokens leave the prompt's (a tokenizer may
            # merge across the boundary, and then that merged token is scored too), as the local engine does.
            common = next((k for k, (a, b) in enumerate(zip(ids, base_ids, strict=False)) if a != b),
                          min(len(ids), len(base_ids)))
            common = max(1, min(common, len(ids) - 1))
            scores.append(sum(float(t.get("logprob") or 0.0) for t in prefill[common:]))
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        total = sum(weights)
        return sorted(
            (RankedCategory(c, w / total, s) for c, w, s in zip(job.categories, weights, scores, strict=True)),
            key=lambda r: r.probability, reverse=True,
        )

    # -- handing results back --------------------------------------------------------------------
    def _delta(self, job: _Job, delta: str) -> None:
        if delta:
            job.sent += delta
            job.deltas.put_nowait(delta)

    def _complete(self, job: _Job, text: str, reason: FinishReason, prompt_tokens: int, completion_tokens: int,
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

    def _record_latency(self, job: _Job) -> None:
        self._completed += 1
        self._unavailable_since = None
        self._latencies.append(asyncio.get_running_loop().time() - job.submitted)

    def _fail(self, job: _Job, exc: Exception) -> None:
        self._failed += 1
        self._errors[_error_kind(exc)] += 1
        if isinstance(exc, ServerUnavailable):
            self._unavailable_since = self._unavailable_since or time.monotonic()
        log.warning("request %d failed: %s", job.id, exc)
        self._observe(exc)
        resolve_job(job, exc)

    def _observe(self, outcome: GenerationResult | Exception) -> None:
        notify_observers(self.observers, outcome)



@dataclass
class _Progress:
    """What one streamed request has received so far (kept for a result on cancel or timeout)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None


def _stop_reason(raw: str, stops: Sequence[str]) -> FinishReason:
    """END_OF_UTTERANCE when `<end_of_utterance>` is the first stop string in `raw`, else STOP_STRING."""
    found = [(raw.find(s), s) for s in stops if s and raw.find(s) >= 0]
    first = min(found)[1] if found else ""
    return FinishReason.END_OF_UTTERANCE if first == END_OF_UTTERANCE else FinishReason.STOP_STRING


def _error_kind(exc: Exception) -> str:
    if isinstance(exc, RequestTimeout):
        return "timeout"
    if isinstance(exc, RequestRejected):
        return "rejected"
    if isinstance(exc, ServerUnavailable):
        return "unavailable"
    if isinstance(exc, StreamBroken):
        return "broken"
    return "error"


def _text_only(prompt: Prompt) -> str:
    return "".join(item for item in prompt.items if isinstance(item, str))

"""HTTP to text-generation-inference (TGI): health, info, `/generate`, and `/generate_stream` as events.

This module knows TGI's wire formats and its failure modes, nothing about prompts or queues:

- `POST /generate` and `POST /generate_stream` take `{"inputs": str, "parameters": {...}}`; the stream is
  server-sent events, one JSON object per `data:` field, `{"token": {...}, "generated_text": ..., "details": ...}`.
- Errors are JSON `{"error": str, "error_type": str}` with 422 (validation), 424 (generation), 429
  (overloaded), 503 (not ready); an error can also arrive as an event in the middle of a stream. Requests
  refused before TGI's handlers run get axum's plain-text body instead: 413 for a body over `--payload-limit`
  (final: the same body would be refused again), 400/415/422 for a body its JSON extractor rejects; the text is
  kept for the log.

Retries: a connection error, 429 or 503 is retried with exponential backoff (a `Retry-After` header is
honoured), at most `max_retries` times, and only while nothing has been handed to the caller: once a
token was streamed, a retry would repeat or contradict text the user already sees, so the request fails.
Every failure is raised as a `model_server.errors` type whose `user_message` is short and safe to show.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from model_server.errors import (
    GenerationFailed,
    ModelLoadError,
    RequestRejected,
    RequestTimeout,
    ServerUnavailable,
    StreamBroken,
)
from model_server.tgi.sse import SseParser

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({429, 503})
HEALTH_TIMEOUT_S = 2.0
"""A `/health` probe (metrics' `/healthz`) that takes longer counts as TGI not reachable."""
MAX_RETRY_AFTER_S = 30.0
"""A server asking for a longer pause than this is treated as down for this request."""

UNREACHABLE_MESSAGE = "the model server cannot be reached right now, please try again in a minute"
OVERLOADED_MESSAGE = "the model server is overloaded, please try again in a minute"
FAILED_MESSAGE = "the model server failed on this request, please try again"
CUT_MESSAGE = "the connection to the model server was lost mid-answer, please ask again"
TOO_LONG_MESSAGE = "this conversation is too long for the model server; send a shorter message or /reset"
INVALID_MESSAGE = "the model server rejected this request as invalid"
TOO_LARGE_MESSAGE = "this request is too large for the model server; try fewer or smaller images"
TOO_LONG_ERRORS = ("`inputs` must have less than", "`inputs` tokens + `max_new_tokens` must be <=")
"""The starts of TGI's two length refusals (`router/src/validation.rs`, `InputLength`, `MaxTotalTokens`)."""


# ---------------------------------------------------------------------------------------------------------
# The client


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 3
    """Retries after the first attempt (connection errors, 429, 503), before anything was streamed."""
    backoff_s: float = 0.5
    """First pause; doubled for each retry (with a little jitter), `Retry-After` wins when given."""
    max_backoff_s: float = 8.0

    def delay(self, retry: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        base = min(self.backoff_s * (2.0 ** retry), self.max_backoff_s)
        return base * (1.0 + 0.1 * random.random())


@dataclass
class _Retryable(Exception):
    """One attempt failed in a way a later attempt may not; `user_message` is used if none is left."""

    detail: str
    user_message: str
    retry_after: float | None = None


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
    return seconds if 0 <= seconds <= MAX_RETRY_AFTER_S else None


async def _error_of(response: aiohttp.ClientResponse) -> tuple[str, str]:
    """TGI's `{"error", "error_type"}` body; else the body's own text (axum answers a body over the payload limit,
    or one its JSON extractor rejects, in plain text: 413 "Failed to buffer the request body: length limit
    exceeded", 422 "Failed to deserialize the JSON body ..."), else the status text."""
    try:
        raw = await response.read()
    except aiohttp.ClientError:
        return response.reason or "", ""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        return text[:300] or response.reason or "", ""
    if isinstance(body, dict):
        return str(body.get("error", "")), str(body.get("error_type", ""))
    return text[:300], ""


def _rejection(status: int, error: str, error_type: str) -> Exception:
    """The exception for a final, non-retryable HTTP status or error event."""
    detail = f"TGI {status} {error_type}: {error}"[:500]
    if status == 413:  # the body is over TGI's `--payload-limit`: the same request would fail again
        return RequestRejected(TOO_LARGE_MESSAGE, detail=detail)
    if status == 422 or error_type == "validation":
        too_long = any(marker in error for marker in TOO_LONG_ERRORS)
        return RequestRejected(TOO_LONG_MESSAGE if too_long else INVALID_MESSAGE, detail=detail)
    if status in RETRYABLE_STATUS or error_type == "overloaded":
        return ServerUnavailable(OVERLOADED_MESSAGE, detail=detail)
    return GenerationFailed(FAILED_MESSAGE, detail=detail)


class TgiClient:
    """One TGI server at `base_url`, over a session this object owns (`await close()` when done)."""

    def __init__(self, base_url: str, *, connect_timeout_s: float = 10.0, stall_s: float = 60.0,
                 retry: RetryPolicy | None = None, max_connections: int = 16) -> None:
        self.base_url = base_url.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self.stall_s = stall_s
        self.retry = retry or RetryPolicy()
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # trust_env=False: a TGI_URL on the private network must not be sent through a proxy.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s),
                trust_env=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- start-up and health checks -------------------------------------------------------------
    async def health(self, timeout_s: float = HEALTH_TIMEOUT_S) -> str | None:
        """None when `GET /health` answers 200 within `timeout_s`, else what went wrong (for `/healthz`)."""
        try:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with self.session.get(self.base_url + "/health", timeout=timeout) as response:
                return None if response.status == 200 else f"text-generation-inference /health: {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"text-generation-inference not reachable ({type(exc).__name__})"

    async def check_ready(self, wait_s: float = 0.0) -> dict[str, Any]:
        """`GET /health` then `GET /info`; retried for up to `wait_s` seconds. Returns the info object."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + wait_s
        pause = 0.5
        while True:
            try:
                return await self._ready_once()
            except (aiohttp.ClientError, TimeoutError, _Retryable, ValueError) as exc:
                reason = exc.detail if isinstance(exc, _Retryable) else f"{type(exc).__name__}: {exc}"
                if loop.time() + pause > give_up:
                    raise ModelLoadError(
                        f"text-generation-inference at {self.base_url} is not reachable / not ready "
                        f"({reason}); start it or fix TGI_URL",
                        detail=f"TGI at {self.base_url}: {reason}",
                    ) from exc
                log.info("waiting for text-generation-inference at %s: %s", self.base_url, reason)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)

    async def _ready_once(self) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=self.connect_timeout_s)
        async with self.session.get(self.base_url + "/health", timeout=timeout) as response:
            if response.status != 200:
                raise _Retryable(f"/health answered {response.status}", UNREACHABLE_MESSAGE)
        async with self.session.get(self.base_url + "/info", timeout=timeout) as response:
            if response.status != 200:
                raise _Retryable(f"/info answered {response.status}", UNREACHABLE_MESSAGE)
            info = await response.json(content_type=None)
        if not isinstance(info, dict):
            raise ValueError("/info is not a JSON object")
        return info

    # -- requests --------------------------------------------------------------------------------
    async def _with_retries(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt()` until it returns, retrying `_Retryable` failures with backoff."""
        retry = 0
        while True:
            try:
                return await attempt()
            except _Retryable as exc:
                if retry >= self.retry.max_retries:
                    raise ServerUnavailable(exc.user_message,
                                            detail=f"{what}: {exc.detail} (after {retry} retries)") from None
                delay = self.retry.delay(retry, exc.retry_after)
                retry += 1
                log.info("%s: %s; retry %d/%d in %.2fs", what, exc.detail, retry, self.retry.max_retries, delay)
                await asyncio.sleep(delay)

    async def _raise_for(self, response: aiohttp.ClientResponse) -> None:
        if response.status == 200:
            return
        error, error_type = await _error_of(response)
        if response.status in RETRYABLE_STATUS:
            message = OVERLOADED_MESSAGE if response.status == 429 else UNREACHABLE_MESSAGE
            raise _Retryable(f"HTTP {response.status} {error_type}", message, _retry_after(response.headers))
        raise _rejection(response.status, error, error_type)

    async def generate(self, body: bytes) -> dict[str, Any]:
        """`POST /generate` with a ready JSON body; the response object."""

        async def attempt() -> dict[str, Any]:
            try:
                async with self.session.post(self.base_url + "/generate", data=body,
                                             headers={"Content-Type": "application/json"}) as response:
                    await self._raise_for(response)
                    result = await response.json(content_type=None)
            except aiohttp.ClientError as exc:
                raise _Retryable(f"{type(exc).__name__}: {exc}", UNREACHABLE_MESSAGE) from exc
            if isinstance(result, list):  # some versions answer a one-element list
                result = result[0] if result else {}
            if not isinstance(result, dict):
                raise GenerationFailed(FAILED_MESSAGE, detail="TGI /generate answered something other than an object")
            return result

        return await self._with_retries("generate", attempt)

    async def tokenize(self, text: str, timeout_s: float = 10.0) -> int:
        """How many tokens TGI's `POST /tokenize` finds in `text` (BOS included); not retried."""
        body = json.dumps({"inputs": text, "add_special_tokens": True}).encode("utf-8")
        try:
            async with self.session.post(self.base_url + "/tokenize", data=body,
                                         headers={"Content-Type": "application/json"},
                                         timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                await self._raise_for(response)
                tokens = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError, _Retryable) as exc:
            raise GenerationFailed(FAILED_MESSAGE, detail=f"TGI /tokenize: {type(exc).__name__}: {exc}") from exc
        if not isinstance(tokens, list):
            raise GenerationFailed(FAILED_MESSAGE, detail="TGI /tokenize answered something other than a list")
        return len(tokens)

    async def stream(self, body: bytes) -> AsyncGenerator[dict[str, Any], None]:
        """`POST /generate_stream`: each event's JSON object, in order, until the stream ends.

        Close the iterator (`contextlib.aclosing`) to stop early: the response, and with it the connection
        TGI streams into, is closed, which makes TGI drop the request. Raises `RequestTimeout` when no
        event comes for `stall_s` seconds (keep-alive comments do not count).
        """
        retry = 0
        yielded = False
        while True:
            try:
                async with contextlib.aclosing(self._stream_once(body)) as events:
                    async for event in events:
                        yielded = True
                        yield event
                return
            except _Retryable as exc:
                if yielded:
                    raise StreamBroken(CUT_MESSAGE, detail=f"stream: {exc.detail} after tokens were streamed") from None
                if retry >= self.retry.max_retries:
                    raise ServerUnavailable(exc.user_message,
                                            detail=f"stream: {exc.detail} (after {retry} retries)") from None
                delay = self.retry.delay(retry, exc.retry_after)
                retry += 1
                log.info("stream: %s; retry %d/%d in %.2fs", exc.detail, retry, self.retry.max_retries, delay)
                await asyncio.sleep(delay)

    async def _stream_once(self, body: bytes) -> AsyncGenerator[dict[str, Any], None]:
        loop = asyncio.get_running_loop()
        response: aiohttp.ClientResponse | None = None
        finished = False
        try:
            try:
                response = await asyncio.wait_for(
                    self.session.post(self.base_url + "/generate_stream", data=body,
                                      headers={"Content-Type": "application/json",
                                               "Accept": "text/event-stream"}),
                    self.stall_s)
            except aiohttp.ClientError as exc:
                raise _Retryable(f"{type(exc).__name__}: {exc}", UNREACHABLE_MESSAGE) from exc
            except TimeoutError as exc:
                raise RequestTimeout(self._stall_message(), detail="TGI sent no response headers") from exc
            await self._raise_for(response)
            parser = SseParser()
            stall_at = loop.time() + self.stall_s
            while True:
                left = stall_at - loop.time()
                if left <= 0:
                    raise RequestTimeout(self._stall_message(), detail=f"no event from TGI for {self.stall_s:g}s")
                try:
                    chunk = await asyncio.wait_for(response.content.readany(), left)
                except TimeoutError:
                    continue  # judged at the top of the loop
                except aiohttp.ClientError as exc:
                    raise _Retryable(f"{type(exc).__name__}: {exc}", CUT_MESSAGE) from exc
                if not chunk:
                    raise _Retryable("stream ended before its last event", CUT_MESSAGE)
                for data in parser.feed(chunk):
                    stall_at = loop.time() + self.stall_s
                    event = _parse_event(data)
                    if "error" in event:
                        error, error_type = str(event.get("error")), str(event.get("error_type", ""))
                        if error_type == "overloaded":
                            raise _Retryable(f"error event {error_type}", OVERLOADED_MESSAGE)
                        raise _rejection(200, error, error_type)
                    yield event
                    if event.get("generated_text") is not None or event.get("details") is not None:
                        finished = True
                        return
        finally:
            if response is not None:
                if finished:
                    response.release()
                else:
                    # Stopped early (cancelled, stop string, error): drop the connection so TGI stops too.
                    response.close()

    def _stall_message(self) -> str:
        return f"the model server stopped answering (nothing for {self.stall_s:g} s), please try again"


def _parse_event(data: str) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise GenerationFailed(FAILED_MESSAGE,
                               detail=f"TGI sent an event that is not JSON ({len(data)} chars)") from exc
    if not isinstance(event, dict):
        raise GenerationFailed(FAILED_MESSAGE, detail="TGI sent an event that is not an object")
    return event


@contextlib.asynccontextmanager
async def closing_stream(client: TgiClient, body: bytes) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
    """`async with closing_stream(client, body) as events:`: the stream, closed however the block ends."""
    events = client.stream(body)
    try:
        yield events
    finally:
        await events.aclose()

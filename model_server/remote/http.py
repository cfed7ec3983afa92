"""HTTP to a remote model server: server-sent events, retries with backoff, the stall timeout, error messages.

Shared by the text-generation-inference client (`tgi.client`) and the OpenAI-compatible one (`openai.client`);
each subclass of `HttpClient` says how its server writes events and errors, this module does the rest:

- Retries: a connection error, 429 or 503 is retried with exponential backoff (a `Retry-After` header is
  honoured), at most `max_retries` times, and only while nothing has been handed to the caller: once a
  token was streamed, a retry would repeat or contradict text the user already sees, so the request fails.
- Stall timeout: a stream with no event for `stall_s` seconds (first event included; keep-alive comments do
  not count) fails with `RequestTimeout`.
- Every failure is raised as a `model_server.errors` type whose `user_message` is short and safe to show;
  what the server said goes to `detail` (the log).
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
from model_server.remote.sse import SseParser

__all__ = ["SseParser"]  # re-exported: the parser is part of what this module offers its clients

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({429, 503})
HEALTH_TIMEOUT_S = 2.0
"""A health probe (metrics' `/healthz`) that takes longer counts as the server not reachable."""
MAX_RETRY_AFTER_S = 30.0
"""A server asking for a longer pause than this is treated as down for this request."""

UNREACHABLE_MESSAGE = "the model server cannot be reached right now, please try again in a minute"
OVERLOADED_MESSAGE = "the model server is overloaded, please try again in a minute"
FAILED_MESSAGE = "the model server failed on this request, please try again"
CUT_MESSAGE = "the connection to the model server was lost mid-answer, please ask again"
TOO_LONG_MESSAGE = "this conversation is too long for the model server; send a shorter message or /reset"
INVALID_MESSAGE = "the model server rejected this request as invalid"
TOO_LARGE_MESSAGE = "this request is too large for the model server; try fewer or smaller images"


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
class Retryable(Exception):
    """One attempt failed in a way a later attempt may not; `user_message` is used if none is left."""

    detail: str
    user_message: str
    retry_after: float | None = None


def retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
    return seconds if 0 <= seconds <= MAX_RETRY_AFTER_S else None


async def body_of(response: aiohttp.ClientResponse) -> tuple[object, str]:
    """A failed response's body as JSON (None when it is not JSON) and as text (at most 300 characters).

    Servers answer some refusals before their own handlers run, in plain text (TGI's axum: 413 "Failed to buffer
    the request body: length limit exceeded", 422 "Failed to deserialize the JSON body ..."): the text keeps the
    reason for the log.
    """
    try:
        raw = await response.read()
    except aiohttp.ClientError:
        return None, ""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        return json.loads(text), text[:300]
    except ValueError:
        return None, text[:300]


def looks_too_long(error: str) -> bool:
    """A validation error that is about length (servers word it freely: tokens, length, context)."""
    lowered = error.lower()
    return "token" in lowered or "length" in lowered or "context" in lowered


def rejection(server: str, status: int, error: str, error_type: str, *, invalid: bool,
              too_long: bool = False) -> Exception:
    """The exception for a final, non-retryable HTTP status or error event; `invalid`: the server judged the
    request itself wrong, `too_long`: because of its length. A 413 (the body is over the server's size limit) is
    final too: the same request would be refused again, so it is never "try again"."""
    detail = f"{server} {status} {error_type}: {error}"[:500]
    if status == 413:
        return RequestRejected(TOO_LARGE_MESSAGE, detail=detail)
    if invalid:
        return RequestRejected(TOO_LONG_MESSAGE if too_long else INVALID_MESSAGE, detail=detail)
    if status in RETRYABLE_STATUS or error_type == "overloaded":
        return ServerUnavailable(OVERLOADED_MESSAGE, detail=detail)
    return GenerationFailed(FAILED_MESSAGE, detail=detail)


class HttpClient:
    """One server at `base_url`, over a session this object owns (`await close()` when done).

    Subclasses name the server (`server_name`, for messages and logs) and say how it writes errors
    (`error_of`, `rejection_for`) and stream events (`decode_event`, `event_error`, `ends_stream`,
    `may_end_after`).
    """

    server_name = "the model server"
    """Shown in log lines and `detail`s."""

    def __init__(self, base_url: str, *, connect_timeout_s: float = 10.0, stall_s: float = 60.0,
                 retry: RetryPolicy | None = None, max_connections: int = 16,
                 headers: dict[str, str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self.stall_s = stall_s
        self.retry = retry or RetryPolicy()
        self._max_connections = max_connections
        self._headers = dict(headers or {})
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # trust_env=False: a server on the private network must not be reached through a proxy.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s),
                trust_env=False, headers=self._headers,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- what subclasses say about their server --------------------------------------------------
    def error_fields(self, body: object) -> tuple[str, str]:
        """(error message, error type) from a failed response's JSON body; ("", "") when it holds no error."""
        return "", ""

    async def error_of(self, response: aiohttp.ClientResponse) -> tuple[str, str]:
        """(error message, error type) from a failed response: the server's JSON error, else the body's own text
        (a plain-text refusal keeps its reason), else the status text."""
        body, text = await body_of(response)
        message, kind = self.error_fields(body)
        if message or kind:
            return message, kind
        return (text or response.reason or ""), ""

    def is_too_long(self, error: str) -> bool:
        """The server's validation `error` says the prompt is too long."""
        return looks_too_long(error)

    def rejection_for(self, status: int, error: str, error_type: str) -> Exception:
        """The exception for a final, non-retryable status (or an error event, status 200)."""
        return rejection(self.server_name, status, error, error_type, invalid=status in (400, 422),
                         too_long=self.is_too_long(error))

    def decode_event(self, data: str) -> dict[str, Any] | None:
        """One event's JSON object; None for a marker that ends the stream (OpenAI's `[DONE]`)."""
        return parse_event(self.server_name, data)

    def event_error(self, event: dict[str, Any]) -> Exception | None:
        """The failure an event reports (a `Retryable` when it may pass), else None."""
        return None

    def ends_stream(self, event: dict[str, Any]) -> bool:
        """This event is the last one: stop reading (the connection is released, not closed)."""
        return False

    def may_end_after(self, event: dict[str, Any]) -> bool:
        """The stream may close after this event without a broken answer."""
        return False

    # -- start-up -------------------------------------------------------------------------------
    async def wait_ready(self, wait_s: float, probe: Callable[[], Awaitable[T]], fix: str) -> T:
        """`probe()` retried for up to `wait_s` seconds; then `ModelLoadError` saying `fix` (a setting to check)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + wait_s
        pause = 0.5
        while True:
            try:
                return await probe()
            except (aiohttp.ClientError, TimeoutError, Retryable, ValueError) as exc:
                reason = exc.detail if isinstance(exc, Retryable) else f"{type(exc).__name__}: {exc}"
                if loop.time() + pause > give_up:
                    raise ModelLoadError(
                        f"{self.server_name} at {self.base_url} is not reachable / not ready ({reason}); {fix}",
                        detail=f"{self.server_name} at {self.base_url}: {reason}",
                    ) from exc
                log.info("waiting for %s at %s: %s", self.server_name, self.base_url, reason)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)

    # -- requests --------------------------------------------------------------------------------
    async def with_retries(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt()` until it returns, retrying `Retryable` failures with backoff."""
        retry = 0
        while True:
            try:
                return await attempt()
            except Retryable as exc:
                if retry >= self.retry.max_retries:
                    raise ServerUnavailable(exc.user_message,
                                            detail=f"{what}: {exc.detail} (after {retry} retries)") from None
                delay = self.retry.delay(retry, exc.retry_after)
                retry += 1
                log.info("%s: %s; retry %d/%d in %.2fs", what, exc.detail, retry, self.retry.max_retries, delay)
                await asyncio.sleep(delay)

    async def raise_for(self, response: aiohttp.ClientResponse) -> None:
        if response.status == 200:
            return
        error, error_type = await self.error_of(response)
        if response.status in RETRYABLE_STATUS:
            message = OVERLOADED_MESSAGE if response.status == 429 else UNREACHABLE_MESSAGE
            raise Retryable(f"HTTP {response.status} {error_type}", message, retry_after(response.headers))
        raise self.rejection_for(response.status, error, error_type)

    async def post_json(self, path: str, body: bytes) -> dict[str, Any]:
        """`POST path` with a ready JSON body (retried): the response object."""

        async def attempt() -> dict[str, Any]:
            try:
                async with self.session.post(self.base_url + path, data=body,
                                             headers={"Content-Type": "application/json"}) as response:
                    await self.raise_for(response)
                    result = await response.json(content_type=None)
            except aiohttp.ClientError as exc:
                raise Retryable(f"{type(exc).__name__}: {exc}", UNREACHABLE_MESSAGE) from exc
            except ValueError as exc:
                raise GenerationFailed(FAILED_MESSAGE, detail=f"{self.server_name} {path}: not JSON") from exc
            if isinstance(result, list):  # some TGI versions answer a one-element list
                result = result[0] if result else {}
            if not isinstance(result, dict):
                raise GenerationFailed(FAILED_MESSAGE,
                                       detail=f"{self.server_name} {path} answered something other than an object")
            return result

        return await self.with_retries(path, attempt)

    async def stream(self, path: str, body: bytes) -> AsyncGenerator[dict[str, Any], None]:
        """`POST path` answered with server-sent events: each event's JSON object, in order, to the end.

        Close the iterator (`contextlib.aclosing`) to stop early: the response, and with it the connection
        the server streams into, is closed, which makes the server drop the request. Raises `RequestTimeout`
        when no event comes for `stall_s` seconds (keep-alive comments do not count).
        """
        retry = 0
        yielded = False
        while True:
            try:
                async with contextlib.aclosing(self._stream_once(path, body)) as events:
                    async for event in events:
                        yielded = True
                        yield event
                return
            except Retryable as exc:
                if yielded:
                    raise StreamBroken(CUT_MESSAGE, detail=f"stream: {exc.detail} after tokens were streamed") from None
                if retry >= self.retry.max_retries:
                    raise ServerUnavailable(exc.user_message,
                                            detail=f"stream: {exc.detail} (after {retry} retries)") from None
                delay = self.retry.delay(retry, exc.retry_after)
                retry += 1
                log.info("stream: %s; retry %d/%d in %.2fs", exc.detail, retry, self.retry.max_retries, delay)
                await asyncio.sleep(delay)

    async def _stream_once(self, path: str, body: bytes) -> AsyncGenerator[dict[str, Any], None]:
        loop = asyncio.get_running_loop()
        response: aiohttp.ClientResponse | None = None
        finished = False
        may_end = False
        try:
            try:
                response = await asyncio.wait_for(
                    self.session.post(self.base_url + path, data=body,
                                      headers={"Content-Type": "application/json",
                                               "Accept": "text/event-stream"}),
                    self.stall_s)
            except aiohttp.ClientError as exc:
                raise Retryable(f"{type(exc).__name__}: {exc}", UNREACHABLE_MESSAGE) from exc
            except TimeoutError as exc:
                raise RequestTimeout(self._stall_message(),
                                     detail=f"{self.server_name} sent no response headers") from exc
            await self.raise_for(response)
            parser = SseParser()
            stall_at = loop.time() + self.stall_s
            while True:
                left = stall_at - loop.time()
                if left <= 0:
                    raise RequestTimeout(self._stall_message(),
                                         detail=f"no event from {self.server_name} for {self.stall_s:g}s")
                try:
                    chunk = await asyncio.wait_for(response.content.readany(), left)
                except TimeoutError:
                    continue  # judged at the top of the loop
                except aiohttp.ClientError as exc:
                    raise Retryable(f"{type(exc).__name__}: {exc}", CUT_MESSAGE) from exc
                if not chunk:
                    if may_end:
                        finished = True
                        return
                    raise Retryable("stream ended before its last event", CUT_MESSAGE)
                for data in parser.feed(chunk):
                    stall_at = loop.time() + self.stall_s
                    event = self.decode_event(data)
                    if event is None:
                        finished = True
                        return
                    failure = self.event_error(event)
                    if failure is not None:
                        raise failure
                    yield event
                    may_end = may_end or self.may_end_after(event)
                    if self.ends_stream(event):
                        finished = True
                        return
        finally:
            if response is not None:
                if finished:
                    response.release()
                else:
                    # Stopped early (cancelled, stop string, error): drop the connection so the server stops too.
                    response.close()

    def _stall_message(self) -> str:
        return f"the model server stopped answering (nothing for {self.stall_s:g} s), please try again"


def parse_event(server: str, data: str) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise GenerationFailed(FAILED_MESSAGE,
                               detail=f"{server} sent an event that is not JSON ({len(data)} chars)") from exc
    if not isinstance(event, dict):
        raise GenerationFailed(FAILED_MESSAGE, detail=f"{server} sent an event that is not an object")
    return event


@contextlib.asynccontextmanager
async def closing_stream(client: HttpClient, path: str, body: bytes) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
    """`async with closing_stream(client, body) as events:`: the stream, closed however the block ends."""
    events = client.stream(path, body)
    try:
        yield events
    finally:
        await events.aclose()

"""A loopback fake of text-generation-inference, written to TGI's documented HTTP API.

Endpoints: `GET /health`, `GET /info`, `POST /generate` (with `details` and `decoder_input_details`: the
prompt's tokens with their log-probabilities in `details.prefill`) and `POST /generate_stream` (server-sent
events: `data: {"token": {...}, "generated_text": null|str, "details": null|{...}}` and a blank line).
Errors are `{"error": str, "error_type": str}` with TGI's statuses, and `{"error": ...}` as an event mid-stream.

Like TGI, it generates tokens and stops them itself: at a special EOS token (`eos_token`), when the text
written so far ends with one of the request's `stop` sequences (`stop_sequence`), or at `max_new_tokens`
(`length`). What the "model" writes is a script of tokens (`Plan.tokens`).

Every request is checked as a real TGI would check it, and more strictly where the bot must behave: JSON body
under the 2,000,000-byte payload limit, known parameters with valid values, at most `max_stop_sequences` stop
sequences, each inline image a decodable `data:` URI. A failed check answers 422 (413 for a large body) and is
listed in `problems`, which tests assert empty.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import re
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image

PAYLOAD_LIMIT = 2_000_000
MODEL_ID = "HuggingFaceM4/idefics-9b-instruct"
EOS = ("</s>", True)
EOU = ("<end_of_utterance>", True)
IMAGE_MARKDOWN = re.compile(r"!\[\]\(([^)]*)\)")
KNOWN_PARAMETERS = {
    "best_of", "decoder_input_details", "details", "do_sample", "frequency_penalty", "grammar", "max_new_tokens",
    "repetition_penalty", "return_full_text", "seed", "stop", "temperature", "top_k", "top_n_tokens", "top_p",
    "truncate", "typical_p", "watermark", "adapter_id",
}

Token = tuple[str, bool]
"""(text, special)."""


def words(text: str) -> list[Token]:
    """`text` as the fake's tokens: each word with the spaces before it, each newline alone."""
    return [(t, False) for t in re.findall(r"\n|[^\S\n]*[^\s]+", text)]


DEFAULT_ANSWER: list[Token] = [*words(" This picture shows some noise."), EOU, *words("\nUser: more")]


@dataclass
class Plan:
    """How the fake answers one request (they are used in order; then `default_plan`)."""

    status: int = 200
    """Not 200: answer this status with TGI's error body right away."""
    error: str = "error"
    error_type: str = ""
    retry_after: str | None = None
    tokens: list[Token] = field(default_factory=lambda: list(DEFAULT_ANSWER))
    stall_after: int | None = None
    """Stream this many tokens, then go silent (sending only `:` keep-alive comments)."""
    cut_after: int | None = None
    """Stream this many tokens, then drop the connection."""
    error_event_after: int | None = None
    """Stream this many tokens, then an `{"error": ...}` event (TGI streams even a validation or overload
    error this way, with status 200, when it is found after the stream began)."""
    error_event_type: str = "generation"
    error_event_text: str = "Request failed during generation: Server error: CUDA out of memory"
    chunk_bytes: int | None = None
    """Write the stream in pieces of this many bytes, cutting lines, JSON and UTF-8 characters anywhere."""
    token_delay_s: float = 0.0
    keepalives: bool = False
    """Write a `:` comment line between events."""


@dataclass
class Received:
    """One request the fake answered."""

    path: str
    at: float
    size: int
    inputs: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    images: list[Image.Image] = field(default_factory=list)
    stream_closed_early: bool = False
    """The client closed the stream before its last event (cancellation)."""


class FakeTgi:
    def __init__(self) -> None:
        self.plans: deque[Plan] = deque()
        self.default_plan = Plan()
        self.received: list[Received] = []
        self.problems: list[str] = []
        self.healthy = True
        self.info: dict[str, Any] = {
            "model_id": MODEL_ID, "model_sha": None, "model_dtype": "torch.bfloat16", "model_device_type": "cuda",
            "model_pipeline_tag": "text-generation", "max_concurrent_requests": 128, "max_best_of": 2,
            "max_stop_sequences": 4, "max_input_tokens": 1024, "max_total_tokens": 2048,
            "waiting_served_ratio": 1.2, "max_batch_total_tokens": 32000, "max_waiting_tokens": 20,
            "max_batch_size": None, "validation_workers": 2, "max_client_batch_size": 4,
            "router": "text-generation-router",
            "version": "2.4.1", "sha": None, "docker_label": None,
        }
        self.logprobs: dict[str, float] = {}
        """Prefill log-probability of a token by its stripped text; others get -1.0."""
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.streams_open = 0
        self.max_streams_open = 0

    # -- server ----------------------------------------------------------------------------------
    async def start(self) -> FakeTgi:
        app = web.Application(client_max_size=16 * PAYLOAD_LIMIT)
        app.router.add_get("/health", self._health)
        app.router.add_get("/info", self._info)
        app.router.add_post("/generate", self._generate)
        app.router.add_post("/generate_stream", self._generate_stream)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeTgi:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def generation_requests(self) -> list[Received]:
        return [r for r in self.received if r.path in ("/generate", "/generate_stream")]

    async def wait_for(self, check, within: float = 5.0, what: str = "condition") -> Any:
        """Poll `check()` until it is truthy (the fake's state changes in its handlers, on this loop)."""
        try:
            async with asyncio.timeout(within):
                while True:
                    if value := check():
                        return value
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise AssertionError(f"timed out after {within}s waiting for {what}") from None

    # -- handlers --------------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        self.received.append(Received("/health", time.monotonic(), 0))
        if not self.healthy:
            return _error(503, "model is loading", "unhealthy")
        return web.Response(status=200)

    async def _info(self, request: web.Request) -> web.Response:
        self.received.append(Received("/info", time.monotonic(), 0))
        return web.json_response(self.info)

    async def _read(self, request: web.Request) -> tuple[Received, web.Response | None]:
        body = await request.read()
        got = Received(request.path, time.monotonic(), len(body))
        self.received.append(got)
        if len(body) > PAYLOAD_LIMIT:
            return got, self._problem(f"body of {len(body)} bytes over the payload limit", status=413)
        if request.content_type != "application/json":
            return got, self._problem(f"content type {request.content_type}")
        try:
            payload = json.loads(body)
        except ValueError:
            return got, self._problem("body is not JSON")
        got.inputs = payload.get("inputs", "")
        got.parameters = payload.get("parameters") or {}
        problem = self._check(got, stream=request.path == "/generate_stream")
        return got, (self._problem(problem) if problem else None)

    def _check(self, got: Received, *, stream: bool) -> str | None:
        p = got.parameters
        if not isinstance(got.inputs, str) or not got.inputs:
            return "inputs must be a non-empty string"
        if unknown := set(p) - KNOWN_PARAMETERS:
            return f"unknown parameters {sorted(unknown)}"
        if not isinstance(p.get("max_new_tokens", 1), int) or p.get("max_new_tokens", 1) < 1:
            return "max_new_tokens must be a positive integer"
        if "temperature" in p and not p["temperature"] > 0:
            return "temperature must be strictly positive"
        if "top_p" in p and not 0 < p["top_p"] < 1:
            return "top_p must be > 0.0 and < 1.0"
        if "repetition_penalty" in p and not p["repetition_penalty"] > 0:
            return "repetition_penalty must be strictly positive"
        stop = p.get("stop", [])
        if not isinstance(stop, list) or len(stop) > self.info["max_stop_sequences"]:
            return f"stop must be a list of at most {self.info['max_stop_sequences']}"
        if stream and p.get("decoder_input_details"):
            return "decoder_input_details == True is not supported when streaming tokens"
        if got.inputs.startswith("<s>"):
            return "inputs start with <s>: TGI adds the BOS itself"
        for url in IMAGE_MARKDOWN.findall(got.inputs):
            match = re.fullmatch(r"data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)", url)
            if not match:
                return "an inline image is not a base64 data URI"
            try:
                image = Image.open(io.BytesIO(base64.b64decode(match.group(2), validate=True)))
                image.load()
            except (binascii.Error, OSError) as exc:
                return f"an inline image does not decode: {exc}"
            if Image.MIME.get(image.format or "") != match.group(1):
                return f"image is {image.format}, data URI says {match.group(1)}"
            got.images.append(image)
        return None

    def _problem(self, problem: str, status: int = 422) -> web.Response:
        self.problems.append(problem)
        return _error(status, f"Input validation error: {problem}", "validation")

    def _plan(self) -> Plan:
        return self.plans.popleft() if self.plans else self.default_plan

    async def _generate(self, request: web.Request) -> web.Response:
        got, refused = await self._read(request)
        if refused:
            return refused
        plan = self._plan()
        if plan.status != 200:
            return _plan_error(plan)
        p = got.parameters
        tokens, finish = self._run_model(plan, p)
        details: dict[str, Any] | None = None
        if p.get("details"):
            details = {"finish_reason": finish, "generated_tokens": len(tokens), "seed": p.get("seed"),
                       "prefill": [], "tokens": [_token(i, t) for i, t in enumerate(tokens)]}
            if p.get("decoder_input_details"):
                details["prefill"] = self.prefill(got.inputs)
        return web.json_response({"generated_text": _text(tokens), "details": details})

    async def _generate_stream(self, request: web.Request) -> web.StreamResponse:
        got, refused = await self._read(request)
        if refused:
            return refused
        plan = self._plan()
        if plan.status != 200:
            return _plan_error(plan)
        tokens, finish = self._run_model(plan, got.parameters)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        self.streams_open += 1
        self.max_streams_open = max(self.max_streams_open, self.streams_open)
        try:
            async for piece in self._events(plan, tokens, finish, got):
                if plan.chunk_bytes:
                    for start in range(0, len(piece), plan.chunk_bytes):
                        await response.write(piece[start:start + plan.chunk_bytes])
                        await asyncio.sleep(0.002)  # so the client reads them as separate chunks
                else:
                    await response.write(piece)
                if request.transport is None or request.transport.is_closing():
                    raise ConnectionResetError("client went away")
            if plan.cut_after is not None:
                assert request.transport is not None
                await asyncio.sleep(0.1)  # let the client read what was sent: a reset loses unread data
                request.transport.abort()
                return response
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            got.stream_closed_early = True
        finally:
            self.streams_open -= 1
        return response

    async def _events(self, plan: Plan, tokens: list[Token], finish: str, got: Received) -> AsyncIterator[bytes]:
        input_length = len(self.prefill(got.inputs))
        for i, token in enumerate(tokens):
            if i == plan.stall_after:
                while True:  # silence, apart from keep-alives: those must not count as progress
                    await asyncio.sleep(0.05)
                    yield b": keep-alive\n\n"
            if i == plan.cut_after:
                return
            if i == plan.error_event_after:
                yield _sse({"error": plan.error_event_text, "error_type": plan.error_event_type})
                return
            if plan.token_delay_s:
                await asyncio.sleep(plan.token_delay_s)
            last = i == len(tokens) - 1
            event: dict[str, Any] = {"index": i, "token": _token(i, token), "top_tokens": None,
                                     "generated_text": None, "details": None}
            if last:
                event["generated_text"] = _text(tokens)
                if got.parameters.get("details"):
                    event["details"] = {"finish_reason": finish, "generated_tokens": len(tokens),
                                        "seed": got.parameters.get("seed"), "input_length": input_length}
            if plan.keepalives:
                yield b":\n"
            yield _sse(event)

    @staticmethod
    def _run_model(plan: Plan, parameters: dict[str, Any]) -> tuple[list[Token], str]:
        """The tokens TGI would send for this script, and why it stopped (its stopping criteria)."""
        stops = parameters.get("stop") or []
        limit = parameters.get("max_new_tokens", 20)
        out: list[Token] = []
        written = ""
        for token in plan.tokens:
            out.append(token)
            written += token[0]
            if token[1] and token[0] == "</s>":
                return out, "eos_token"
            if any(written.endswith(s) for s in stops):
                return out, "stop_sequence"
            if len(out) >= limit:
                return out, "length"
        return out, "length"

    def prefill(self, inputs: str) -> list[dict[str, Any]]:
        """The prompt's tokens as TGI's `details.prefill`: BOS first (no log-probability), then each token."""
        pieces = [("<s>", True)]
        rest = IMAGE_MARKDOWN.sub(" <image> ", inputs)
        pieces += words(rest)
        out = []
        for i, (text, _special) in enumerate(pieces):
            out.append({"id": _token_id(text), "text": text,
                        "logprob": None if i == 0 else self.logprobs.get(text.strip(), -1.0)})
        return out


_VOCAB: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}


def _token_id(text: str) -> int:
    """A stable id per distinct token text, like a vocabulary."""
    return _VOCAB.setdefault(text, len(_VOCAB))


def _token(i: int, token: Token) -> dict[str, Any]:
    text, special = token
    return {"id": _token_id(text), "text": text, "logprob": -0.5, "special": special}


def _text(tokens: list[Token]) -> str:
    return "".join(text for text, special in tokens if not special)


def _sse(event: dict[str, Any]) -> bytes:
    return b"data:" + json.dumps(event, ensure_ascii=False).encode("utf-8") + b"\n\n"


def _error(status: int, error: str, error_type: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": error, "error_type": error_type}, status=status, headers=headers)


def _plan_error(plan: Plan) -> web.Response:
    headers = {"Retry-After": plan.retry_after} if plan.retry_after is not None else None
    return _error(plan.status, plan.error, plan.error_type, headers)


@contextlib.asynccontextmanager
async def running_fake_tgi() -> AsyncIterator[FakeTgi]:
    async with FakeTgi() as fake:
        yield fake

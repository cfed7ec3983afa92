"""A loopback fake of text-generation-inference: its router (HTTP, validation) here, its IDEFICS shard in
`tests.fakes.tgi_shard`, both reproduced from TGI's source (text-generation-inference at db931fc).

Endpoints: `GET /health`, `GET /info`, `POST /generate` (with `details` and `decoder_input_details`: the
prompt's tokens with their log-probabilities in `details.prefill`) and `POST /generate_stream` (server-sent
events: `data: {"token": {...}, "generated_text": null|str, "details": null|{...}}` and a blank line).
Errors are `{"error": str, "error_type": str}` with TGI's statuses, and `{"error": ...}` as an event mid-stream.

Like TGI, it generates tokens and stops them itself: at a special EOS token (`eos_token`), when the text
written so far ends with one of the request's `stop` sequences (`stop_sequence`), or at `max_new_tokens`
(`length`). What the "model" writes is a script of tokens (`Plan.tokens`).

Every request is checked as a real TGI would check it, and more strictly where the bot must behave: JSON body
under the 2,000,000-byte payload limit, known parameters with valid values, at most `max_stop_sequences` stop
sequences, each inline image a decodable `data:` URI. A failed check answers 422 and is listed in `problems`,
which tests assert empty.

As the real router (`router/src/server.rs`, `router/src/validation.rs`, `docs/openapi.json`):

- A body over `--payload-limit` is refused by axum's `DefaultBodyLimit` (`server.rs` 2298) before any handler:
  413 with a plain-text body, `Failed to buffer the request body: length limit exceeded`. A body that is not
  the JSON the handler's `Json<GenerateRequest>` extractor wants is axum's plain-text rejection too: 415 without
  `Content-Type: application/json`, 400 for bad JSON syntax, 422 `Failed to deserialize the JSON body into the
  target type: ...` for a wrong shape.
- The router counts a prompt's tokens with `<image>` (one token) in place of each image (`validation.rs` 648,
  823-847) plus the BOS, and refuses (422, `error_type` "validation", `validation.rs` 172-187, messages 997-1004)
  `inputs` over `max_input_tokens` ("`inputs` must have less than {max} tokens. Given: {n}") and `inputs` plus
  `max_new_tokens` over `max_total_tokens`. Refusals are listed in `refusals`. The stream's final `details`
  report that count as `input_length`; the shard builds three tokens per image (see `tgi_shard`).
- `POST /tokenize` (`server.rs` 1305-1325; `SimpleToken` in `openapi.json`) answers the router's encoding of
  `inputs` (`add_special_tokens`, default true, adds the BOS) as `[{"id", "text", "start", "stop"}]`.
- A request whose prefill batch fails in the shard fails with it: `/generate` answers 424 (`server.rs` 2407,
  `InferError::GenerationError`), a stream sends an `{"error", "error_type": "generation"}` event.
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
from typing import Any

from aiohttp import web
from PIL import Image

from tests.fakes import tgi_shard
from tests.fakes.tgi_plans import DEFAULT_ANSWER, EOS, EOU, Plan, Received, Token, words
from tests.fakes.tgi_shard import Shard

__all__ = ["DEFAULT_ANSWER", "EOS", "EOU", "FakeTgi", "Plan", "Received", "Token", "running_fake_tgi", "words"]

PAYLOAD_LIMIT = 2_000_000
MODEL_ID = "HuggingFaceM4/idefics-9b-instruct"
IMAGE_MARKDOWN = re.compile(r"!\[\]\(([^)]*)\)")
KNOWN_PARAMETERS = {
    "best_of", "decoder_input_details", "details", "do_sample", "frequency_penalty", "grammar", "max_new_tokens",
    "repetition_penalty", "return_full_text", "seed", "stop", "temperature", "top_k", "top_n_tokens", "top_p",
    "truncate", "typical_p", "watermark", "adapter_id",
}

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
        self.shard = Shard(max_truncation=self.info["max_input_tokens"])
        self.refusals: list[str] = []
        """Requests the router refused as too long (422), with its message."""
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.streams_open = 0
        self.max_streams_open = 0

    @property
    def logprobs(self) -> dict[str, float]:
        """Log-probability of a token by its stripped text wherever it occurs (others: see `tgi_shard`)."""
        return self.shard.logprobs

    @logprobs.setter
    def logprobs(self, values: dict[str, float]) -> None:
        self.shard.logprobs = dict(values)

    # -- server ----------------------------------------------------------------------------------
    async def start(self) -> FakeTgi:
        await asyncio.to_thread(tgi_shard.tokenizer)  # loaded before the first request, not during it
        app = web.Application(client_max_size=16 * PAYLOAD_LIMIT)
        app.router.add_get("/health", self._health)
        app.router.add_get("/info", self._info)
        app.router.add_post("/generate", self._generate)
        app.router.add_post("/generate_stream", self._generate_stream)
        app.router.add_post("/tokenize", self._tokenize)
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
            self.problems.append(f"body of {len(body)} bytes over the payload limit")
            return got, web.Response(status=413, text="Failed to buffer the request body: length limit exceeded")
        if request.content_type != "application/json":
            self.problems.append(f"content type {request.content_type}")
            return got, web.Response(status=415, text="Expected request with `Content-Type: application/json`")
        try:
            payload = json.loads(body)
        except ValueError as exc:
            self.problems.append("body is not JSON")
            return got, web.Response(status=400, text=f"Failed to parse the request body as JSON: {exc}")
        if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), str):
            self.problems.append("inputs is not a string")
            return got, web.Response(status=422, text="Failed to deserialize the JSON body into the target type: "
                                     "inputs: invalid type, expected a string at line 1 column 10")
        got.inputs = payload["inputs"]
        got.parameters = payload.get("parameters") or {}
        problem = self._check(got, stream=request.path == "/generate_stream")
        if problem:
            return got, self._problem(problem)
        return got, self._validate_length(got, bool(payload.get("add_special_tokens", True)))

    def _encode(self, got: Received, add_special_tokens: bool) -> list[int]:
        """The router's encoding: text chunks verbatim, `<image>` for each image (`validation.rs` 823-853)."""
        query = "".join(c if isinstance(c, str) else tgi_shard.IMAGE_TOKEN for c in got.chunks)
        return ([tgi_shard.BOS_ID] if add_special_tokens else []) + tgi_shard.encode(query)

    def _validate_length(self, got: Received, add_special_tokens: bool) -> web.Response | None:
        got.input_length = len(self._encode(got, add_special_tokens))
        if got.path == "/tokenize":
            return None
        max_input, max_total = self.info["max_input_tokens"], self.info["max_total_tokens"]
        max_new = got.parameters.get("max_new_tokens") or max(1, max_total - got.input_length)
        message = None
        if got.input_length + max_new > max_total:
            message = (f"`inputs` tokens + `max_new_tokens` must be <= {max_total}. "
                       f"Given: {got.input_length} `inputs` tokens and {max_new} `max_new_tokens`")
        elif got.input_length > max_input:
            message = f"`inputs` must have less than {max_input} tokens. Given: {got.input_length}"
        if message is None:
            return None
        self.refusals.append(message)
        return _error(422, f"Input validation error: {message}", "validation")

    def _check(self, got: Received, *, stream: bool) -> str | None:
        p = got.parameters
        if not got.inputs:
            return "inputs must be a non-empty string"
        if got.path == "/tokenize":
            p = {}
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
        start = 0
        for found in IMAGE_MARKDOWN.finditer(got.inputs):
            if found.start() != start:
                got.chunks.append(got.inputs[start:found.start()])
            start = found.end()
            url = found.group(1)
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
            got.chunks.append(image)
        if start != len(got.inputs):
            got.chunks.append(got.inputs[start:])
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
        try:
            prefilled = await self._prefill(got)
        except Exception as exc:
            return _error(424, _generation_error(exc), "generation")
        p = got.parameters
        tokens, finish = self._run_model(plan, p)
        details: dict[str, Any] | None = None
        if p.get("details"):
            details = {"finish_reason": finish, "generated_tokens": len(tokens), "seed": p.get("seed"),
                       "prefill": [], "tokens": self._token_events(prefilled.ids, tokens)}
            if p.get("decoder_input_details"):
                details["prefill"] = prefilled.prefill
        return web.json_response({"generated_text": _text(tokens), "details": details})

    async def _prefill(self, got: Received) -> tgi_shard.Prefilled:
        prefilled = await self.shard.prefill(list(got.chunks))
        got.shard_ids = prefilled.ids
        if prefilled.truncated:
            self.problems.append(f"the shard cut the prompt's start: over {self.shard.max_truncation} tokens")
        return prefilled

    def _token_events(self, prompt_ids: list[int], tokens: list[Token]) -> list[dict[str, Any]]:
        """Generated tokens as TGI reports them, each with the model's log-probability after what came before."""
        ids = list(prompt_ids)
        out = []
        for i, token in enumerate(tokens):
            event = _token(i, token)
            event["logprob"] = self.shard.logprob(ids, event["id"])
            ids.append(event["id"])
            out.append(event)
        return out

    async def _tokenize(self, request: web.Request) -> web.Response:
        got, refused = await self._read(request)
        if refused:
            return refused
        body = json.loads(await request.read())
        ids = self._encode(got, bool(body.get("add_special_tokens", True)))
        return web.json_response([{"id": i, "text": tgi_shard.token_text(i), "start": 0, "stop": 0} for i in ids])

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
        try:
            prefilled = await self._prefill(got)
        except Exception as exc:
            await response.write(_sse({"error": _generation_error(exc), "error_type": "generation"}))
            await response.write_eof()
            return response
        token_events = self._token_events(prefilled.ids, tokens)
        self.streams_open += 1
        self.max_streams_open = max(self.max_streams_open, self.streams_open)
        try:
            async for piece in self._events(plan, tokens, token_events, finish, got):
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

    async def _events(self, plan: Plan, tokens: list[Token], token_events: list[dict[str, Any]], finish: str,
                      got: Received) -> AsyncIterator[bytes]:
        for i in range(len(tokens)):
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
            event: dict[str, Any] = {"index": i, "token": token_events[i], "top_tokens": None,
                                     "generated_text": None, "details": None}
            if last:
                event["generated_text"] = _text(tokens)
                if got.parameters.get("details"):
                    event["details"] = {"finish_reason": finish, "generated_tokens": len(tokens),
                                        "seed": got.parameters.get("seed"), "input_length": got.input_length}
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


def _token(i: int, token: Token) -> dict[str, Any]:
    text, special = token
    return {"id": tgi_shard.piece_id(text, special), "text": text, "logprob": -0.5, "special": special}


def _generation_error(exc: Exception) -> str:
    """The router's text for a shard failure (`Request failed during generation: Server error: ...`)."""
    return f"Request failed during generation: Server error: {exc}"


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

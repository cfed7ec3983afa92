"""A loopback fake of an OpenAI-compatible chat-completions server, written to OpenAI's API reference and vLLM's
OpenAI server (`vllm/entrypoints/openai/protocol.py`: `ChatCompletionRequest`, its validators, `ErrorResponse`,
`ChatCompletionResponse.prompt_logprobs`; `vllm/entrypoints/openai/serving_chat.py`: the stream's chunks).

Endpoints: `GET /v1/models` and `POST /v1/chat/completions`, streamed (server-sent events, a
`chat.completion.chunk` per `data:` line, then `data: [DONE]`) or not. The quirks kept, as vLLM has them:

- the first chunk carries only `delta.role`; content chunks follow; the chunk with `finish_reason` also has
  vLLM's extra `stop_reason` (the stop string that matched, else null); with `stream_options.include_usage` a
  last chunk has `choices: []` and the `usage`; then `[DONE]`;
- unknown request fields are accepted and ignored (vLLM logs them; `ignored_fields` lists them here);
- `prompt_logprobs > 0` with `stream: true`, `stream_options` without `stream`, `top_logprobs` without `logprobs`,
  and `continue_final_message` with `add_generation_prompt` are refused with 400;
- `prompt_logprobs` is a top-level list in the response: `null` for the first prompt token, then
  `{"<token id>": {"logprob", "rank", "decoded_token"}}`, with the prompt token itself always included;
- an error found mid-stream is an event `data: {"error": {...}}`, then `[DONE]`;
- errors are `{"error": {"message", "type", "param", "code"}}`; an unknown model is 404.

`flavour="openai"` behaves as OpenAI's own API instead: no `max_model_len` in `/models`, and vLLM's extra
fields (`prompt_logprobs`, `continue_final_message`, ...) refused with 400 "Unrecognized request argument".

The "model" writes a script of tokens (`tests.fakes.tgi.Plan`), stopped as vLLM stops it: at a special token
(`stop`), when the text ends with one of the request's `stop` strings (`stop`, the string left out of the text),
or at `max_tokens` (`length`). The prompt is the messages rendered with the IDEFICS chat template
(`User:...<end_of_utterance>\\nAssistant:`), split into word tokens like the fake TGI's. Requests the fake finds
invalid are listed in `problems`, which tests assert empty.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image

from tests.fakes.tgi import Plan, Token, words

MODEL_ID = "HuggingFaceM4/Idefics3-8B-Llama3"
MAX_MODEL_LEN = 4096
PAYLOAD_LIMIT = 2_000_000
VLLM_EXTRAS = {"prompt_logprobs", "continue_final_message", "add_generation_prompt", "repetition_penalty", "top_k",
               "stop_token_ids", "include_stop_str_in_output", "skip_special_tokens", "min_tokens"}
OPENAI_FIELDS = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                 "temperature", "top_p", "seed", "stop", "n", "logprobs", "top_logprobs", "frequency_penalty",
                 "presence_penalty", "user", "response_format", "logit_bias"}
DATA_URL = re.compile(r"data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)")


@dataclass
class ChatPlan(Plan):
    """A `Plan` with what only a chat-completions server does."""

    done_without_finish_after: int | None = None
    """Stream this many tokens, then `[DONE]` without a finish reason (llama.cpp's server, when another request
    interrupts the answer)."""


@dataclass
class ChatRequest:
    """One chat request the fake answered."""

    at: float
    size: int
    body: dict[str, Any] = field(default_factory=dict)
    prompt: str = ""
    """The messages as the chat template renders them."""
    images: list[Image.Image] = field(default_factory=list)
    authorization: str | None = None
    stream_closed_early: bool = False

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages") or [])


class FakeOpenAI:
    def __init__(self, *, flavour: str = "vllm", api_key: str | None = None) -> None:
        self.flavour = flavour
        self.api_key = api_key
        self.plans: deque[Plan] = deque()
        self.default_plan = Plan()
        self.requests: list[ChatRequest] = []
        self.problems: list[str] = []
        self.ignored_fields: set[str] = set()
        self.models_status = 200
        self.logprobs: dict[str, float] = {}
        """Prompt log-probability of a token by its stripped text; others get -1.0."""
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.streams_open = 0

    # -- server ----------------------------------------------------------------------------------
    async def __aenter__(self) -> FakeOpenAI:
        app = web.Application(client_max_size=16 * PAYLOAD_LIMIT)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, check, within: float = 5.0, what: str = "condition") -> Any:
        try:
            async with asyncio.timeout(within):
                while True:
                    if value := check():
                        return value
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise AssertionError(f"timed out after {within}s waiting for {what}") from None

    # -- handlers --------------------------------------------------------------------------------
    def _refused_key(self, request: web.Request) -> web.Response | None:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "Unauthorized", "invalid_request_error")
        return None

    async def _models(self, request: web.Request) -> web.Response:
        if refused := self._refused_key(request):
            return refused
        if self.models_status != 200:
            return _error(self.models_status, "not ready", "ServiceUnavailableError")
        card: dict[str, Any] = {"id": MODEL_ID, "object": "model", "created": int(time.time()), "owned_by": "vllm"}
        if self.flavour == "vllm":
            card.update(root=MODEL_ID, parent=None, max_model_len=MAX_MODEL_LEN, permission=[])
        return web.json_response({"object": "list", "data": [card]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        got = ChatRequest(time.monotonic(), len(raw), authorization=request.headers.get("Authorization"))
        self.requests.append(got)
        if refused := self._refused_key(request):
            return refused
        if len(raw) > PAYLOAD_LIMIT:
            return self._problem(f"body of {len(raw)} bytes over the limit", 413)
        try:
            got.body = json.loads(raw)
        except ValueError:
            return self._problem("body is not JSON")
        if (refusal := self._check(got)) is not None:
            return refusal
        plan = self.plans.popleft() if self.plans else self.default_plan
        if plan.status != 200:
            headers = {"Retry-After": plan.retry_after} if plan.retry_after is not None else None
            return _error(plan.status, plan.error, plan.error_type or "BadRequestError", headers)
        body = got.body
        tokens, finish, matched = _run_model(plan, body)
        if body.get("stream"):
            return await self._stream(request, got, plan, tokens, finish, matched)
        text = "".join(t for t, special in tokens if not special)
        if matched:
            text = text[: text.find(matched)]
        prompt_tokens = words(got.prompt)
        answer: dict[str, Any] = {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                         "logprobs": None, "finish_reason": finish, "stop_reason": matched}],
            "usage": {"prompt_tokens": len(prompt_tokens), "completion_tokens": len(tokens),
                      "total_tokens": len(prompt_tokens) + len(tokens)},
        }
        if self.flavour == "vllm":
            answer["prompt_logprobs"] = (self.prompt_logprobs(got.prompt)
                                         if body.get("prompt_logprobs") is not None else None)
        return web.json_response(answer)

    def _check(self, got: ChatRequest) -> web.Response | None:
        body = got.body
        if not isinstance(body, dict):
            return self._problem("body is not an object")
        if self.flavour == "openai":
            if unknown := set(body) - OPENAI_FIELDS:
                return self._problem(f"Unrecognized request argument supplied: {sorted(unknown)[0]}", expected=True)
        else:
            self.ignored_fields |= set(body) - OPENAI_FIELDS - VLLM_EXTRAS
        if body.get("model") != MODEL_ID:
            return _error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        stream = bool(body.get("stream"))
        if body.get("stream_options") and not stream:
            return self._problem("Stream options can only be defined when `stream=True`.")
        if stream and (body.get("prompt_logprobs") or 0) > 0:
            return self._problem("`prompt_logprobs` are not available when `stream=True`.")
        if (body.get("top_logprobs") or 0) > 0 and not body.get("logprobs"):
            return self._problem("when using `top_logprobs`, `logprobs` must be set to true.")
        continuing = bool(body.get("continue_final_message"))
        if continuing and body.get("add_generation_prompt", True):
            return self._problem("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return self._problem("max_tokens must be at least 1")
        if "temperature" in body and not 0 <= body["temperature"] <= 2:
            return self._problem("temperature must be in [0, 2]")
        if "top_p" in body and not 0 < body["top_p"] <= 1:
            return self._problem("top_p must be in (0, 1]")
        stop = body.get("stop", [])
        if not isinstance(stop, list | str) or (isinstance(stop, list) and len(stop) > 4):
            return self._problem("stop must be a string or a list of at most 4")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return self._problem("messages must be a non-empty list")
        problem = self._render(got, messages, continuing)
        return self._problem(problem) if problem else None

    def _render(self, got: ChatRequest, messages: list[Any], continuing: bool) -> str | None:
        """The IDEFICS chat template: system text, then `User:`/`Assistant:` turns ending `<end_of_utterance>`."""
        out: list[str] = []
        roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
        if roles[0] == "system":
            roles = roles[1:]
        for i, role in enumerate(roles):
            if role != ("user" if i % 2 == 0 else "assistant"):
                return f"roles must alternate user/assistant, got {roles}"
        if not continuing and roles[-1] != "user":
            return "the last message must be a user message"
        for index, m in enumerate(messages):
            content = m.get("content")
            text = ""
            if isinstance(content, str):
                text = content
            elif isinstance(content, list) and m["role"] == "user":
                for part in content:
                    if part.get("type") == "text" and isinstance(part.get("text"), str):
                        text += part["text"]
                    elif part.get("type") == "image_url":
                        problem = self._image(got, (part.get("image_url") or {}).get("url", ""))
                        if problem:
                            return problem
                        text += "<image>"
                    else:
                        return f"unknown content part {part.get('type')}"
            else:
                return f"{m.get('role')} content must be a string"
            last = index == len(messages) - 1
            if m["role"] == "system":
                out.append(text + "\n\n")
            elif m["role"] == "user":
                out.append(f"User:{text}<end_of_utterance>\n")
            else:
                out.append(f"Assistant: {text}" + ("" if continuing and last else "<end_of_utterance>\n"))
        if not continuing:
            out.append("Assistant:")
        got.prompt = "".join(out)
        return None

    @staticmethod
    def _image(got: ChatRequest, url: str) -> str | None:
        match = DATA_URL.fullmatch(url)
        if not match:
            return "an image is not a base64 data URL"
        try:
            image = Image.open(io.BytesIO(base64.b64decode(match.group(2), validate=True)))
            image.load()
        except (binascii.Error, OSError) as exc:
            return f"an image does not decode: {exc}"
        if Image.MIME.get(image.format or "") != match.group(1):
            return f"image is {image.format}, data URL says {match.group(1)}"
        got.images.append(image)
        return None

    def _problem(self, problem: str, status: int = 400, *, expected: bool = False) -> web.Response:
        if not expected:
            self.problems.append(problem)
        return _error(status, problem, "BadRequestError")

    def prompt_logprobs(self, prompt: str) -> list[dict[str, Any] | None]:
        """vLLM's `prompt_logprobs` with 0 extra: None for the BOS, then each prompt token alone."""
        out: list[dict[str, Any] | None] = [None]
        for text, _special in words(prompt.replace("<image>", " <image> ")):
            out.append({str(_token_id(text)): {"logprob": self.logprobs.get(text.strip(), -1.0), "rank": 1,
                                               "decoded_token": text}})
        return out

    async def _stream(self, request: web.Request, got: ChatRequest, plan: Plan, tokens: list[Token], finish: str,
                      matched: str | None) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        self.streams_open += 1
        try:
            async for piece in self._events(got, plan, tokens, finish, matched):
                if plan.chunk_bytes:
                    for start in range(0, len(piece), plan.chunk_bytes):
                        await response.write(piece[start:start + plan.chunk_bytes])
                        await asyncio.sleep(0.002)
                else:
                    await response.write(piece)
                if request.transport is None or request.transport.is_closing():
                    raise ConnectionResetError("client went away")
            if plan.cut_after is not None:
                assert request.transport is not None
                await asyncio.sleep(0.1)
                request.transport.abort()
                return response
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            got.stream_closed_early = True
        finally:
            self.streams_open -= 1
        return response

    async def _events(self, got: ChatRequest, plan: Plan, tokens: list[Token], finish: str,
                      matched: str | None) -> AsyncIterator[bytes]:
        model = got.body["model"]

        def chunk(delta: dict[str, Any], reason: str | None = None, **extra: Any) -> bytes:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            if reason is not None:
                choice["stop_reason"] = matched
            return _sse({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": model, "choices": [choice], **extra})

        yield chunk({"role": "assistant", "content": ""})
        visible = "".join(t for t, special in tokens if not special)
        allowed = visible.find(matched) if matched else len(visible)
        sent = 0
        for i, (text, special) in enumerate(tokens):
            if i == plan.stall_after:
                while True:
                    await asyncio.sleep(0.05)
                    yield b": keep-alive\n\n"
            if i == plan.cut_after:
                return
            if i == getattr(plan, "done_without_finish_after", None):
                yield b"data: [DONE]\n\n"
                return
            if i == plan.error_event_after:
                yield _sse({"error": {"message": plan.error_event_text, "type": "InternalServerError",
                                      "param": None, "code": 500}})
                yield b"data: [DONE]\n\n"
                return
            if plan.token_delay_s:
                await asyncio.sleep(plan.token_delay_s)
            if plan.keepalives:
                yield b":\n"
            if special:
                continue
            piece = text[: max(0, allowed - sent)]  # a matched stop string is not sent
            sent += len(text)
            if piece:
                yield chunk({"content": piece})
        yield chunk({"content": ""}, finish)
        options = got.body.get("stream_options") or {}
        if options.get("include_usage"):
            prompt_tokens = len(words(got.prompt))
            yield _sse({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                        "model": model, "choices": [],
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                                  "total_tokens": prompt_tokens + len(tokens)}})
        yield b"data: [DONE]\n\n"


_VOCAB: dict[str, int] = {}


def _token_id(text: str) -> int:
    """A stable id per distinct token text, like a vocabulary."""
    return _VOCAB.setdefault(text, len(_VOCAB))


def _run_model(plan: Plan, body: dict[str, Any]) -> tuple[list[Token], str, str | None]:
    """The tokens vLLM would produce for this script, why it stopped, and the stop string that matched."""
    stops = body.get("stop") or []
    stops = [stops] if isinstance(stops, str) else stops
    limit = body.get("max_tokens", 16)
    out: list[Token] = []
    written = ""
    for token in plan.tokens:
        out.append(token)
        if token[1]:
            return out, "stop", None
        written += token[0]
        for stop in stops:
            if stop in written:
                return out, "stop", stop
        if len(out) >= limit:
            return out, "length", None
    return out, "length", None


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, ensure_ascii=False).encode("utf-8") + b"\n\n"


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": status}},
                             status=status, headers=headers)


@contextlib.contextmanager
def serving_in_thread(**options: Any) -> Iterator[FakeOpenAI]:
    """A fake server on a thread and event loop of its own, for code that runs `asyncio.run` itself."""
    loop = asyncio.new_event_loop()
    fake = FakeOpenAI(**options)
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(fake.__aenter__())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, name="fake-openai", daemon=True)
    thread.start()
    assert started.wait(10), "the fake server did not start"
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(fake.__aexit__(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()

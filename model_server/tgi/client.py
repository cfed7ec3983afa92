"""HTTP to text-generation-inference (TGI): health, info, `/generate`, and `/generate_stream` as events.

This module knows TGI's wire formats and its failure modes, nothing about prompts or queues (retries, the
stall timeout and the messages are `remote.http`'s, shared with the OpenAI-compatible client):

- `POST /generate` and `POST /generate_stream` take `{"inputs": str, "parameters": {...}}`; the stream is
  server-sent events, one JSON object per `data:` field, `{"token": {...}, "generated_text": ..., "details": ...}`.
- Errors are JSON `{"error": str, "error_type": str}` with 422 (validation), 424 (generation), 429
  (overloaded), 503 (not ready); an error can also arrive as an event in the middle of a stream. Requests
  refused before TGI's handlers run get axum's plain-text body instead: 413 for a body over `--payload-limit`
  (final: the same body would be refused again), 400/415/422 for a body its JSON extractor rejects; the text is
  kept for the log (`remote.http.body_of`).
- A prompt too long is told by TGI's two exact refusals (`TOO_LONG_ERRORS`), not by guessing at words.
- `POST /tokenize` takes `{"inputs": str, "add_special_tokens": bool}` and answers a list, one object a token.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp

from model_server.errors import GenerationFailed
from model_server.remote.http import (
    FAILED_MESSAGE,
    HEALTH_TIMEOUT_S,
    OVERLOADED_MESSAGE,
    UNREACHABLE_MESSAGE,
    HttpClient,
    Retryable,
    rejection,
)

TOO_LONG_ERRORS = ("`inputs` must have less than", "`inputs` tokens + `max_new_tokens` must be <=")
"""The starts of TGI's two length refusals (`router/src/validation.rs`, `InputLength`, `MaxTotalTokens`)."""


class TgiClient(HttpClient):
    """One TGI server at `base_url`, over a session this object owns (`await close()` when done)."""

    server_name = "text-generation-inference"

    def error_fields(self, body: object) -> tuple[str, str]:
        """TGI's `{"error", "error_type"}` body."""
        if isinstance(body, dict) and ("error" in body or "error_type" in body):
            return str(body.get("error", "")), str(body.get("error_type", ""))
        return "", ""

    def is_too_long(self, error: str) -> bool:
        return any(marker in error for marker in TOO_LONG_ERRORS)

    def rejection_for(self, status: int, error: str, error_type: str) -> Exception:
        return rejection("TGI", status, error, error_type, invalid=status == 422 or error_type == "validation",
                         too_long=self.is_too_long(error))

    def event_error(self, event: dict[str, Any]) -> Exception | None:
        if "error" not in event:
            return None
        error, error_type = str(event.get("error")), str(event.get("error_type", ""))
        if error_type == "overloaded":
            return Retryable(f"error event {error_type}", OVERLOADED_MESSAGE)
        return self.rejection_for(200, error, error_type)

    def ends_stream(self, event: dict[str, Any]) -> bool:
        return event.get("generated_text") is not None or event.get("details") is not None

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
        return await self.wait_ready(wait_s, self._ready_once, "start it or fix TGI_URL")

    async def _ready_once(self) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=self.connect_timeout_s)
        async with self.session.get(self.base_url + "/health", timeout=timeout) as response:
            if response.status != 200:
                raise Retryable(f"/health answered {response.status}", UNREACHABLE_MESSAGE)
        async with self.session.get(self.base_url + "/info", timeout=timeout) as response:
            if response.status != 200:
                raise Retryable(f"/info answered {response.status}", UNREACHABLE_MESSAGE)
            info = await response.json(content_type=None)
        if not isinstance(info, dict):
            raise ValueError("/info is not a JSON object")
        return info

    # -- requests --------------------------------------------------------------------------------
    async def generate(self, body: bytes) -> dict[str, Any]:
        """`POST /generate` with a ready JSON body; the response object."""
        return await self.post_json("/generate", body)

    async def tokenize(self, text: str, timeout_s: float = 10.0) -> int:
        """How many tokens TGI's `POST /tokenize` finds in `text` (BOS included); not retried."""
        body = json.dumps({"inputs": text, "add_special_tokens": True}).encode("utf-8")
        try:
            async with self.session.post(self.base_url + "/tokenize", data=body,
                                         headers={"Content-Type": "application/json"},
                                         timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                await self.raise_for(response)
                tokens = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError, Retryable) as exc:
            raise GenerationFailed(FAILED_MESSAGE, detail=f"TGI /tokenize: {type(exc).__name__}: {exc}") from exc
        if not isinstance(tokens, list):
            raise GenerationFailed(FAILED_MESSAGE, detail="TGI /tokenize answered something other than a list")
        return len(tokens)

    def generate_stream(self, body: bytes) -> AsyncGenerator[dict[str, Any], None]:
        """`POST /generate_stream`: each event's JSON object (see `HttpClient.stream`)."""
        return self.stream("/generate_stream", body)

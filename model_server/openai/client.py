"""HTTP to an OpenAI-compatible server (vLLM, SGLang, TGI's Messages API, llama.cpp, Ollama): models, chat
completions, streamed or not.

Wire formats (OpenAI's API reference; vLLM's `vllm/entrypoints/openai/protocol.py` and `serving_chat.py`):

- `POST {base}/chat/completions` takes `{"model", "messages", "stream", "max_tokens", ...}`; streamed, it answers
  server-sent events whose `data:` is a `chat.completion.chunk` object
  (`{"choices": [{"index", "delta": {"role"?, "content"?}, "finish_reason"}], "usage"?}`), and a last
  `data: [DONE]`, which is no JSON.
- Errors are `{"error": {"message", "type", "param", "code"}}` (OpenAI, newer vLLM) or the flat
  `{"object": "error", "message", "type", "code"}` (older vLLM, SGLang), with 400 for a request the server judges
  wrong (too long for the context among those), 401/403 for a refused key, 404 for an unknown model, 413 for a
  body over the server's limit, 429 overloaded or out of quota, 500/503 server trouble. vLLM also sends an
  error in the middle of a stream as an event `data: {"error": {...}}` before `[DONE]`.
- `GET {base}/models` lists the models served: the start-up and health check (OpenAI has no `/health`).

The API key goes in `Authorization: Bearer ...` on the session and nowhere else: never in a log or a `detail`.
Retries, the stall timeout and the messages are `remote.http`'s, as for TGI.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from model_server.errors import GenerationFailed, ModelLoadError
from model_server.remote.http import (
    HEALTH_TIMEOUT_S,
    OVERLOADED_MESSAGE,
    RETRYABLE_STATUS,
    UNREACHABLE_MESSAGE,
    HttpClient,
    Retryable,
    RetryPolicy,
    parse_event,
    rejection,
)

DONE = "[DONE]"
"""The `data` of the last event of a stream."""
KEY_REFUSED_MESSAGE = "the model server refused this bot's API key; the operator must check OPENAI_API_KEY"
UNKNOWN_MODEL_MESSAGE = "the model server does not serve the configured model; the operator must check OPENAI_MODEL"


def error_fields(body: object) -> tuple[str, str]:
    """(message, type) from either error shape; ("", "") when the body holds no error."""
    if not isinstance(body, dict):
        return "", ""
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("message", "")), str(error.get("type", "") or error.get("code", ""))
    if isinstance(error, str):  # TGI's Messages API keeps TGI's own `{"error": str, "error_type": str}`
        return error, str(body.get("error_type", ""))
    if body.get("object") == "error":
        return str(body.get("message", "")), str(body.get("type", ""))
    return "", ""


class OpenAIClient(HttpClient):
    """One OpenAI-compatible server at `base_url` (which ends in `/v1`, as `OPENAI_BASE_URL` does)."""

    server_name = "the OpenAI-compatible server"

    def __init__(self, base_url: str, *, api_key: str | None = None, connect_timeout_s: float = 10.0,
                 stall_s: float = 60.0, retry: RetryPolicy | None = None, max_connections: int = 16) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        super().__init__(base_url, connect_timeout_s=connect_timeout_s, stall_s=stall_s, retry=retry,
                         max_connections=max_connections, headers=headers)

    def error_fields(self, body: object) -> tuple[str, str]:
        return error_fields(body)

    def rejection_for(self, status: int, error: str, error_type: str) -> Exception:
        detail = f"OpenAI-compatible server {status} {error_type}: {error}"[:500]
        if status in (401, 403):
            return GenerationFailed(KEY_REFUSED_MESSAGE, detail=detail)
        if status == 404:
            return GenerationFailed(UNKNOWN_MODEL_MESSAGE, detail=detail)
        return rejection("OpenAI-compatible server", status, error, error_type, invalid=status in (400, 422),
                         too_long=self.is_too_long(error))

    def decode_event(self, data: str) -> dict[str, Any] | None:
        if data.strip() == DONE:
            return None
        return parse_event(self.server_name, data)

    def event_error(self, event: dict[str, Any]) -> Exception | None:
        message, kind = error_fields(event)
        if not message and not kind:
            return None
        code = event.get("error", {}).get("code") if isinstance(event.get("error"), dict) else event.get("code")
        if code in RETRYABLE_STATUS or kind in ("overloaded", "ServiceUnavailableError"):
            return Retryable(f"error event {kind}", OVERLOADED_MESSAGE)
        status = code if isinstance(code, int) and code >= 400 else 500
        return self.rejection_for(status, message, kind)

    def may_end_after(self, event: dict[str, Any]) -> bool:
        # A server that closes the stream right after the chunk with a finish reason, without `[DONE]`, has
        # still sent the whole answer.
        return any(isinstance(c, dict) and c.get("finish_reason") for c in event.get("choices") or ())

    # -- start-up and health checks -------------------------------------------------------------
    async def models(self) -> list[dict[str, Any]]:
        """`GET /models`: the `data` list (one object per model, with its `id`)."""
        timeout = aiohttp.ClientTimeout(total=self.connect_timeout_s)
        async with self.session.get(self.base_url + "/models", timeout=timeout) as response:
            if response.status in (401, 403):
                raise ModelLoadError(KEY_REFUSED_MESSAGE, detail=f"/models answered {response.status}")
            if response.status != 200:
                raise Retryable(f"/models answered {response.status}", UNREACHABLE_MESSAGE)
            body = await response.json(content_type=None)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise ValueError("/models has no data list")
        return [model for model in data if isinstance(model, dict)]

    async def check_ready(self, wait_s: float = 0.0) -> list[dict[str, Any]]:
        """`GET /models`, retried for up to `wait_s` seconds (the server may still be loading its model)."""
        return await self.wait_ready(wait_s, self.models, "start it or fix OPENAI_BASE_URL")

    async def health(self, timeout_s: float = HEALTH_TIMEOUT_S) -> str | None:
        """None when `GET /models` answers 200 within `timeout_s`, else what went wrong (for `/healthz`)."""
        try:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with self.session.get(self.base_url + "/models", timeout=timeout) as response:
                return None if response.status == 200 else f"OpenAI-compatible server /models: {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"OpenAI-compatible server not reachable ({type(exc).__name__})"

    # -- requests --------------------------------------------------------------------------------
    async def chat(self, body: bytes) -> dict[str, Any]:
        """`POST /chat/completions` (not streamed): the response object."""
        return await self.post_json("/chat/completions", body)

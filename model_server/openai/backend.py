"""`OpenAIExecutor`: the `backend.GenerationBackend` contract, with generation done by an OpenAI-compatible server
(vLLM, SGLang, TGI's Messages API, llama.cpp's server, Ollama).

Queueing, deadlines, cancelling and the figures are `remote.backend.RemoteExecutor`'s, as on TGI; this module says
what a request does here (see `render` for the body, `client` for the wire):

- generate: `POST /chat/completions` with `stream: true` (and `stream_options.include_usage` for the token
  counts), read by `stream.read_answer`.
- beam: no field every server reads; it runs greedy (logged once).
- rank: `ranking.Ranker`, prompt log-probabilities where the server offers them, else the model's answer.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from model_server.backend import GenerationBackend
from model_server.config import OpenAIConfig
from model_server.errors import ModelLoadError
from model_server.openai import ranking
from model_server.openai.client import OpenAIClient
from model_server.openai.render import build_body, sampling_fields
from model_server.openai.stream import read_answer
from model_server.prompt import estimate_tokens
from model_server.remote.backend import RemoteExecutor, RemoteJob, StreamProgress, text_only
from model_server.remote.http import RetryPolicy, closing_stream
from model_server.types import Prompt, RankedCategory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenAIServerInfo:
    """What `GET /models` says that matters here."""

    model_id: str
    """The model every request names (`OPENAI_MODEL`, else the first one listed)."""
    max_model_len: int | None = None
    """The model's context length where the server says it (vLLM's `max_model_len`)."""
    served: tuple[str, ...] = ()

    @classmethod
    def from_models(cls, models: list[dict[str, Any]], wanted: str) -> OpenAIServerInfo:
        served = tuple(str(m.get("id")) for m in models if m.get("id"))
        if not wanted and not served:
            raise ModelLoadError("the OpenAI-compatible server lists no model; set OPENAI_MODEL",
                                 detail="GET /models listed no model")
        model_id = wanted or served[0]
        card = next((m for m in models if m.get("id") == model_id), {})
        length = card.get("max_model_len")
        return cls(model_id, length if isinstance(length, int) and length > 0 else None, served)

    def max_positions(self, default: int = 2048) -> int:
        """Prompt plus answer: the renderer keeps a prompt to this minus the channel's `max_new_tokens`."""
        return self.max_model_len or default


class OpenAIExecutor(RemoteExecutor):
    """Generation on an OpenAI-compatible server. Use as `async with OpenAIExecutor(config) as ex:`;
    `ex.server` is what `GET /models` said."""

    server_name = "the OpenAI-compatible server"

    def __init__(self, config: OpenAIConfig, *, client: OpenAIClient | None = None) -> None:
        super().__init__(config)
        self.openai_config = config
        self.client = client or OpenAIClient(
            config.url, api_key=config.api_key, connect_timeout_s=config.connect_timeout_s, stall_s=config.stall_s,
            retry=RetryPolicy(max_retries=config.max_retries, backoff_s=config.backoff_s),
            max_connections=config.max_batch_size + 2,
        )
        self.server: OpenAIServerInfo | None = None
        self.ranker = ranking.Ranker(self.client)

    @property
    def model_id(self) -> str:
        return self.server.model_id if self.server else self.openai_config.model

    async def start(self) -> OpenAIServerInfo:
        """`GET /models` (raises `ModelLoadError` with a clear message when the server is not there)."""
        models = await self.client.check_ready(self.config.start_wait_s)
        self.server = OpenAIServerInfo.from_models(models, self.openai_config.model)
        if self.server.served and self.server.model_id not in self.server.served:
            log.warning("OPENAI_MODEL %s is not among the models the server lists (%d); requests name it anyway",
                        self.server.model_id, len(self.server.served))
        log.info("OpenAI-compatible server ready at %s: model %s, context %s", self.config.url,
                 self.server.model_id, self.server.max_model_len)
        return self.server

    async def _probe_health(self) -> str | None:
        return await self.client.health()

    async def _close_client(self) -> None:
        await self.client.close()

    async def _body(self, prompt: Prompt, fields: dict[str, Any], final: dict[str, Any] | None = None) -> bytes:
        built = await asyncio.to_thread(build_body, prompt.items, {"model": self.model_id, **fields}, final=final,
                                        max_bytes=self.config.max_body_bytes)
        if built.image_bytes:
            log.debug("request body %d bytes, %d messages, images %s bytes", len(built.body), len(built.messages),
                      list(built.image_bytes))
        return built.body

    async def _generate(self, job: RemoteJob, state: StreamProgress) -> None:
        params = job.prompt.params
        fields = {"stream": True, "stream_options": {"include_usage": True}, **sampling_fields(params)}
        body = await self._body(job.prompt, fields)
        async with closing_stream(self.client, "/chat/completions", body) as events:  # leaving it closes the stream
            text, reason = await read_answer(events, params.stop_strings, lambda delta: self._delta(job, delta), state)
        if not state.prompt_tokens:
            state.prompt_tokens = estimate_tokens(text_only(job.prompt))
        self._complete(job, text, reason, state.prompt_tokens, state.completion_tokens, state.first_token_at)

    async def _rank(self, job: RemoteJob) -> list[RankedCategory]:
        return await self.ranker.rank(job.categories, lambda fields, final: self._body(job.prompt, fields, final))


if TYPE_CHECKING:
    def _keeps_the_contract(backend: OpenAIExecutor) -> GenerationBackend:
        return backend  # mypy checks that `OpenAIExecutor` is a `GenerationBackend`

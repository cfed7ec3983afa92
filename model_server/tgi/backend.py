"""`TgiExecutor`: the `backend.GenerationBackend` contract, with generation done by a text-generation-inference server.

Queueing, deadlines, cancelling and the figures are `remote.backend.RemoteExecutor`'s; this module says what a
request does on TGI (see `render` for the body, `client` for the wire):

- generate: `POST /generate_stream`, read by `stream.read_answer` (deltas, finish reasons).
- beam: TGI has no beam search; it runs greedy (logged once).
- rank: one `POST /generate` per category, after two for the prompt alone (`ranking.Ranker`: TGI's IDEFICS
  shard shifts prompt log-probabilities in a padded batch, so every answer is aligned first).
- prompt tokens: TGI's `input_length` counts an image as one token; the shard builds three
  (`render.shard_token_surplus`), and that is what is reported.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from model_server.backend import GenerationBackend
from model_server.config import TgiConfig
from model_server.prompt import estimate_tokens
from model_server.remote.backend import ERROR_KINDS, RemoteExecutor, RemoteJob, StreamProgress, text_only
from model_server.remote.http import RetryPolicy, closing_stream
from model_server.tgi import ranking
from model_server.tgi.client import TgiClient
from model_server.tgi.counting import RemoteTokenCounter
from model_server.tgi.info import TgiServerInfo
from model_server.tgi.render import build_body, shard_token_surplus, tgi_parameters
from model_server.tgi.stream import read_answer
from model_server.types import Prompt, RankedCategory

log = logging.getLogger(__name__)

__all__ = ["ERROR_KINDS", "TgiExecutor", "TgiJob"]

TgiJob = RemoteJob
"""A request on TGI (the shared remote request)."""


class TgiExecutor(RemoteExecutor):
    """Generation on a TGI server. Use as `async with TgiExecutor(config) as ex:`; `ex.server` is `/info`."""

    server_name = "text-generation-inference"

    def __init__(self, config: TgiConfig, *, client: TgiClient | None = None) -> None:
        super().__init__(config)
        self.client = client or TgiClient(
            config.url, connect_timeout_s=config.connect_timeout_s, stall_s=config.stall_s,
            retry=RetryPolicy(max_retries=config.max_retries, backoff_s=config.backoff_s),
            max_connections=config.max_batch_size + 2,
        )
        self.server: TgiServerInfo | None = None
        self.ranker = ranking.Ranker(self.client)

    async def start(self) -> TgiServerInfo:
        """Check `/health` and `/info` (raises `ModelLoadError` with a clear message when TGI is not there)."""
        info = await self.client.check_ready(self.config.start_wait_s)
        self.server = TgiServerInfo.from_info(info)
        log.info("text-generation-inference ready at %s: model %s, version %s, max input %s, max total %s",
                 self.config.url, self.server.model_id, self.server.version, self.server.max_input_tokens,
                 self.server.max_total_tokens)
        return self.server

    async def _probe_health(self) -> str | None:
        return await self.client.health()

    async def _close_client(self) -> None:
        await self.client.close()

    def token_counter(self) -> Callable[[str], int]:
        """Exact counts for the prompt renderer from TGI's `/tokenize`; call it from a worker thread."""
        return RemoteTokenCounter(self.client, asyncio.get_running_loop())

    async def _body(self, prompt: Prompt, parameters: dict[str, Any], suffix: str = "") -> bytes:
        built = await asyncio.to_thread(build_body, prompt.items, parameters, suffix=suffix,
                                        max_bytes=self.config.max_body_bytes)
        if built.image_bytes:
            log.debug("request body %d bytes, images %s bytes", len(built.body), list(built.image_bytes))
        return built.body

    async def _generate(self, job: RemoteJob, state: StreamProgress) -> None:
        params = job.prompt.params
        server = self.server or TgiServerInfo("unknown", None, None)
        body = await self._body(job.prompt, tgi_parameters(params, max_stop_sequences=server.max_stop_sequences))
        async with closing_stream(self.client, "/generate_stream", body) as events:  # leaving it closes the stream
            text, reason = await read_answer(events, params.stop_strings, lambda delta: self._delta(job, delta), state)
        if state.prompt_tokens:  # the router's count: make it what the shard builds
            state.prompt_tokens += shard_token_surplus(job.prompt.items)
        else:
            state.prompt_tokens = estimate_tokens(text_only(job.prompt))
        self._complete(job, text, reason, state.prompt_tokens, state.completion_tokens, state.first_token_at)

    async def _rank(self, job: RemoteJob) -> list[RankedCategory]:
        return await self.ranker.rank(job.categories, lambda suffix: self._body(job.prompt, ranking.PARAMETERS, suffix))


if TYPE_CHECKING:
    def _keeps_the_contract(backend: TgiExecutor) -> GenerationBackend:
        return backend  # mypy checks that `TgiExecutor` is a `GenerationBackend`

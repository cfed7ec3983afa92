"""Exact token counts from the TGI server's own tokenizer (`POST /tokenize`), for the prompt budget.

`estimate_tokens` is a proven upper bound but about four times the real count for prose, so with it the
history kept shrinks needlessly. The prompt renderer counts synchronously, so the counter is called from a
worker thread (the conversation renders there when `ModelInfo.count_blocks` says so) and waits on the event
loop that owns the HTTP session. What it counts is what TGI tokenizes (`render.tokenized_text`): the image
tokens are in the text, so the count is the shard's, three tokens an image. Called on the event loop itself,
or when TGI cannot count (a model without a fast tokenizer answers 404), it falls back to the estimate.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from concurrent.futures import TimeoutError as FutureTimeout

from model_server.errors import ModelServerError
from model_server.prompt import BOS, estimate_tokens
from model_server.tgi.client import TgiClient
from model_server.tgi.render import tokenized_text

log = logging.getLogger(__name__)

CACHED_COUNTS = 512


class RemoteTokenCounter:
    """`count(text)` for `prompt_text(...)`: TGI's count, cached; the estimate where TGI cannot answer."""

    def __init__(self, client: TgiClient, loop: asyncio.AbstractEventLoop, timeout_s: float = 10.0) -> None:
        self.client = client
        self.loop = loop
        self.timeout_s = timeout_s
        self.available = True
        """False once TGI could not count: from then on the estimate is used."""
        self._cache: OrderedDict[str, int] = OrderedDict()

    def __call__(self, text: str) -> int:
        if not self.available or self._on_loop():
            return estimate_tokens(text)
        key = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        query = tokenized_text(text.removeprefix(BOS))  # /tokenize adds the BOS itself
        future = asyncio.run_coroutine_threadsafe(self.client.tokenize(query, self.timeout_s), self.loop)
        try:
            count = future.result(self.timeout_s + 1.0)
        except (ModelServerError, FutureTimeout) as exc:
            future.cancel()
            self.available = False
            log.warning("text-generation-inference cannot count tokens (%s): estimating from now on",
                        getattr(exc, "detail", type(exc).__name__))
            return estimate_tokens(text)
        self._cache[key] = count
        while len(self._cache) > CACHED_COUNTS:
            self._cache.popitem(last=False)
        return count

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

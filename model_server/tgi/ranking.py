"""Rank classification on TGI: each category scored by the log-probabilities TGI reports for its tokens.

One `POST /generate` per category with `decoder_input_details`, summing the prompt log-probabilities TGI returns
for the category's tokens, from the first token where the text leaves the prompt's own tokens (the prompt alone
is asked once and cached: /classify often repeats a prompt). Normalised like the local executor's
(`backend.rank_by_scores`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from model_server.backend import continuation_score, rank_by_scores
from model_server.errors import GenerationFailed
from model_server.remote.http import FAILED_MESSAGE
from model_server.tgi.client import TgiClient
from model_server.types import RankedCategory

PARAMETERS: dict[str, Any] = {"max_new_tokens": 1, "details": True, "decoder_input_details": True,
                              "do_sample": False}
"""One token is the least TGI generates; only the prompt's own log-probabilities are used."""

CACHED_PROMPTS = 64


class Ranker:
    """Scores categories on one TGI server; keeps the token ids of the last `CACHED_PROMPTS` prompts."""

    def __init__(self, client: TgiClient) -> None:
        self.client = client
        self._prompt_ids: OrderedDict[str, list[int]] = OrderedDict()

    async def rank(self, categories: Sequence[str],
                   body: Callable[[str], Awaitable[bytes]]) -> list[RankedCategory]:
        """`body(suffix)` builds the request body for the prompt followed by `suffix` (with `PARAMETERS`)."""
        base_ids = await self._ids_of(await body(""))
        scores: list[float] = []
        # Categories go one at a time: the request holds one of the `max_batch_size` slots.
        for category in categories:
            prefill = await self._prefill(await body(" " + category))
            ids = [int(t.get("id", -1)) for t in prefill]
            scores.append(continuation_score(ids, [float(t.get("logprob") or 0.0) for t in prefill], base_ids))
        return rank_by_scores(categories, scores)

    async def _prefill(self, body: bytes) -> list[dict[str, Any]]:
        answer = await self.client.generate(body)
        prefill = (answer.get("details") or {}).get("prefill")
        if not isinstance(prefill, list) or not prefill:
            raise GenerationFailed(FAILED_MESSAGE, detail="TGI returned no prefill details (decoder_input_details)")
        return prefill

    async def _ids_of(self, body: bytes) -> list[int]:
        """Token ids of the prompt alone, as TGI tokenizes it (cached)."""
        key = hashlib.sha256(body).hexdigest()
        if key in self._prompt_ids:
            self._prompt_ids.move_to_end(key)
            return self._prompt_ids[key]
        ids = [int(t.get("id", -1)) for t in await self._prefill(body)]
        self._prompt_ids[key] = ids
        while len(self._prompt_ids) > CACHED_PROMPTS:
            self._prompt_ids.popitem(last=False)
        return ids

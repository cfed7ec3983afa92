"""Rank classification on an OpenAI-compatible server: prompt log-probabilities where the server offers them,
else the model's own answer.

Scored (vLLM, `prompt_logprobs`): for each category one chat request whose last message is an assistant message
holding the category, continued rather than closed (`continue_final_message: true`, `add_generation_prompt:
false`), with `prompt_logprobs: 0`, so the response's top-level `prompt_logprobs` lists each prompt token with its
log-probability (`None` for the first token; a `{token_id: {"logprob", "rank", "decoded_token"}}` object for the
others; with 0 extra log-probabilities, the prompt token alone). The same request with an empty assistant message
gives the prompt's own tokens; each category is scored from the first token where it leaves them
(`backend.continuation_score`), and normalised like every backend's (`backend.rank_by_scores`). vLLM refuses
`prompt_logprobs` on a streamed request, so these are not streamed.

Fallback (OpenAI itself, llama.cpp, TGI's Messages API, SGLang: no `prompt_logprobs`): the prompt is answered
greedily and the category the answer names first is the pick, with probability 1 and `by_generation` set, so the
front ends say that nothing was scored. The first request tells which case holds: a response without
`prompt_logprobs`, or a request refused as invalid, switches this server to the fallback for good (logged once).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from model_server.backend import continuation_score, rank_by_scores
from model_server.errors import GenerationFailed, RequestRejected
from model_server.openai.client import OpenAIClient
from model_server.remote.http import FAILED_MESSAGE
from model_server.types import RankedCategory

log = logging.getLogger(__name__)

SCORING_FIELDS: dict[str, Any] = {
    "stream": False, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0,
    "add_generation_prompt": False, "continue_final_message": True,
}
"""One token is the least a server generates; only the prompt's own log-probabilities are used."""
ANSWER_FIELDS: dict[str, Any] = {"stream": False, "max_tokens": 32, "temperature": 0.0}
"""The fallback's answer: greedy, long enough to name any category."""

BodyBuilder = Callable[[dict[str, Any], dict[str, Any] | None], Awaitable[bytes]]
"""`body(fields, final)`: the request body for the prompt, with `fields`, then the message `final` if any."""


def prompt_tokens(response: dict[str, Any]) -> tuple[list[int], list[float]]:
    """Token ids and log-probabilities of the prompt from a response's `prompt_logprobs` (the first token's
    log-probability counts as 0). Raises `LookupError` when the response has none."""
    entries = response.get("prompt_logprobs")
    if not isinstance(entries, list) or not entries:
        raise LookupError("no prompt_logprobs in the response")
    ids: list[int] = []
    logprobs: list[float] = []
    for entry in entries:
        if entry is None:
            ids.append(-1)
            logprobs.append(0.0)
            continue
        if not isinstance(entry, dict) or len(entry) != 1:
            raise GenerationFailed(FAILED_MESSAGE, detail="prompt_logprobs entry is not one token (asked for 0 extra)")
        ((token, info),) = entry.items()
        ids.append(int(token))
        logprobs.append(float(info.get("logprob", 0.0) if isinstance(info, dict) else info))
    return ids, logprobs


def named_first(answer: str, categories: Sequence[str]) -> int:
    """Index of the category the answer names first (whole words, any case); else the one sharing most words
    with it; else the first category."""
    text = answer.casefold()
    found = []
    for index, category in enumerate(categories):
        match = re.search(r"(?<!\w)" + re.escape(category.casefold()) + r"(?!\w)", text)
        if match:
            found.append((match.start(), -len(category), index))
    if found:
        return min(found)[2]
    words = set(re.findall(r"\w+", text))
    overlap = [len(words & set(re.findall(r"\w+", c.casefold()))) for c in categories]
    return max(range(len(categories)), key=lambda i: (overlap[i], -i))


class Ranker:
    """Scores categories on one server, remembering whether it offers prompt log-probabilities."""

    def __init__(self, client: OpenAIClient) -> None:
        self.client = client
        self.prompt_logprobs: bool | None = None
        """None until the first rank request tells."""

    async def rank(self, categories: Sequence[str], body: BodyBuilder) -> list[RankedCategory]:
        if self.prompt_logprobs is not False:
            try:
                return await self._scored(categories, body)
            except (LookupError, RequestRejected) as exc:
                if self.prompt_logprobs:
                    raise GenerationFailed(FAILED_MESSAGE, detail=f"prompt_logprobs stopped working: {exc}") from exc
                self.prompt_logprobs = False
                log.info("the server gives no prompt log-probabilities (%s): ranking falls back to generation",
                         exc.detail if isinstance(exc, RequestRejected) else exc)
        return await self._generated(categories, body)

    async def _scored(self, categories: Sequence[str], body: BodyBuilder) -> list[RankedCategory]:
        async def tokens(content: str) -> tuple[list[int], list[float]]:
            answer = await self.client.chat(await body(SCORING_FIELDS, {"role": "assistant", "content": content}))
            return prompt_tokens(answer)

        base_ids, _ = await tokens("")
        self.prompt_logprobs = True
        scores = []
        # Categories go one at a time: the request holds one of the `max_batch_size` slots.
        for category in categories:
            ids, logprobs = await tokens(category)
            scores.append(continuation_score(ids, logprobs, base_ids))
        return rank_by_scores(categories, scores)

    async def _generated(self, categories: Sequence[str], body: BodyBuilder) -> list[RankedCategory]:
        answer = await self.client.chat(await body(ANSWER_FIELDS, None))
        choices = answer.get("choices") or [{}]
        text = str(((choices[0] or {}).get("message") or {}).get("content") or "")
        pick = named_first(text, categories)
        ranked = [RankedCategory(c, 1.0 if i == pick else 0.0, 0.0 if i == pick else -math.inf, by_generation=True)
                  for i, c in enumerate(categories)]
        return sorted(ranked, key=lambda r: r.probability, reverse=True)

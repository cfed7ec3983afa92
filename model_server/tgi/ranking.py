"""Rank classification on TGI: each category scored by the log-probabilities TGI reports for its tokens.

One `POST /generate` per category with `decoder_input_details`, summing the prompt log-probabilities TGI returns
for the category's tokens, from the first token where the text leaves the prompt's own tokens. Normalised like the
local executor's (`backend.rank_by_scores`).

TGI's IDEFICS shard misreports these values in a padded prefill batch: a request prefilled together with a
longer one gets every prompt token paired with the log-probability of the token *before* it, and loses the last
token's (`idefics_causal_lm.py`: `[nan] + logprobs[-new_input_length:-1]`, a slice one longer than the ids when
the row is padded on the left). Nothing in the response says which case it was, and which requests share a
prefill depends on everything else the server runs. So each answer is aligned before it is summed:

- The prompt's true values are found once per prompt (cached) by an anchor: the prompt alone, generating one
  token `g` greedily (a generated token's log-probability is right in every case: it comes from the last
  position), then the prompt followed by `g`'s text. That answer's value at `g`'s position is `g`'s own
  log-probability when it is aligned, the previous token's when shifted. Comparing the two answers' prompt
  values with each other (one may be shifted against the other) settles most cases without the anchor.
- Each category is asked as prompt + " " + category + "\\n": the newline (a token of its own in LLaMA's
  vocabulary) takes the loss of the last value in a shifted answer, so every category token keeps its value.
  The answer's prompt values are compared with the prompt's true ones at offset 0 and 1 (dozens of tokens,
  images included): the closer offset is the answer's alignment.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from model_server.backend import continuation_start, rank_by_scores
from model_server.errors import GenerationFailed
from model_server.remote.http import FAILED_MESSAGE
from model_server.tgi.client import TgiClient
from model_server.types import RankedCategory

log = logging.getLogger(__name__)

PARAMETERS: dict[str, Any] = {"max_new_tokens": 1, "details": True, "decoder_input_details": True,
                              "do_sample": False}
"""One token is the least TGI generates; the anchor uses it, the categories only the prompt's values."""
END = "\n"
"""Written after each category: a token that may lose its value in a shifted answer instead of the category's."""
ANCHOR_TOLERANCE = 0.05
"""How far (in nats) a reported value may be from the generated token's and still be its (bfloat16 rounding)."""
CACHED_PROMPTS = 64


@dataclass(frozen=True)
class _Prompt:
    """The prompt alone as TGI tokenizes it, with each token's true log-probability (None for the BOS)."""

    ids: list[int]
    values: list[float | None]


@dataclass(frozen=True)
class _Answer:
    ids: list[int]
    texts: list[str]
    values: list[float | None]
    generated: dict[str, Any]


def _mismatch(a: Sequence[float | None], b: Sequence[float | None]) -> float:
    """Mean absolute difference of the pairs where both have a value (inf when none do)."""
    pairs = [(x, y) for x, y in zip(a, b, strict=False) if x is not None and y is not None]
    return sum(abs(x - y) for x, y in pairs) / len(pairs) if pairs else float("inf")


def shifted_against(answer: Sequence[float | None], truth: Sequence[float | None], end: int) -> bool:
    """Whether `answer`'s values over positions [2, end) are `truth`'s moved one position later."""
    aligned = _mismatch(answer[2:end], truth[2:end])
    shifted = _mismatch(answer[3:end + 1], truth[2:end])
    return shifted < aligned


class Ranker:
    """Scores categories on one TGI server; keeps the anchored values of the last `CACHED_PROMPTS` prompts."""

    def __init__(self, client: TgiClient) -> None:
        self.client = client
        self._prompts: OrderedDict[str, _Prompt] = OrderedDict()
        self.shifted_answers = 0
        """Answers found shifted (prefilled in a padded batch) and read one position later."""

    async def rank(self, categories: Sequence[str],
                   body: Callable[[str], Awaitable[bytes]]) -> list[RankedCategory]:
        """`body(suffix)` builds the request body for the prompt followed by `suffix` (with `PARAMETERS`)."""
        prompt = await self._prompt(body)
        scores: list[float] = []
        # Categories go one at a time: the request holds one of the `max_batch_size` slots.
        for category in categories:
            answer = await self._ask(await body(" " + category + END))
            ids = answer.ids
            # Scored from where the tokens leave the prompt's, as every backend does; the end token stays out.
            common = continuation_start(ids, prompt.ids, keep=2)
            stop = len(ids) - 1 if answer.texts[-1] == END else len(ids)
            shifted = shifted_against(answer.values, prompt.values, common - 1)
            if shifted:
                self.shifted_answers += 1
                if stop == len(ids):
                    raise GenerationFailed(FAILED_MESSAGE, detail="TGI ranking: a shifted answer lost the "
                                           "category's last token (no end token to take the loss)")
            values = answer.values[common + 1:stop + 1] if shifted else answer.values[common:stop]
            scores.append(sum(float(v or 0.0) for v in values))
        return rank_by_scores(categories, scores)

    async def _ask(self, body: bytes) -> _Answer:
        answer = await self.client.generate(body)
        details = answer.get("details") or {}
        prefill = details.get("prefill")
        if not isinstance(prefill, list) or len(prefill) < 2:
            raise GenerationFailed(FAILED_MESSAGE, detail="TGI returned no prefill details (decoder_input_details)")
        values = [None if t.get("logprob") is None else float(t["logprob"]) for t in prefill]
        generated = (details.get("tokens") or [{}])[0]
        return _Answer([int(t.get("id", -1)) for t in prefill], [str(t.get("text", "")) for t in prefill],
                       values, generated)

    async def _prompt(self, body: Callable[[str], Awaitable[bytes]]) -> _Prompt:
        """The prompt's ids and true values (cached)."""
        base = await body("")
        key = hashlib.sha256(base).hexdigest()
        if key in self._prompts:
            self._prompts.move_to_end(key)
            return self._prompts[key]
        alone = await self._ask(base)
        g_id, g_text, g_value = (alone.generated.get("id"), alone.generated.get("text"),
                                 alone.generated.get("logprob"))
        if not isinstance(g_id, int) or not isinstance(g_text, str) or not isinstance(g_value, (int, float)):
            raise GenerationFailed(FAILED_MESSAGE, detail="TGI returned no generated token details")
        m = len(alone.ids)
        anchored = await self._ask(await body(g_text))
        if anchored.ids[:m] != alone.ids or anchored.ids[m:] != [g_id]:
            raise GenerationFailed(FAILED_MESSAGE, detail="TGI ranking: the generated token did not tokenize "
                                   "back onto the prompt; cannot align log-probabilities")
        shifted = self._anchor_shifted(alone.values, anchored.values, m, float(g_value))
        values = [None, *anchored.values[2:m + 1]] if shifted else anchored.values[:m]
        found = _Prompt(alone.ids, values)
        self._prompts[key] = found
        while len(self._prompts) > CACHED_PROMPTS:
            self._prompts.popitem(last=False)
        return found

    @staticmethod
    def _anchor_shifted(alone: list[float | None], anchored: list[float | None], m: int, g_value: float) -> bool:
        """Whether the anchored answer (prompt + g, m + 1 tokens) is shifted."""
        same = _mismatch(anchored[2:m], alone[2:m])
        anchored_later = _mismatch(anchored[3:m], alone[2:m - 1])
        alone_later = _mismatch(anchored[2:m - 1], alone[3:m])
        if anchored_later < min(same, alone_later):
            return True
        if alone_later < min(same, anchored_later):
            return False
        # Both answers alike: the anchor decides. Aligned, the last value is g's own; shifted, the prompt's last.
        last = anchored[m]
        return last is None or abs(last - g_value) > ANCHOR_TOLERANCE + 0.01 * abs(g_value)

"""What a text-generation-inference server says about itself (`GET /info`), as far as it matters here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model_server.tgi.render import DEFAULT_MAX_STOP_SEQUENCES


@dataclass(frozen=True)
class TgiServerInfo:
    """What `GET /info` says that matters here."""

    model_id: str
    max_input_tokens: int | None
    max_total_tokens: int | None
    max_stop_sequences: int = DEFAULT_MAX_STOP_SEQUENCES
    version: str | None = None

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> TgiServerInfo:
        def number(*keys: str) -> int | None:
            for key in keys:
                value = info.get(key)
                if isinstance(value, int) and value > 0:
                    return value
            return None

        return cls(
            model_id=str(info.get("model_id") or "unknown"),
            max_input_tokens=number("max_input_tokens", "max_input_length"),
            max_total_tokens=number("max_total_tokens"),
            max_stop_sequences=number("max_stop_sequences") or DEFAULT_MAX_STOP_SEQUENCES,
            version=info.get("version") if isinstance(info.get("version"), str) else None,
        )

    def max_positions(self) -> int:
        """Prompt plus answer: TGI refuses more than `max_total_tokens`; IDEFICS saw 2048 positions at most."""
        return min(2048, self.max_total_tokens or 2048)

    def prompt_budget(self, max_new_tokens: int) -> int:
        """The most prompt tokens (as the shard builds them) for an answer of `max_new_tokens`.

        TGI refuses a prompt over `max_input_tokens` whatever the answer's length, and prompt plus
        `max_new_tokens` over `max_total_tokens`; its shard also cuts the start of a prompt over
        `max_input_tokens` (its truncation), so the shard's count, three tokens an image, is the one to keep
        under it.
        """
        budget = self.max_positions() - max_new_tokens
        if self.max_input_tokens:
            budget = min(budget, self.max_input_tokens)
        return budget

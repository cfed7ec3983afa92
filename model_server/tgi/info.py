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

    def max_positions(self, max_new_tokens: int) -> int:
        """Positions to tell the prompt renderer, which keeps prompts to this minus `max_new_tokens`.

        TGI refuses prompts over `max_input_tokens` and prompt plus answer over `max_total_tokens`.
        """
        limits = [2048]
        if self.max_total_tokens:
            limits.append(self.max_total_tokens)
        if self.max_input_tokens:
            limits.append(self.max_input_tokens + max_new_tokens)
        return min(limits)

"""The rules for a channel's own settings: which names exist and which values each accepts.

Values come from slash-command options, so they are untrusted: everything is checked here, once, before
it reaches the database. None always means "back to the default".
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from storage.errors import InvalidSetting
from storage.records import ChannelSettings

SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ChannelSettings))

_CHOICES: dict[str, frozenset[str]] = {
    "answer_mode": frozenset({"mention", "always"}),
    "record_mode": frozenset({"all", "addressed"}),
    "decoding": frozenset({"greedy", "sample", "beam"}),
}
MAX_NEW_TOKENS_RANGE = (1, 1024)
TEMPERATURE_RANGE = (0.01, 2.0)
MAX_SYSTEM_PROMPT_CHARS = 4000


def validate_setting(name: str, value: Any) -> Any:
    """Return `value` normalised for storage, or raise `InvalidSetting`."""
    if name not in SETTING_NAMES:
        raise InvalidSetting(f"There is no setting {name!r}.", detail=f"unknown channel setting {name!r}")
    if value is None:
        return None
    if name in _CHOICES:
        choices = _CHOICES[name]
        if not isinstance(value, str) or value not in choices:
            allowed = ", ".join(sorted(choices))
            raise InvalidSetting(f"{name} must be one of: {allowed}.",
                                 detail=f"{name}: value outside {sorted(choices)}")
        return value
    if name == "max_new_tokens":
        low, high = MAX_NEW_TOKENS_RANGE
        # bool is an int subclass; True is not a token count.
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise InvalidSetting(
                f"max_new_tokens must be a whole number from {low} to {high}.",
                detail=f"max_new_tokens: {value!r} outside [{low}, {high}]",
            )
        return value
    if name == "temperature":
        coldest, hottest = TEMPERATURE_RANGE
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or not coldest <= value <= hottest
        ):
            raise InvalidSetting(
                f"temperature must be a number from {coldest} to {hottest}.",
                detail=f"temperature: {value!r} outside [{coldest}, {hottest}]",
            )
        return float(value)
    # system_prompt: free text, bounded so that it cannot crowd the model's 2048-token context out.
    if not isinstance(value, str):
        raise InvalidSetting("The system prompt must be text.", detail="system_prompt: not a string")
    value = value.strip()
    if len(value) > MAX_SYSTEM_PROMPT_CHARS:
        raise InvalidSetting(
            f"The system prompt may be at most {MAX_SYSTEM_PROMPT_CHARS} characters.",
            detail=f"system_prompt: {len(value)} chars over {MAX_SYSTEM_PROMPT_CHARS}",
        )
    return value or None  # an empty prompt is the same as no prompt: use the default

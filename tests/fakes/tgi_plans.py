"""What the fake TGI is told to answer (`Plan`, a script of tokens) and what it records (`Received`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

EOS = ("</s>", True)
EOU = ("<end_of_utterance>", True)

Token = tuple[str, bool]
"""(text, special)."""


def words(text: str) -> list[Token]:
    """`text` as the fake's tokens: each word with the spaces before it, each newline alone."""
    return [(t, False) for t in re.findall(r"\n|[^\S\n]*[^\s]+", text)]


DEFAULT_ANSWER: list[Token] = [*words(" This picture shows some noise."), EOU, *words("\nUser: more")]


@dataclass
class Plan:
    """How the fake answers one request (they are used in order; then `default_plan`)."""

    status: int = 200
    """Not 200: answer this status with TGI's error body right away."""
    error: str = "error"
    error_type: str = ""
    retry_after: str | None = None
    tokens: list[Token] = field(default_factory=lambda: list(DEFAULT_ANSWER))
    stall_after: int | None = None
    """Stream this many tokens, then go silent (sending only `:` keep-alive comments)."""
    cut_after: int | None = None
    """Stream this many tokens, then drop the connection."""
    error_event_after: int | None = None
    """Stream this many tokens, then an `{"error": ...}` event (TGI streams even a validation or overload
    error this way, with status 200, when it is found after the stream began)."""
    error_event_type: str = "generation"
    error_event_text: str = "Request failed during generation: Server error: CUDA out of memory"
    chunk_bytes: int | None = None
    """Write the stream in pieces of this many bytes, cutting lines, JSON and UTF-8 characters anywhere."""
    token_delay_s: float = 0.0
    keepalives: bool = False
    """Write a `:` comment line between events."""


@dataclass
class Received:
    """One request the fake answered."""

    path: str
    at: float
    size: int
    inputs: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    images: list[Image.Image] = field(default_factory=list)
    chunks: list[str | Image.Image] = field(default_factory=list)
    """The router's chunks: text between images, verbatim, and the images."""
    input_length: int = 0
    """The router's token count (BOS, and `<image>` for each image)."""
    shard_ids: list[int] = field(default_factory=list)
    """The token ids the shard built for the prompt."""
    stream_closed_early: bool = False
    """The client closed the stream before its last event (cancellation)."""

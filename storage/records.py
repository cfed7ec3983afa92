"""The values that cross storage's boundary: what callers hand in, what they get back.

No ORM object ever leaves `storage/`: callers see these frozen dataclasses only, so nothing they hold can
trigger a lazy load or outlive its session.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

Role = Literal["user", "assistant"]
RequestState = Literal["pending", "answered", "failed"]
AnswerMode = Literal["mention", "always"]
RecordMode = Literal["all", "addressed"]
Decoding = Literal["greedy", "sample", "beam"]

ROLES: frozenset[str] = frozenset({"user", "assistant"})
REQUEST_STATES: frozenset[str] = frozenset({"pending", "answered", "failed"})


@dataclass(frozen=True)
class ImageBlob:
    """An image as the caller already checked and re-encoded it; storage keeps its bytes verbatim."""

    data: bytes
    mime: str
    """Content type of `data`, e.g. "image/png"."""
    width: int
    height: int

    def __repr__(self) -> str:  # bytes in a repr would flood logs
        return f"ImageBlob(mime={self.mime!r}, {self.width}x{self.height}, {len(self.data)} bytes)"


@dataclass(frozen=True)
class NewMessage:
    """One message to append to a channel's history."""

    platform_id: str
    """The platform's message id, unique across all channels: a repeated event stores nothing twice."""
    channel_key: str
    """The platform's channel id as text, or "console" for the terminal."""
    role: Role
    author_id: str
    author_name: str
    text: str
    reply_to: str | None = None
    """Platform id of the message this one answers (assistant turns) or replies to."""
    request_state: RequestState | None = None
    """None: not a request to the bot. "pending" until answered, so a crash leaves a trace to recover."""
    created_at: datetime | None = None
    """Timezone-aware; None means now (UTC)."""
    images: tuple[ImageBlob, ...] = ()
    """In the order they were attached."""

    def __repr__(self) -> str:  # never the text: reprs end up in logs
        return (
            f"NewMessage(platform_id={self.platform_id!r}, channel_key={self.channel_key!r}, "
            f"role={self.role!r}, text_len={len(self.text)}, images={len(self.images)})"
        )


@dataclass(frozen=True)
class StoredImage:
    sha256: str
    """Hex digest of `data`, computed by storage."""
    mime: str
    width: int
    height: int
    data: bytes

    def __repr__(self) -> str:
        return f"StoredImage(sha256={self.sha256[:12]}…, {self.width}x{self.height}, {len(self.data)} bytes)"


@dataclass(frozen=True)
class StoredMessage:
    id: int
    """Database id: increases with every append, so it orders a channel's history."""
    platform_id: str
    channel_key: str
    role: Role
    author_id: str
    author_name: str
    text: str
    created_at: datetime
    """Timezone-aware, UTC."""
    reply_to: str | None
    request_state: RequestState | None
    images: tuple[StoredImage, ...]
    partial_reply_id: str | None = None
    """A request's: the message showing its answer while it is delivered (`Store.set_partial_reply`). Read by
    `get_message` and the pending-request reads; None in windows, which do not need it."""

    def __repr__(self) -> str:
        return (
            f"StoredMessage(id={self.id}, platform_id={self.platform_id!r}, "
            f"channel_key={self.channel_key!r}, role={self.role!r}, "
            f"text_len={len(self.text)}, images={len(self.images)})"
        )


@dataclass(frozen=True)
class ChannelSettings:
    """A channel's own settings; each None means "use the bot's default"."""

    answer_mode: AnswerMode | None = None
    """"mention": answer only when addressed; "always": answer every message."""
    record_mode: RecordMode | None = None
    """"all": keep every message as context; "addressed": only messages to and from the bot."""
    system_prompt: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    decoding: Decoding | None = None

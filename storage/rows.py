"""Rows to records and back: what the store checks in a new message and how it turns rows into plain records.

Pure functions, no I/O: `check_message` and `storable` before a write, `stored_from_new` for the record of a
message just written, `stored`/`window`/`settings_of` for rows read. Records are `storage.records` types, never
ORM objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from storage.errors import ImageTooLarge, InvalidMessage
from storage.models import Channel, Message
from storage.records import (
    REQUEST_STATES,
    ROLES,
    ChannelSettings,
    NewMessage,
    RequestState,
    Role,
    StoredImage,
    StoredMessage,
)


def check_message(msg: NewMessage, max_image_bytes: int) -> None:
    """Raise `InvalidMessage` or `ImageTooLarge` for a message the store must not write."""
    if msg.role not in ROLES:
        raise InvalidMessage(detail=f"platform_id={msg.platform_id}: unknown role {msg.role!r}")
    if msg.request_state is not None and msg.request_state not in REQUEST_STATES:
        raise InvalidMessage(
            detail=f"platform_id={msg.platform_id}: unknown request state {msg.request_state!r}"
        )
    if msg.created_at is not None and msg.created_at.tzinfo is None:
        raise InvalidMessage(detail=f"platform_id={msg.platform_id}: created_at has no time zone")
    for blob in msg.images:
        if len(blob.data) > max_image_bytes:
            raise ImageTooLarge(len(blob.data), max_image_bytes)


def storable(msg: NewMessage) -> NewMessage:
    """`msg` without NUL characters, which PostgreSQL's text cannot hold (a model's output may carry one); the
    same on SQLite, so every database stores the same text."""
    return dataclasses.replace(msg, text=msg.text.replace("\x00", "")) if "\x00" in msg.text else msg


def rowcount(result: Any) -> int:
    # DML results are CursorResults; the ORM types them as plain Result, which has no rowcount.
    return int(result.rowcount)


def stored_from_new(msg: NewMessage, message_id: int, created_at: datetime, hashes: Sequence[str]) -> StoredMessage:
    """The record of `msg` as just written with id `message_id` (its images named by `hashes`, in order)."""
    return StoredMessage(
        id=message_id,
        platform_id=msg.platform_id,
        channel_key=msg.channel_key,
        role=msg.role,
        author_id=msg.author_id,
        author_name=msg.author_name,
        text=msg.text,
        created_at=created_at.astimezone(UTC),
        reply_to=msg.reply_to,
        request_state=msg.request_state,
        images=tuple(
            StoredImage(sha256=sha, mime=blob.mime, width=blob.width, height=blob.height, data=blob.data)
            for sha, blob in zip(hashes, msg.images, strict=True)
        ),
    )


def stored(row: Message, channel_key: str) -> StoredMessage:
    """An ORM message (its image links loaded) -> its record."""
    return StoredMessage(
        id=row.id,
        platform_id=row.platform_id,
        channel_key=channel_key,
        role=cast(Role, row.role),
        author_id=row.author_id,
        author_name=row.author_name,
        text=row.text,
        created_at=row.created_at,
        reply_to=row.reply_to,
        request_state=cast("RequestState | None", row.request_state),
        partial_reply_id=row.partial_reply_id,
        images=tuple(
            StoredImage(
                sha256=link.image.sha256,
                mime=link.image.mime,
                width=link.image.width,
                height=link.image.height,
                data=link.image.data,
            )
            for link in row.image_links
        ),
    )


def window(rows: Sequence[Any], channel_key: str) -> list[StoredMessage]:
    """Rows of `window_with_images_statement` (any order; one per image) -> messages, oldest first.

    Rows are unpacked by position, in the statement's column order: this runs for every message, and reading
    columns by name costs several times more.
    """
    fields: dict[int, tuple[Any, ...]] = {}
    images: dict[int, list[tuple[int, StoredImage]]] = {}
    for row in rows:
        message_id = row[0]
        position, sha256, mime, width, height, data = row[9:]
        fields[message_id] = row[:9]
        if position is not None:
            images.setdefault(message_id, []).append(
                (position, StoredImage(sha256=sha256, mime=mime, width=width, height=height, data=data))
            )
    messages = []
    for message_id in sorted(fields):
        _, platform_id, role, author_id, author_name, text, created_at, reply_to, request_state = fields[message_id]
        linked = sorted(images.get(message_id, ()), key=lambda pair: pair[0])
        messages.append(StoredMessage(
            id=message_id,
            platform_id=platform_id,
            channel_key=channel_key,
            role=role,
            author_id=author_id,
            author_name=author_name,
            text=text,
            created_at=created_at,
            reply_to=reply_to,
            request_state=request_state,
            images=tuple(image for _, image in linked),
        ))
    return messages


def settings_of(channel: Channel) -> ChannelSettings:
    """A channel row -> its settings."""
    return ChannelSettings(
        answer_mode=cast(Any, channel.answer_mode),
        record_mode=cast(Any, channel.record_mode),
        system_prompt=channel.system_prompt,
        max_new_tokens=channel.max_new_tokens,
        temperature=channel.temperature,
        decoding=cast(Any, channel.decoding),
    )

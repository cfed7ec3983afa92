"""Reading messages on an open connection or session: a channel's window, one message, requests by condition.

Functions that run the statements of `storage.queries` and return plain records (`storage.rows`); none opens,
retries or commits anything (the `Store` method that calls one does).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from storage.models import Channel, Message
from storage.queries import late_answers_statement, window_with_images_statement, with_images
from storage.records import StoredMessage
from storage.rows import stored, window


async def read_window(connection: AsyncConnection, channel_key: str, limit: int, *,
                      before_id: int | None, through_id: int | None) -> list[StoredMessage]:
    """`Store.recent_window` on `connection` (`limit` > 0, at most one of `before_id` and `through_id`)."""
    params: dict[str, Any] = {"channel_key": channel_key, "limit": limit}
    if through_id is not None:
        before_id = through_id + 1
    if before_id is not None:
        params["before_id"] = before_id
    statement = window_with_images_statement(before=before_id is not None)
    rows = list((await connection.execute(statement, params)).all())
    if through_id is not None:
        # Requests are the user messages with a request state (column 8); column 1 is the platform id.
        request_ids = list(dict.fromkeys(row[1] for row in rows if row[8] is not None and row[0] != through_id))
        if request_ids:
            rows.extend((await connection.execute(late_answers_statement(), {
                "channel_key": channel_key, "after_id": through_id, "request_ids": request_ids,
            })).all())
    return window(rows, channel_key)


async def read_message(session: AsyncSession, platform_id: str) -> StoredMessage | None:
    """The message with this platform id, with its images, or None."""
    row = (
        await session.execute(
            with_images(
                select(Message, Channel.key)
                .join(Channel, Channel.id == Message.channel_id)
                .where(Message.platform_id == platform_id)
            )
        )
    ).one_or_none()
    return None if row is None else stored(row[0], row[1])


async def read_matching(session: AsyncSession, conditions: list[Any]) -> list[StoredMessage]:
    """The messages meeting every one of `conditions`, with their images, oldest first."""
    rows = (
        await session.execute(
            with_images(
                select(Message, Channel.key)
                .join(Channel, Channel.id == Message.channel_id)
                .where(*conditions)
                .order_by(Message.id)
            )
        )
    ).all()
    return [stored(message, key) for message, key in rows]

"""Deleting history inside a caller's transaction: by platform id, a channel's whole history, a user's messages.

Functions over an open `AsyncSession`; none commits (the `Store` method that calls one owns the transaction, its
retry and its commit). Each deletes the messages (their image links go by cascade), then the images left unlinked
(`storage.image_rows.delete_orphan_images`), and returns how many messages went.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.image_rows import delete_orphan_images
from storage.models import Message, MessageImage
from storage.queries import chunks
from storage.rows import rowcount


async def delete_by_ids(session: AsyncSession, ids: Sequence[int]) -> int:
    """Delete messages by database id (links go by cascade), then the images left unlinked."""
    candidates: set[int] = set()
    count = 0
    for part in chunks(ids):
        candidates.update(
            (
                await session.scalars(
                    select(MessageImage.image_id).where(MessageImage.message_id.in_(part))
                )
            ).all()
        )
        result = await session.execute(
            delete(Message).where(Message.id.in_(part)).execution_options(synchronize_session=False)
        )
        count += rowcount(result)
    await delete_orphan_images(session, list(candidates))
    return count


async def delete_by_platform_ids(session: AsyncSession, wanted: Sequence[str]) -> int:
    """Delete the messages with these platform ids (unknown ones are ignored)."""
    ids: list[int] = []
    for part in chunks(wanted):
        ids.extend(
            (await session.scalars(select(Message.id).where(Message.platform_id.in_(part)))).all()
        )
    return await delete_by_ids(session, ids)


async def delete_channel_history(session: AsyncSession, channel_id: int) -> tuple[int, int]:
    """Delete every message of channel row `channel_id`; (messages, orphan images) deleted."""
    # Collected before the delete: afterwards the links that name them are gone.
    candidates = (
        await session.scalars(
            select(MessageImage.image_id)
            .join(Message, Message.id == MessageImage.message_id)
            .where(Message.channel_id == channel_id)
            .distinct()
        )
    ).all()
    result = await session.execute(
        delete(Message)
        .where(Message.channel_id == channel_id)
        .execution_options(synchronize_session=False)
    )
    removed_images = await delete_orphan_images(session, candidates)
    return rowcount(result), removed_images


async def delete_authored(session: AsyncSession, author_id: str) -> int:
    """Delete everything `author_id` wrote, in every channel, and the assistant's answers to it."""
    authored = select(Message.platform_id).where(Message.author_id == author_id)
    # Their messages locked first (PostgreSQL): an answer being stored holds its request's row (see
    # `Store.append_answer`), so this waits for it to commit, and the read below, a statement later, sees it.
    await session.execute(
        select(Message.id).where(Message.author_id == author_id).order_by(Message.id).with_for_update()
    )
    ids = (
        await session.scalars(
            select(Message.id).where(
                or_(
                    Message.author_id == author_id,
                    and_(Message.role == "assistant", Message.reply_to.in_(authored)),
                )
            )
        )
    ).all()
    return await delete_by_ids(session, ids)

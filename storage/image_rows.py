"""Image rows inside a caller's transaction: storing a message's images, linking them, deleting orphans.

Functions over an open `AsyncSession`; none commits. Images are shared by hash: one row per distinct picture,
linked to messages through `MessageImage`, and deleted when the last link goes. The statement counts are part of
the contract (every message pays them): `ensure_images` is two statements per round, `link_images` one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import delete, exists, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.errors import StorageError
from storage.models import Image, MessageImage
from storage.queries import chunks, insert_for
from storage.records import NewMessage
from storage.rows import rowcount

log = logging.getLogger(__name__)

IMAGE_INSERT_ROUNDS = 5
"""Attempts at storing a message's images while other processes keep deleting the same ones as orphans."""


async def ensure_images(session: AsyncSession, dialect: str, msg: NewMessage, hashes: list[str]) -> dict[str, int]:
    """Insert the images not stored yet; return the id of every image of `msg` by hash.

    On PostgreSQL another process may delete an image as an orphan between our INSERT (which found it
    and did nothing) and our lock: the locking read then misses it, and the insert is tried again for
    those. Once a row is locked FOR KEY SHARE no clean-up can delete it before this transaction ends.
    (SQLite serialises writers, so there the first round always finds every image.)
    """
    distinct = dict(zip(hashes, msg.images, strict=True))  # the same picture twice is one row
    found: dict[str, int] = {}
    for _ in range(IMAGE_INSERT_ROUNDS):
        missing = {sha: blob for sha, blob in distinct.items() if sha not in found}
        if not missing:
            return found
        await session.execute(
            insert_for(dialect, Image)
            .values(
                [
                    {
                        "sha256": sha,
                        "mime": blob.mime,
                        "width": blob.width,
                        "height": blob.height,
                        "byte_size": len(blob.data),
                        "data": blob.data,
                    }
                    for sha, blob in missing.items()
                ]
            )
            .on_conflict_do_nothing(index_elements=[Image.sha256])
        )
        # Locks taken in id order (as the orphan clean-up does), so two transactions cannot deadlock.
        rows = await session.execute(
            select(Image.sha256, Image.id)
            .where(Image.sha256.in_(list(missing)))
            .order_by(Image.id)
            .with_for_update(key_share=True)
        )
        found.update({sha: image_id for sha, image_id in rows})
    if len(found) < len(distinct):
        raise StorageError(
            detail=f"platform_id={msg.platform_id}: images deleted concurrently {IMAGE_INSERT_ROUNDS} times"
        )
    return found


async def link_images(
    session: AsyncSession, dialect: str, message_id: int, hashes: Sequence[str], image_ids: dict[str, int]
) -> None:
    """Link message `message_id` to its images, in order (one statement)."""
    await session.execute(
        insert_for(dialect, MessageImage).values(
            [
                {"message_id": message_id, "position": position, "image_id": image_ids[sha]}
                for position, sha in enumerate(hashes)
            ]
        )
    )


async def delete_orphan_images(session: AsyncSession, candidates: Sequence[int]) -> int:
    """Delete those of `candidates` that no message links to any more.

    Only images that lost a link in this transaction are checked, so the cost follows the deletion,
    not the size of the image table.
    """
    removed = 0
    for part in chunks(candidates):
        # Lock first, then check in a second statement: a transaction linking one of these images holds
        # it FOR KEY SHARE, so this waits for it to commit, and the DELETE's own snapshot (taken after
        # the wait) then sees the new link. One DELETE alone would judge "orphan" on a snapshot from
        # before the wait and fail on the foreign key. (PostgreSQL; SQLite has no row locks to wait on.)
        await session.execute(
            select(Image.id).where(Image.id.in_(part)).order_by(Image.id).with_for_update()
        )
        result = await session.execute(
            delete(Image)
            .where(Image.id.in_(part), ~exists().where(MessageImage.image_id == Image.id))
            .execution_options(synchronize_session=False)
        )
        removed += rowcount(result)
    if removed:
        log.debug("removed %d orphan images", removed)
    return removed

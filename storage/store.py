"""`Store`: every read and write of conversation history and channel settings.

`open_database()` builds the one `Store` of a database (`db.store`). Each method opens its own session and
transaction and returns plain records (`storage.records`), never ORM objects: nothing a caller holds can
start I/O later or keep a session alive. Every write is one transaction, run again when it finds the
database locked (`storage.retry`). A connection lost mid-call (a PostgreSQL restart) is retried briefly
where that is safe, then raised as `DatabaseUnavailable` (`storage.retry`); every public method raises
only `StorageError` for it, never the driver's error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import and_, delete, exists, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from storage.channel_settings import validate_setting
from storage.errors import ImageTooLarge, InvalidMessage, StorageError
from storage.models import Channel, Image, Message, MessageImage
from storage.queries import (
    chunks,
    insert_for,
    late_answers_statement,
    mark_answered_statement,
    message_insert_statement,
    window_with_images_statement,
    with_images,
)
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
from storage.retry import CommitInDoubt, commit, retry_when_disconnected, retry_when_locked

log = logging.getLogger(__name__)

IMAGE_INSERT_ROUNDS = 5
"""Attempts at storing a message's images while other processes keep deleting the same ones as orphans."""

_SETTINGS_COLUMNS = (Channel.answer_mode, Channel.record_mode, Channel.system_prompt, Channel.max_new_tokens,
                     Channel.temperature, Channel.decoding)
"""A channel's settings, named as the fields of `ChannelSettings`."""

CHANNEL_CACHE_ENTRIES = 100_000
"""Most channels whose id, and whose settings, a store keeps in memory (a few MB at most); past it a cache is
emptied and refills from the database."""

T = TypeVar("T")

SETTINGS_CACHE_S = 5.0
"""How long a store trusts a channel's settings it read. Its own changes apply at once; a change made by another
process sharing the database (each Discord channel belongs to one shard, so to one process) within this time."""

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
"""Matches the bot's default `MAX_IMAGE_BYTES`; `open_database()` takes the configured value."""


class Store:
    """Conversation history (messages with their images) and per-channel settings."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        engine: AsyncEngine,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        lock_retries: int = 3,
        lock_backoff_s: float = 0.25,
        reconnect_retries: int = 3,
        reconnect_backoff_s: float = 0.25,
    ) -> None:
        self._sessions = sessions
        self._engine = engine
        """For reads on every message's path: a plain connection costs less than an ORM session and, with no
        transaction begun, returns to the pool without a rollback."""
        self._dialect = engine.dialect.name
        self._channel_ids: dict[str, int] = {}
        """Channel key -> row id, for channel rows known to be committed. Channel rows are never deleted
        (clearing a channel deletes its messages, not its row) and ids never change, so a cached id stays
        right for every process sharing the database; it saves an append two statements."""
        self._settings: dict[str, tuple[float, ChannelSettings]] = {}
        """Channel key -> (time read, settings): read for every message twice (whether to answer, then the
        prompt), changed rarely and only through `update_channel_settings`."""
        self._settings_version = 0
        """Bumped by every settings change, so a read that raced with one does not cache what it read."""
        self.clock = time.monotonic
        """Seconds for `SETTINGS_CACHE_S` (tests move it on)."""
        self._max_image_bytes = max_image_bytes
        self.lock_retries = lock_retries
        """Attempts after the first when a write finds the database locked; then `DatabaseBusy`."""
        self.lock_backoff_s = lock_backoff_s
        """Pause before the first retry, doubled before each next one."""
        self.reconnect_retries = reconnect_retries
        """Attempts after the first when a write lost its connection (reads: one at most); then
        `DatabaseUnavailable`. With the defaults a write gives up after about 1.75 s of pauses."""
        self.reconnect_backoff_s = reconnect_backoff_s
        """Pause before the first reconnect retry, doubled before each next one."""

    # ------------------------------------------------------------------ messages: write

    async def append_message(self, msg: NewMessage) -> StoredMessage | None:
        """Store `msg` with its images, or return None (storing nothing) if its platform id is known.

        Channel row, message, images and links go in one transaction. The duplicate check is the
        database's own unique constraint (`ON CONFLICT DO NOTHING`), so two concurrent appends of the
        same event store exactly one message; for the same reason running it again after a lost
        connection can never store it twice.
        """
        self._check(msg)
        msg = _storable(msg)
        created_at = msg.created_at or datetime.now(UTC)  # once: every attempt stores the same row
        hashes = [hashlib.sha256(blob.data).hexdigest() for blob in msg.images]
        return await self._append(msg, created_at, hashes, _AppendAttempts())

    async def append_answer(self, msg: NewMessage) -> StoredMessage | None:
        """Store an assistant's answer and mark the request it answers (`msg.reply_to`) "answered", together.

        One transaction, one commit, where `append_message` and `set_request_state` take two: this runs for
        every answer. None (nothing stored, nothing marked) if the answer's platform id is known already, or if
        the request it answers is no longer stored (deleted, or its author forgotten while it was answered): an
        answer never outlives its question. The request is marked first, which also locks its row until the
        commit, so `forget_user` cannot erase it between that check and the answer's insert.
        """
        if msg.role != "assistant" or msg.reply_to is None:
            raise InvalidMessage(
                detail=f"platform_id={msg.platform_id}: an answer is an assistant message with reply_to"
            )
        self._check(msg)
        msg = _storable(msg)
        created_at = msg.created_at or datetime.now(UTC)
        hashes = [hashlib.sha256(blob.data).hexdigest() for blob in msg.images]
        return await self._append(msg, created_at, hashes, _AppendAttempts(), answered=msg.reply_to)

    @retry_when_disconnected("idempotent")
    @retry_when_locked
    async def _append(self, msg: NewMessage, created_at: datetime, hashes: list[str],
                      attempts: _AppendAttempts, answered: str | None = None) -> StoredMessage | None:
        async with self._sessions() as session:
            if answered is not None:
                marked = await session.execute(mark_answered_statement(), {"answered": answered})
                if _rowcount(marked) == 0:
                    await session.rollback()
                    log.info("answer platform_id=%s not stored: request %s is gone", msg.platform_id, answered)
                    return None
            channel_id = self._channel_ids.get(msg.channel_key)
            if channel_id is None:
                channel_id = await self._ensure_channel(session, msg.channel_key)
            values = {
                "m_platform_id": msg.platform_id, "m_channel_id": channel_id, "m_role": msg.role,
                "m_author_id": msg.author_id, "m_author_name": msg.author_name, "m_text": msg.text,
                "m_created_at": created_at, "m_reply_to": msg.reply_to, "m_request_state": msg.request_state,
            }
            inserted = await session.execute(message_insert_statement(self._dialect), values)
            message_id = inserted.scalar_one_or_none()
            if message_id is None:
                await session.rollback()  # also drops a channel row created just now
                if attempts.commit_lost:
                    # An earlier attempt sent its COMMIT and lost the connection before the reply: the row
                    # found is that attempt's, so this call did store the message and must say so (None
                    # would read "a duplicate, already handled", and the request would go unanswered).
                    log.info("message platform_id=%s was stored by an attempt whose commit reply was lost",
                             msg.platform_id)
                    return await self._read_message(session, msg.platform_id)
                log.debug("duplicate message platform_id=%s ignored", msg.platform_id)
                return None
            if msg.images:
                image_ids = await self._ensure_images(session, msg, hashes)
                await session.execute(
                    insert_for(self._dialect, MessageImage).values(
                        [
                            {"message_id": message_id, "position": position, "image_id": image_ids[sha]}
                            for position, sha in enumerate(hashes)
                        ]
                    )
                )
            try:
                await commit(session)
            except CommitInDoubt:
                attempts.commit_lost = True
                raise
        _put_bounded(self._channel_ids, msg.channel_key, channel_id)
        log.debug(
            "stored message id=%d platform_id=%s channel=%s role=%s text_len=%d images=%d image_bytes=%d",
            message_id,
            msg.platform_id,
            msg.channel_key,
            msg.role,
            len(msg.text),
            len(msg.images),
            sum(len(blob.data) for blob in msg.images),
        )
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

    @retry_when_disconnected("idempotent")  # sets a fixed text: running it twice changes nothing
    @retry_when_locked
    async def edit_message(self, platform_id: str, text: str) -> bool:
        """Replace a message's text (the platform's edit event). False if it is not stored."""
        async with self._sessions() as session:
            result = await session.execute(
                update(Message)
                .where(Message.platform_id == platform_id)
                .values(text=text.replace("\x00", ""))
                .execution_options(synchronize_session=False)
            )
            await commit(session)
        changed = _rowcount(result) > 0
        log.debug("edit platform_id=%s text_len=%d found=%s", platform_id, len(text), changed)
        return changed

    @retry_when_disconnected("idempotent")  # sets a fixed state
    @retry_when_locked
    async def set_request_state(self, platform_id: str, state: RequestState | None) -> bool:
        """Mark a request "pending", "answered" or "failed" (None: not a request). False if not stored."""
        if state is not None and state not in REQUEST_STATES:
            raise InvalidMessage(detail=f"unknown request state {state!r}")
        async with self._sessions() as session:
            result = await session.execute(
                update(Message)
                .where(Message.platform_id == platform_id)
                .values(request_state=state)
                .execution_options(synchronize_session=False)
            )
            await commit(session)
        return _rowcount(result) > 0

    @retry_when_disconnected("idempotent")  # sets a fixed value
    @retry_when_locked
    async def set_partial_reply(self, platform_id: str, reply_id: str) -> bool:
        """Record the message that shows request `platform_id`'s answer while it is delivered (its first part, once
        sent), so that a restart continues in it. False if the request is not stored."""
        async with self._sessions() as session:
            result = await session.execute(
                update(Message)
                .where(Message.platform_id == platform_id)
                .values(partial_reply_id=reply_id)
                .execution_options(synchronize_session=False)
            )
            await commit(session)
        return _rowcount(result) > 0

    @retry_when_disconnected("write")  # compare-and-set: a second run after a lost commit would answer False
    @retry_when_locked  # "database is locked" means nothing was written: safe to run again
    async def claim_request(
        self, platform_id: str, state: RequestState, *, expected: RequestState = "pending"
    ) -> bool:
        """Move a request from `expected` to `state` only if it is still `expected`; True for the caller that did.

        One conditional UPDATE (compare-and-set): of two processes recovering the same request after a
        crash, exactly one gets True and acts on it.
        """
        if state not in REQUEST_STATES or expected not in REQUEST_STATES:
            raise InvalidMessage(detail=f"unknown request state {state!r} or {expected!r}")
        async with self._sessions() as session:
            result = await session.execute(
                update(Message)
                .where(Message.platform_id == platform_id, Message.request_state == expected)
                .values(request_state=state)
                .execution_options(synchronize_session=False)
            )
            await commit(session)
        return _rowcount(result) == 1

    # ------------------------------------------------------------------ messages: delete

    async def delete_message(self, platform_id: str) -> bool:
        """Delete one message (and images nothing else uses). False if it is not stored."""
        return await self.delete_messages([platform_id]) == 1

    async def delete_messages(self, platform_ids: Iterable[str]) -> int:
        """Delete these messages (a bulk-delete event); unknown ids are ignored. Returns how many went."""
        return await self._delete_messages(list(dict.fromkeys(platform_ids)))

    @retry_when_disconnected("write")  # returns a count that a second run would not repeat
    @retry_when_locked
    async def _delete_messages(self, wanted: list[str]) -> int:
        async with self._sessions() as session:
            ids: list[int] = []
            for part in chunks(wanted):
                ids.extend(
                    (await session.scalars(select(Message.id).where(Message.platform_id.in_(part)))).all()
                )
            count = await self._delete_by_ids(session, ids)
            await commit(session)
        log.debug("deleted %d of %d messages", count, len(wanted))
        return count

    @retry_when_disconnected("write")
    @retry_when_locked
    async def clear_channel(self, channel_key: str) -> int:
        """Delete a channel's whole history; its settings stay. Returns how many messages went."""
        async with self._sessions() as session:
            channel_id = await session.scalar(select(Channel.id).where(Channel.key == channel_key))
            if channel_id is None:
                return 0
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
            removed_images = await self._delete_orphan_images(session, candidates)
            await commit(session)
        count = _rowcount(result)
        log.info("cleared channel=%s messages=%d orphan_images=%d", channel_key, count, removed_images)
        return count

    @retry_when_disconnected("write")
    @retry_when_locked
    async def forget_user(self, author_id: str) -> int:
        """Delete everything a user wrote, in every channel, and the bot's answers to it.

        Answers are assistant messages whose `reply_to` names one of the user's messages: they quote or
        describe what the user sent. Returns how many messages went.
        """
        authored = select(Message.platform_id).where(Message.author_id == author_id)
        async with self._sessions() as session:
            # Their messages locked first (PostgreSQL): an answer being stored holds its request's row (see
            # `append_answer`), so this waits for it to commit, and the read below, a statement later, sees it.
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
            count = await self._delete_by_ids(session, ids)
            await commit(session)
        log.info("forgot author_id=%s messages=%d", author_id, count)
        return count

    # ------------------------------------------------------------------ messages: read

    @retry_when_disconnected("read")
    async def recent_window(
        self, channel_key: str, limit: int, *, before_id: int | None = None, through_id: int | None = None
    ) -> list[StoredMessage]:
        """The last `limit` messages of a channel, oldest first, with their images.

        `before_id`: only messages older than that id, i.e. the history as a request saw it when it
        arrived. One statement, which reads `limit` index entries and the links and images of those
        messages by key, whatever the length of the channel's history.

        `through_id`: the window of the request with that id, however much the channel moved on since it
        arrived: the last `limit` messages up to and including it, then the answers stored after it to the
        requests among them (a second statement, see `storage.queries.late_answers_statement`), by id.
        """
        if limit <= 0:
            return []
        if before_id is not None and through_id is not None:
            raise ValueError("recent_window takes before_id or through_id, not both")
        params: dict[str, Any] = {"channel_key": channel_key, "limit": limit}
        if through_id is not None:
            before_id = through_id + 1
        if before_id is not None:
            params["before_id"] = before_id
        statement = window_with_images_statement(before=before_id is not None)
        async with self._engine.connect() as connection:
            rows = list((await connection.execute(statement, params)).all())
            if through_id is not None:
                # Requests are the user messages with a request state (column 8); column 1 is the platform id.
                request_ids = list(dict.fromkeys(row[1] for row in rows if row[8] is not None and row[0] != through_id))
                if request_ids:
                    rows.extend((await connection.execute(late_answers_statement(), {
                        "channel_key": channel_key, "after_id": through_id, "request_ids": request_ids,
                    })).all())
        return _window(rows, channel_key)

    @retry_when_disconnected("read")
    async def get_message(self, platform_id: str) -> StoredMessage | None:
        async with self._sessions() as session:
            return await self._read_message(session, platform_id)

    async def pending_requests(
        self, since: datetime, *, before: datetime | None = None
    ) -> list[StoredMessage]:
        """Requests still "pending" made at or after `since` (and before `before`), oldest first.

        After a crash these were never answered: the caller answers them again or marks them failed.
        """
        conditions = [Message.request_state == "pending", Message.created_at >= since]
        if before is not None:
            conditions.append(Message.created_at < before)
        return await self._pending(conditions)

    async def pending_requests_before(self, before: datetime) -> list[StoredMessage]:
        """Requests still "pending" made before `before`, oldest first (too old to answer now)."""
        return await self._pending([Message.request_state == "pending", Message.created_at < before])

    @retry_when_disconnected("read")
    async def count_messages(self, channel_key: str) -> int:
        channel_id = select(Channel.id).where(Channel.key == channel_key).scalar_subquery()
        async with self._sessions() as session:
            count = await session.scalar(
                select(func.count()).select_from(Message).where(Message.channel_id == channel_id)
            )
        return int(count or 0)

    # ------------------------------------------------------------------ channel settings

    async def channel_settings(self, channel_key: str) -> ChannelSettings:
        """The channel's own settings; all None (defaults) for a channel never seen.

        Kept for `SETTINGS_CACHE_S` after a read, and replaced at once by this store's own changes.
        """
        now = self.clock()
        cached = self._settings.get(channel_key)
        if cached is not None and now - cached[0] < SETTINGS_CACHE_S:
            return cached[1]
        version = self._settings_version
        settings = await self._read_channel_settings(channel_key)
        if version == self._settings_version:
            _put_bounded(self._settings, channel_key, (now, settings))
        return settings

    @retry_when_disconnected("read")
    async def _read_channel_settings(self, channel_key: str) -> ChannelSettings:
        # Plain columns: an ORM object would cost more than the query.
        async with self._sessions() as session:
            row = (await session.execute(select(*_SETTINGS_COLUMNS).where(Channel.key == channel_key))).first()
        return ChannelSettings() if row is None else ChannelSettings(**row._asdict())

    @retry_when_disconnected("idempotent")  # sets fixed values and reads them back
    @retry_when_locked
    async def update_channel_settings(self, channel_key: str, **changes: Any) -> ChannelSettings:
        """Set some settings (None resets one to the default) and return them all.

        Every value is checked before anything is written: one bad value changes nothing.
        """
        values = {name: validate_setting(name, value) for name, value in changes.items()}
        self._settings_version += 1
        self._settings.pop(channel_key, None)
        async with self._sessions() as session:
            channel_id = await self._ensure_channel(session, channel_key)
            if values:
                await session.execute(
                    update(Channel)
                    .where(Channel.id == channel_id)
                    .values(**values)
                    .execution_options(synchronize_session=False)
                )
            channel = await session.scalar(select(Channel).where(Channel.id == channel_id))
            await commit(session)
        assert channel is not None
        _put_bounded(self._channel_ids, channel_key, channel_id)
        log.info("channel=%s settings changed: %s", channel_key, sorted(values))
        settings = _settings(channel)
        self._settings_version += 1
        _put_bounded(self._settings, channel_key, (self.clock(), settings))
        return settings

    # ------------------------------------------------------------------ helpers

    def _check(self, msg: NewMessage) -> None:
        if msg.role not in ROLES:
            raise InvalidMessage(detail=f"platform_id={msg.platform_id}: unknown role {msg.role!r}")
        if msg.request_state is not None and msg.request_state not in REQUEST_STATES:
            raise InvalidMessage(
                detail=f"platform_id={msg.platform_id}: unknown request state {msg.request_state!r}"
            )
        if msg.created_at is not None and msg.created_at.tzinfo is None:
            raise InvalidMessage(detail=f"platform_id={msg.platform_id}: created_at has no time zone")
        for blob in msg.images:
            if len(blob.data) > self._max_image_bytes:
                raise ImageTooLarge(len(blob.data), self._max_image_bytes)

    async def _ensure_channel(self, session: AsyncSession, channel_key: str) -> int:
        # Insert-or-ignore first, then read: race-free without catching IntegrityError, and on SQLite the
        # first statement is a write, which takes the write lock before anything is read.
        await session.execute(
            insert_for(self._dialect, Channel)
            .values(key=channel_key, created_at=datetime.now(UTC))
            .on_conflict_do_nothing(index_elements=[Channel.key])
        )
        return (await session.scalars(select(Channel.id).where(Channel.key == channel_key))).one()

    async def _ensure_images(
        self, session: AsyncSession, msg: NewMessage, hashes: list[str]
    ) -> dict[str, int]:
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
                insert_for(self._dialect, Image)
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

    async def _delete_by_ids(self, session: AsyncSession, ids: Sequence[int]) -> int:
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
            count += _rowcount(result)
        await self._delete_orphan_images(session, list(candidates))
        return count

    async def _delete_orphan_images(self, session: AsyncSession, candidates: Sequence[int]) -> int:
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
            removed += _rowcount(result)
        if removed:
            log.debug("removed %d orphan images", removed)
        return removed

    @retry_when_disconnected("read")
    async def _read_message(self, session: AsyncSession, platform_id: str) -> StoredMessage | None:
        row = (
            await session.execute(
                with_images(
                    select(Message, Channel.key)
                    .join(Channel, Channel.id == Message.channel_id)
                    .where(Message.platform_id == platform_id)
                )
            )
        ).one_or_none()
        return None if row is None else _stored(row[0], row[1])

    async def _pending(self, conditions: list[Any]) -> list[StoredMessage]:
        async with self._sessions() as session:
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
        return [_stored(message, key) for message, key in rows]


@dataclass
class _AppendAttempts:
    """What the attempts of one `append_message` call share."""

    commit_lost: bool = False
    """An attempt lost its connection during the COMMIT: the message may be stored already."""


def _storable(msg: NewMessage) -> NewMessage:
    """`msg` without NUL characters, which PostgreSQL's text cannot hold (a model's output may carry one); the
    same on SQLite, so every database stores the same text."""
    return dataclasses.replace(msg, text=msg.text.replace("\x00", "")) if "\x00" in msg.text else msg


def _rowcount(result: Any) -> int:
    # DML results are CursorResults; the ORM types them as plain Result, which has no rowcount.
    return int(result.rowcount)


def _stored(row: Message, channel_key: str) -> StoredMessage:
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


def _put_bounded(entries: dict[str, T], channel_key: str, value: T) -> None:
    """Set a per-channel cache entry; a cache at `CHANNEL_CACHE_ENTRIES` is emptied first (it refills)."""
    if channel_key not in entries and len(entries) >= CHANNEL_CACHE_ENTRIES:
        entries.clear()
    entries[channel_key] = value


def _window(rows: Sequence[Any], channel_key: str) -> list[StoredMessage]:
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


def _settings(channel: Channel) -> ChannelSettings:
    return ChannelSettings(
        answer_mode=cast(Any, channel.answer_mode),
        record_mode=cast(Any, channel.record_mode),
        system_prompt=channel.system_prompt,
        max_new_tokens=channel.max_new_tokens,
        temperature=channel.temperature,
        decoding=cast(Any, channel.decoding),
    )

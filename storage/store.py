"""`Store`: every read and write of conversation history and channel settings.

`open_database()` builds the one `Store` of a database (`db.store`). Each method opens its own session and
transaction and returns plain records (`storage.records`), never ORM objects: nothing a caller holds can
start I/O later or keep a session alive. Every write is one transaction, run again when it finds the
database locked (`storage.retry`). A connection lost mid-call (a PostgreSQL restart) is retried briefly
where that is safe, then raised as `DatabaseUnavailable` (`storage.retry`); every public method raises
only `StorageError` for it, never the driver's error.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from storage.channel_settings import validate_setting
from storage.deletion import delete_authored, delete_by_platform_ids, delete_channel_history
from storage.errors import InvalidMessage
from storage.image_rows import ensure_images, link_images
from storage.models import Channel, Message
from storage.queries import (
    insert_for,
    mark_answered_statement,
    message_insert_statement,
)
from storage.reads import read_matching, read_message, read_window
from storage.records import REQUEST_STATES, ChannelSettings, NewMessage, RequestState, StoredMessage
from storage.retry import CommitInDoubt, commit, retry_when_disconnected, retry_when_locked
from storage.rows import check_message, rowcount, settings_of, storable, stored_from_new
from storage.settings_cache import ChannelCache

log = logging.getLogger(__name__)

_SETTINGS_COLUMNS = (Channel.answer_mode, Channel.record_mode, Channel.system_prompt, Channel.max_new_tokens,
                     Channel.temperature, Channel.decoding)
"""A channel's settings, named as the fields of `ChannelSettings`."""

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
        self._channels = ChannelCache()
        self.clock = time.monotonic
        """Seconds for `storage.settings_cache.SETTINGS_CACHE_S` (tests move it on)."""
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
        check_message(msg, self._max_image_bytes)
        msg = storable(msg)
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
        check_message(msg, self._max_image_bytes)
        msg = storable(msg)
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
                if rowcount(marked) == 0:
                    await session.rollback()
                    log.info("answer platform_id=%s not stored: request %s is gone", msg.platform_id, answered)
                    return None
            channel_id = self._channels.ids.get(msg.channel_key)
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
                image_ids = await ensure_images(session, self._dialect, msg, hashes)
                await link_images(session, self._dialect, message_id, hashes, image_ids)
            try:
                await commit(session)
            except CommitInDoubt:
                attempts.commit_lost = True
                raise
        self._channels.remember_id(msg.channel_key, channel_id)
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
        return stored_from_new(msg, message_id, created_at, hashes)

    @retry_when_disconnected("idempotent")  # sets a fixed text: running it twice changes nothing
    @retry_when_locked
    async def edit_message(self, platform_id: str, text: str) -> bool:
        """Replace a message's text (the platform's edit event). False if it is not stored."""
        changed = await self._update(Message.platform_id == platform_id, text=text.replace("\x00", "")) > 0
        log.debug("edit platform_id=%s text_len=%d found=%s", platform_id, len(text), changed)
        return changed

    @retry_when_disconnected("idempotent")  # sets a fixed state
    @retry_when_locked
    async def set_request_state(self, platform_id: str, state: RequestState | None) -> bool:
        """Mark a request "pending", "answered" or "failed" (None: not a request). False if not stored."""
        if state is not None and state not in REQUEST_STATES:
            raise InvalidMessage(detail=f"unknown request state {state!r}")
        return await self._update(Message.platform_id == platform_id, request_state=state) > 0

    @retry_when_disconnected("idempotent")  # sets a fixed value
    @retry_when_locked
    async def set_partial_reply(self, platform_id: str, reply_id: str) -> bool:
        """Record the message that shows request `platform_id`'s answer while it is delivered (its first part, once
        sent), so that a restart continues in it. False if the request is not stored."""
        return await self._update(Message.platform_id == platform_id, partial_reply_id=reply_id) > 0

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
        return await self._update(Message.platform_id == platform_id, Message.request_state == expected,
                                  request_state=state) == 1

    async def _update(self, *conditions: Any, **values: Any) -> int:
        """One UPDATE of the messages matching `conditions`, committed on its own; how many rows it changed.
        The retry decorators stay on the public methods: only they know whether running it again is safe."""
        async with self._sessions() as session:
            result = await session.execute(
                update(Message).where(*conditions).values(**values).execution_options(synchronize_session=False)
            )
            await commit(session)
        return rowcount(result)

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
            count = await delete_by_platform_ids(session, wanted)
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
            count, removed_images = await delete_channel_history(session, channel_id)
            await commit(session)
        log.info("cleared channel=%s messages=%d orphan_images=%d", channel_key, count, removed_images)
        return count

    @retry_when_disconnected("write")
    @retry_when_locked
    async def forget_user(self, author_id: str) -> int:
        """Delete everything a user wrote, in every channel, and the bot's answers to it.

        Answers are assistant messages whose `reply_to` names one of the user's messages: they quote or
        describe what the user sent. Returns how many messages went.
        """
        async with self._sessions() as session:
            count = await delete_authored(session, author_id)
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
        async with self._engine.connect() as connection:
            return await read_window(connection, channel_key, limit, before_id=before_id, through_id=through_id)

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

        Kept for `storage.settings_cache.SETTINGS_CACHE_S` after a read, and replaced at once by this store's own
        changes.
        """
        now = self.clock()
        cached = self._channels.settings(channel_key, now)
        if cached is not None:
            return cached
        version = self._channels.version
        settings = await self._read_channel_settings(channel_key)
        self._channels.keep_read(channel_key, now, settings, version)
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
        self._channels.changing(channel_key)
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
        self._channels.remember_id(channel_key, channel_id)
        log.info("channel=%s settings changed: %s", channel_key, sorted(values))
        settings = settings_of(channel)
        self._channels.changed(channel_key, self.clock(), settings)
        return settings

    # ------------------------------------------------------------------ helpers

    async def _ensure_channel(self, session: AsyncSession, channel_key: str) -> int:
        # Insert-or-ignore first, then read: race-free without catching IntegrityError, and on SQLite the
        # first statement is a write, which takes the write lock before anything is read.
        await session.execute(
            insert_for(self._dialect, Channel)
            .values(key=channel_key, created_at=datetime.now(UTC))
            .on_conflict_do_nothing(index_elements=[Channel.key])
        )
        return (await session.scalars(select(Channel.id).where(Channel.key == channel_key))).one()

    @retry_when_disconnected("read")
    async def _read_message(self, session: AsyncSession, platform_id: str) -> StoredMessage | None:
        return await read_message(session, platform_id)

    async def _pending(self, conditions: list[Any]) -> list[StoredMessage]:
        async with self._sessions() as session:
            return await read_matching(session, conditions)

@dataclass
class _AppendAttempts:
    """What the attempts of one `append_message` call share."""

    commit_lost: bool = False
    """An attempt lost its connection during the COMMIT: the message may be stored already."""

"""Database trouble: SQLite "database is locked" is retried, and past the retries the user is told briefly.

The lock is real: a plain `sqlite3` connection holds `BEGIN EXCLUSIVE` on the same file for longer than the
store's busy timeout (lowered for the test). PostgreSQL restarts: tests/system/reliability/test_postgres_restart.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from bot.discord_app.client import STORAGE_FAILED
from storage import Database, DatabaseBusy, NewMessage, StorageError, open_database
from storage.retry import is_lock_error
from tests.bot.discord_app.conftest import answer_to, eventually, settle

BUSY_MS = 100


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only (the lock is SQLite's); overrides the Discord fixtures' SQLite/PostgreSQL choice."""
    return f"sqlite+aiosqlite:///{tmp_path / 'locked.sqlite3'}"


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    async with open_database(database_url, busy_timeout_ms=BUSY_MS) as opened:
        yield opened


@contextlib.contextmanager
def exclusive_lock(database_url: str) -> Iterator[sqlite3.Connection]:
    """Another connection holds the write lock until the block ends (or it commits earlier)."""
    path = database_url.split("///", 1)[1]
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")
    try:
        yield other
    finally:
        if other.in_transaction:
            other.execute("COMMIT")
        other.close()


def message(n: int, text: str = "a secret question") -> NewMessage:
    return NewMessage(platform_id=f"m{n}", channel_key="chan", role="user", author_id="u1", author_name="alice",
                      text=text, request_state="pending")


async def test_append_waits_out_a_lock_held_longer_than_the_busy_timeout(
        db: Database, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="storage")
    with exclusive_lock(database_url) as other:
        asyncio.get_running_loop().call_later(0.5, other.execute, "COMMIT")
        started = time.monotonic()
        stored = await db.store.append_message(message(1))
        took = time.monotonic() - started
    assert stored is not None and stored.platform_id == "m1"
    assert took >= 0.5  # it did meet the lock
    assert await db.store.count_messages("chan") == 1  # stored exactly once
    retries = [r for r in caplog.records if "database locked" in r.getMessage()]
    assert retries and all("platform_id=m1" in r.getMessage() for r in retries)
    assert not any("secret" in r.getMessage() for r in caplog.records)  # ids in logs, never text


async def test_a_lock_that_stays_fails_with_a_short_message_in_bounded_time(db: Database, database_url: str) -> None:
    with exclusive_lock(database_url):
        started = time.monotonic()
        with pytest.raises(DatabaseBusy) as failed:
            await db.store.append_message(message(2))
        took = time.monotonic() - started
        with pytest.raises(StorageError):
            await db.store.set_request_state("m2", "failed")
    assert isinstance(failed.value, StorageError)
    assert len(failed.value.user_message) < 80 and "busy" in failed.value.user_message
    assert "secret" not in str(failed.value)
    # 4 attempts of BUSY_MS each plus 0.25 + 0.5 + 1.0 s of backoff.
    assert 1.5 < took < 4.0
    assert isinstance(failed.value.__cause__, OperationalError)
    # The lock is gone: the store works again, and the failed append left nothing behind.
    assert await db.store.count_messages("chan") == 0
    assert await db.store.append_message(message(2)) is not None


async def test_other_database_errors_are_not_retried(db: Database, database_url: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = database_url.split("///", 1)[1]
    with contextlib.closing(sqlite3.connect(path)) as other:
        other.execute("ALTER TABLE messages RENAME TO messages_gone")
        other.commit()
    caplog.set_level(logging.WARNING, logger="storage")
    started = time.monotonic()
    with pytest.raises(OperationalError) as failed:
        await db.store.append_message(message(3))
    assert time.monotonic() - started < 0.5
    assert not is_lock_error(failed.value)
    assert not [r for r in caplog.records if "database locked" in r.getMessage()]


def test_lock_errors_are_told_apart() -> None:
    locked = OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked"))
    other = OperationalError("INSERT ...", {}, sqlite3.OperationalError("no such table: messages"))
    assert is_lock_error(locked) and not is_lock_error(other)
    assert not is_lock_error(RuntimeError("database is locked"))


async def test_bot_tells_the_user_and_keeps_serving(running_bot: Any, database_url: str) -> None:
    fake, world, services = running_bot.fake, running_bot.world, running_bot.services
    engine = services.database.engine

    @event.listens_for(engine.sync_engine, "connect")
    def short_busy_timeout(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={BUSY_MS}")
        cursor.close()

    await engine.dispose()  # new connections get the short timeout
    services.database.store.lock_retries = 1
    with exclusive_lock(database_url):
        asked = await fake.send_message_as(world.member, world.general, "do you hear me?", mentions_bot=True)
        notice = await answer_to(running_bot, world.general, asked)
        assert notice.content == STORAGE_FAILED
        assert notice.allowed_mentions == {"parse": []}
    assert await running_bot.store.get_message(str(asked.id)) is None
    again = await fake.send_message_as(world.member, world.general, "and now?", mentions_bot=True)
    answer = await answer_to(running_bot, world.general, again)
    assert answer.content and answer.content != STORAGE_FAILED
    await eventually(lambda: running_bot.store.get_message(str(again.id)), 5, "the request stored")
    stored = await running_bot.store.get_message(str(again.id))
    assert stored.request_state == "answered"
    await settle(running_bot)

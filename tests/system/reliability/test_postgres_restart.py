"""Database trouble, PostgreSQL: a server stopped or restarted mid-run costs at most the requests of that moment,
each told so, and the bot recovers without a restart.

The server is a throwaway of this module's own (`tests.fakes.postgres.server`), never the shared TEST_DATABASE_URL
one: these tests stop it. Without the PostgreSQL server binaries they are skipped, saying so (`-ra`). The
lost-commit-reply cases need no server restart and run on SQLite too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import DBAPIError, OperationalError

import storage.store
from bot.discord_app.client import STORAGE_FAILED
from storage import Database, DatabaseUnavailable, NewMessage, StorageError, open_database
from storage.errors import UNREACHABLE_MESSAGE
from storage.retry import CommitInDoubt, commit, is_connection_error
from tests.bot.discord_app.conftest import answer_to, eventually, settle
from tests.fakes.postgres.server import ServerUnavailable, ThrowawayServer, throwaway_server


@pytest.fixture
def server() -> Iterator[ThrowawayServer]:
    """A running throwaway PostgreSQL server with an empty database; skipped (with the reason) if none."""
    with contextlib.ExitStack() as stack:
        try:
            started = stack.enter_context(throwaway_server())
        except ServerUnavailable as exc:
            pytest.skip(f"PostgreSQL restart not tested: {exc}")
        yield started


@pytest.fixture
def database_url(server: ThrowawayServer) -> str:
    """The throwaway server; overrides the Discord fixtures' SQLite/PostgreSQL choice for the bot test."""
    return server.url


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'lost-reply.sqlite3'}"
    server: ThrowawayServer = request.getfixturevalue("server")
    return server.url


@pytest.fixture
async def db(server: ThrowawayServer) -> AsyncIterator[Database]:
    async with open_database(server.url) as opened:
        yield opened


def message(n: int, text: str = "a secret question") -> NewMessage:
    return NewMessage(platform_id=f"m{n}", channel_key="chan", role="user", author_id="u1", author_name="alice",
                      text=text, request_state="pending")


async def failure_of(call: Any) -> tuple[StorageError, float]:
    started = time.monotonic()
    with pytest.raises(StorageError) as failed:
        await call
    return failed.value, time.monotonic() - started


async def test_store_fails_briefly_while_the_server_is_down_and_works_again_after(
        db: Database, server: ThrowawayServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="storage")
    store = db.store
    assert await store.append_message(message(1)) is not None  # the pool now holds a live connection

    await asyncio.to_thread(server.stop)
    # (a) Every call fails with the short message, within the retry bound, never with the driver's error.
    failed, took = await failure_of(store.append_message(message(2)))
    assert isinstance(failed, DatabaseUnavailable) and failed.user_message == UNREACHABLE_MESSAGE
    assert 1.5 < took < 5.0  # a write: 3 retries after 0.25 + 0.5 + 1.0 s
    assert "secret" not in str(failed)
    read_failed, read_took = await failure_of(store.recent_window("chan", 10))
    assert isinstance(read_failed, DatabaseUnavailable) and read_took < 1.5  # a read: one retry
    store.reconnect_backoff_s = 0.01  # the bound is shown above; the rest only need to fail the same way
    for call in (store.set_request_state("m1", "failed"), store.claim_request("m1", "answered"),
                 store.channel_settings("chan"), store.get_message("m1"), store.count_messages("chan"),
                 store.update_channel_settings("chan", temperature=0.5), store.clear_channel("chan")):
        assert (await failure_of(call))[0].user_message == UNREACHABLE_MESSAGE

    await asyncio.to_thread(server.start)
    # (b) The same open Database works again: no reopen, nothing stored before the stop is lost.
    assert await store.append_message(message(3)) is not None
    window = await store.recent_window("chan", 10)
    assert [m.platform_id for m in window] == ["m1", "m3"]
    assert window[0].text == "a secret question" and window[0].request_state == "pending"
    assert await store.claim_request("m1", "answered") is True

    assert not any("secret" in record.getMessage() for record in caplog.records)  # ids in logs, never text
    assert any("database connection lost" in r.getMessage() and "platform_id=m2" in r.getMessage()
               for r in caplog.records)


async def test_a_write_rides_out_a_quick_restart_and_is_stored_once(db: Database, server: ThrowawayServer) -> None:
    store = db.store
    assert await store.append_message(message(1)) is not None
    store.reconnect_retries = 6  # up to 15 s of pauses: longer than any start of the server, however slow
    await asyncio.to_thread(server.stop)
    append = asyncio.create_task(store.append_message(message(2)))
    await asyncio.sleep(0.1)
    assert not append.done()  # refused, and waiting to try again
    await asyncio.to_thread(server.start)
    stored = await asyncio.wait_for(append, 20)
    assert stored is not None and stored.platform_id == "m2"
    assert await store.count_messages("chan") == 2


async def test_a_restart_between_two_calls_goes_unnoticed(db: Database, server: ThrowawayServer) -> None:
    """Pooled connections ended by the restart are replaced on checkout (`pool_pre_ping`): no call fails."""
    assert await db.store.append_message(message(1)) is not None
    await asyncio.to_thread(server.stop)
    await asyncio.to_thread(server.start)
    assert await db.store.get_message("m1") is not None
    assert await db.store.append_message(message(2)) is not None


# -- a connection lost during the COMMIT: the transaction may have committed -------------------------------

@contextlib.contextmanager
def commit_reply_lost_once(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The next COMMIT goes through and then its reply is "lost" (the connection drops before it arrives).

    Only this boundary is faked: the COMMIT itself is real, so the retry that follows meets the committed row.
    """
    commits: list[int] = []

    async def commit_then_lose_the_reply(session: Any) -> None:
        await commit(session)
        commits.append(1)
        if len(commits) == 1:
            raise CommitInDoubt("connection lost during COMMIT (test)") from ConnectionResetError(104, "reset")

    monkeypatch.setattr(storage.store, "commit", commit_then_lose_the_reply)
    yield commits


async def test_an_append_whose_commit_reply_was_lost_is_reported_stored_once(
        any_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with open_database(any_url) as db:
        with commit_reply_lost_once(monkeypatch) as commits:
            stored = await db.store.append_message(message(1))
        # Stored, and said so: None would read "a duplicate, already handled" and the request would go unanswered.
        assert stored is not None and stored.platform_id == "m1" and stored.text == "a secret question"
        assert len(commits) == 1  # the retry found the row and committed nothing more
        assert await db.store.count_messages("chan") == 1
        assert await db.store.append_message(message(1)) is None  # a real duplicate is still one


async def test_a_compare_and_set_whose_commit_reply_was_lost_is_not_run_again(
        any_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with open_database(any_url) as db:
        assert await db.store.append_message(message(1)) is not None
        with commit_reply_lost_once(monkeypatch) as commits:
            with pytest.raises(DatabaseUnavailable) as failed:
                await db.store.claim_request("m1", "failed")
        # Run again it would find the claim taken (its own) and answer False: the caller is told instead.
        assert len(commits) == 1 and failed.value.user_message == UNREACHABLE_MESSAGE
        assert isinstance(failed.value.__cause__, CommitInDoubt)
        stored = await db.store.get_message("m1")
        assert stored is not None and stored.request_state == "failed"


class _DriverError(Exception):
    """A DBAPI error as SQLAlchemy's asyncpg adapter raises it: the server's SQLSTATE copied onto it."""

    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def test_connection_errors_are_told_apart() -> None:
    starting = DBAPIError("SELECT 1", {}, _DriverError("the database system is starting up", "57P03"))
    invalidated = DBAPIError("INSERT ...", {}, _DriverError("connection was closed", "08003"),
                             connection_invalidated=True)
    unique = DBAPIError("INSERT ...", {}, _DriverError("duplicate key value", "23505"))
    locked = OperationalError("INSERT ...", {}, Exception("database is locked"))
    assert is_connection_error(ConnectionRefusedError(111, "Connect call failed"))
    assert is_connection_error(starting) and is_connection_error(invalidated)
    assert is_connection_error(CommitInDoubt("lost"))
    assert not is_connection_error(unique) and not is_connection_error(locked)
    assert not is_connection_error(RuntimeError("connection is closed"))


# -- the bot --------------------------------------------------------------------------------------------------

async def test_bot_tells_the_user_while_the_server_is_down_and_answers_again_after(
        running_bot: Any, server: ThrowawayServer) -> None:
    fake, world = running_bot.fake, running_bot.world
    before = await fake.send_message_as(world.member, world.general, "first question", mentions_bot=True)
    first = await answer_to(running_bot, world.general, before)
    assert first.content and first.content != STORAGE_FAILED

    await asyncio.to_thread(server.stop)
    asked = await fake.send_message_as(world.member, world.general, "do you hear me?", mentions_bot=True)
    notice = await answer_to(running_bot, world.general, asked)
    assert notice.content == STORAGE_FAILED and notice.allowed_mentions == {"parse": []}
    assert not running_bot.bot.is_closed()

    await asyncio.to_thread(server.start)
    again = await fake.send_message_as(world.member, world.general, "and now?", mentions_bot=True)
    answer = await answer_to(running_bot, world.general, again)
    assert answer.content and answer.content != STORAGE_FAILED
    store = running_bot.store
    await eventually(lambda: store.get_message(str(again.id)), 5, "the request stored")
    await eventually(lambda: _state_is(store, str(again.id), "answered"), 5, "the request answered")
    earlier = await store.get_message(str(before.id))
    assert earlier is not None and earlier.request_state == "answered"  # from before the stop
    assert await store.get_message(str(asked.id)) is None  # refused while down, and told so
    await settle(running_bot)


async def _state_is(store: Any, platform_id: str, state: str) -> bool:
    stored = await store.get_message(platform_id)
    return stored is not None and stored.request_state == state

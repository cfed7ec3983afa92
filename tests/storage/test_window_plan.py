"""The window query reads a bounded slice of the (channel_id, id) index, however long the history: on its own
(`window_statement`) and as the store runs it (`window_rows_statement`); the window's images are read by key
(`window_with_images_statement`, one statement), however many images the database holds.

Checked on SQLite's query plan and on the number of VM steps the query takes, never on wall time.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import pytest
from sqlalchemy import insert, text

from bench.overhead import fill as fill_with_images
from storage import Database
from storage.models import Message
from storage.queries import window_rows_statement, window_statement, window_with_images_statement
from tests.storage.conftest import message

BIG, SMALL = 20_000, 20


async def fill(database: Database, channel: str, count: int) -> None:
    """A channel with `count` messages: one through the store (creates the channel), the rest in bulk."""
    first = await database.store.append_message(message(f"{channel}-0", channel=channel))
    assert first is not None
    channel_id = await _channel_id(database, channel)
    now = datetime.now(UTC)
    rows = [
        {
            "platform_id": f"{channel}-{i}",
            "channel_id": channel_id,
            "role": "user",
            "author_id": "u",
            "author_name": "u",
            "text": "x",
            "created_at": now,
        }
        for i in range(1, count)
    ]
    async with database.sessions() as session:
        await session.execute(insert(Message), rows)  # one executemany: 20,000 appends would take long
        await session.commit()


async def _channel_id(database: Database, channel: str) -> int:
    async with database.engine.connect() as connection:
        return int(await connection.scalar(text("SELECT id FROM channels WHERE key = :k"), {"k": channel}))


def window_sql(database: Database, channel: str, before_id: int | None = None, *, rows: bool = False) -> str:
    """The window statement for a 20-message window; `rows`: the store's own (plain columns, bound parameters)."""
    if rows:
        params: dict[str, object] = {"channel_key": channel, "limit": 20}
        if before_id is not None:
            params["before_id"] = before_id
        statement = window_rows_statement(before=before_id is not None).params(**params)
    else:
        statement = window_statement(channel, 20, before_id)
    return str(statement.compile(dialect=database.engine.dialect, compile_kwargs={"literal_binds": True}))


def images_sql(database: Database, channel: str) -> str:
    """The store's window statement with images (`window_with_images_statement`) for a 20-message window."""
    statement = window_with_images_statement().params(channel_key=channel, limit=SMALL)
    return str(statement.compile(dialect=database.engine.dialect, compile_kwargs={"literal_binds": True}))


async def query_plan(database: Database, sql: str) -> list[str]:
    async with database.engine.connect() as connection:
        return [row[3] for row in (await connection.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)).all()]


def vm_steps(path: str, sql: str) -> int:
    """SQLite virtual-machine instructions the query runs: a measure of work that ignores the clock."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    connection = sqlite3.connect(path)
    try:
        connection.set_progress_handler(count, 1)
        connection.execute(sql).fetchall()
    finally:
        connection.close()
    return steps


@pytest.mark.parametrize("rows", [False, True], ids=["window", "store-window-rows"])
async def test_window_plan_uses_the_index_without_sorting(sqlite_database: Database, rows: bool) -> None:
    await fill(sqlite_database, "big", BIG)
    await fill(sqlite_database, "small", SMALL)

    for before_id in (None, BIG // 2):
        plans = [
            await query_plan(sqlite_database, window_sql(sqlite_database, key, before_id, rows=rows))
            for key in ("big", "small")
        ]
        assert plans[0] == plans[1]
        detail = " | ".join(plans[0])
        assert "INDEX ix_messages_channel_id_id (channel_id=?" in detail, detail
        assert "SCAN messages" not in detail, detail
        assert "TEMP B-TREE" not in detail, detail


@pytest.mark.parametrize("rows", [False, True], ids=["window", "store-window-rows"])
async def test_window_work_does_not_grow_with_history(sqlite_database: Database, rows: bool) -> None:
    await fill(sqlite_database, "big", BIG)
    await fill(sqlite_database, "small", SMALL)
    path = sqlite_database.engine.url.database
    assert path is not None

    big = vm_steps(path, window_sql(sqlite_database, "big", rows=rows))
    small = vm_steps(path, window_sql(sqlite_database, "small", rows=rows))
    middle = vm_steps(path, window_sql(sqlite_database, "big", before_id=BIG // 2, rows=rows))

    # Both read 20 rows; a scan or a sort of the big channel would cost about 1000x more.
    print(f"VM steps for a 20-message window: {BIG} messages {big}, {SMALL} messages {small}")
    assert big <= 2 * small and middle <= 2 * small, (big, middle, small)

    window = await sqlite_database.store.recent_window("big", 20)
    assert [m.platform_id for m in window] == [f"big-{i}" for i in range(BIG - 20, BIG)]


async def test_window_images_are_read_by_key_however_many_are_stored(sqlite_database: Database) -> None:
    # Every twentieth message has an image: 1,000 links in the big channel, 3 in the small one.
    await fill_with_images(sqlite_database, "big", "b", BIG, image_side=4)
    await fill_with_images(sqlite_database, "small", "s", 3 * SMALL, image_side=4)
    path = sqlite_database.engine.url.database
    assert path is not None

    detail = " | ".join(await query_plan(sqlite_database, images_sql(sqlite_database, "big")))
    assert "INDEX ix_messages_channel_id_id (channel_id=?" in detail, detail
    assert "SEARCH message_images USING INDEX" in detail and "(message_id=?)" in detail, detail
    assert "SEARCH images USING INTEGER PRIMARY KEY" in detail, detail
    for scan in ("SCAN messages", "SCAN message_images", "SCAN images", "TEMP B-TREE"):
        assert scan not in detail, detail

    big = vm_steps(path, images_sql(sqlite_database, "big"))
    small = vm_steps(path, images_sql(sqlite_database, "small"))
    print(f"VM steps for a 20-message window's images: {BIG} messages {big}, {3 * SMALL} messages {small}")
    assert big <= 2 * small, (big, small)  # a scan of the links would read 1,000 of them

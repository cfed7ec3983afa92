"""The database work of one message does not grow with the channel's history.

One message through the pipeline's per-message work outside the model (the work `bench/overhead.py` times:
settings read, `Conversation.record`, `prompt_for`, `store_answer`), at a short and a long history, counted in
SQLite virtual-machine steps over every statement it runs: a measure of work that ignores the clock. A scan, a
sort or a count over the channel would multiply the count for the long history.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.util import await_

from bench.overhead import fill, incoming_messages, one_message
from bot.pipeline.conversation import ChatDefaults, Conversation, ModelInfo
from storage import Database, open_database

SHORT, LONG = 60, 5_000
"""Both longer than the window the pipeline loads (`ChatDefaults.history_messages`, 40): the same window."""
MESSAGES = 3
"""Measured one after the other; every tenth measured message (the first) carries an image."""


class StepCounter:
    """Counts SQLite VM instructions on every connection of an engine, while `counting` is set."""

    def __init__(self) -> None:
        self.steps = 0
        self.counting = False

    def __call__(self) -> int:
        if self.counting:
            self.steps += 1
        return 0  # 0: go on

    def install(self, _dbapi_connection: Any, record: Any) -> None:
        # Runs inside SQLAlchemy's greenlet, so aiosqlite's coroutine can be awaited; on aiosqlite's own thread.
        await_(record.driver_connection.set_progress_handler(self, 1))


@pytest.fixture
async def counted_database(tmp_path: Any) -> AsyncIterator[tuple[Database, StepCounter]]:
    counter = StepCounter()
    async with open_database(f"sqlite+aiosqlite:///{tmp_path / 'counted.sqlite3'}") as db:
        event.listen(db.engine.sync_engine, "connect", counter.install)
        await db.engine.dispose()  # the migration's pooled connection goes: every connection from here is counted
        yield db, counter


async def steps_per_message(db: Database, counter: StepCounter, history: int) -> list[int]:
    channel = f"history-{history}"
    await fill(db, channel, f"h{history}", history, image_side=8)
    conversation = Conversation(db.store, None, ModelInfo(name="test", instruct=True), ChatDefaults(),
                                assistant_id="bot")
    counts = []
    for incoming in incoming_messages(channel, f"m{history}", MESSAGES):
        counter.steps, counter.counting = 0, True
        try:
            await one_message(conversation, incoming)
        finally:
            counter.counting = False
        counts.append(counter.steps)
    return counts


async def test_message_work_is_the_same_for_short_and_long_histories(
    counted_database: tuple[Database, StepCounter],
) -> None:
    db, counter = counted_database
    short = await steps_per_message(db, counter, SHORT)
    long = await steps_per_message(db, counter, LONG)
    print(f"VM steps per message: {SHORT} messages {short}, {LONG} messages {long}")
    assert all(count > 0 for count in short)
    # The same statements over the same window: only B-tree depth may differ. A walk over the channel's
    # history would cost about LONG / SHORT (80x) more.
    for s, g in zip(short, long, strict=True):
        assert g <= s * 1.1 + 50, (short, long)

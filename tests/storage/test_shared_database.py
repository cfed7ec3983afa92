"""Several bot processes (shards) on one PostgreSQL database: what must agree between them is the database's.

Each "process" here is its own `open_database` (its own engine and connection pool), as in separate
processes. PostgreSQL only: SQLite is the one-process default, where writers are serialised anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from storage import Database, open_database
from storage.models import Image, MessageImage
from tests.fakes.postgres import postgres_url_or_skip, reset_schema
from tests.storage.conftest import message, png

PROCESSES = 3
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def url() -> AsyncIterator[str]:
    url = postgres_url_or_skip("shared-database tests")
    await reset_schema(url)
    yield url
    await reset_schema(url)


@contextlib.asynccontextmanager
async def processes(url: str, count: int = PROCESSES) -> AsyncIterator[list[Database]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_database(url)) for _ in range(count)]


async def test_processes_starting_together_migrate_once(url: str) -> None:
    # Shards started at the same moment all find an empty database and all try to migrate it. Real processes:
    # Alembic's `context` is a module global, so migrations are never run concurrently inside one process.
    code = "import asyncio, sys\nfrom storage import open_database\n\nasync def main():\n" \
           "    async with open_database(sys.argv[1]):\n        pass\n\nasyncio.run(main())\n"
    starts = [await asyncio.create_subprocess_exec(sys.executable, "-c", code, url, cwd=ROOT,
                                                   stderr=asyncio.subprocess.PIPE) for _ in range(4)]
    results = await asyncio.wait_for(asyncio.gather(*(start.communicate() for start in starts)), 120)
    failures = [err.decode()[-800:] for start, (_, err) in zip(starts, results, strict=True) if start.returncode]
    assert failures == []
    async with open_database(url) as db, db.engine.connect() as connection:
        assert await connection.scalar(text("SELECT count(*) FROM alembic_version")) == 1


async def test_a_duplicate_event_seen_by_several_processes_is_stored_once(url: str) -> None:
    async with processes(url) as dbs:
        results = await asyncio.gather(*(db.store.append_message(message("42", images=(png((9, 9, 9)),)))
                                         for db in dbs for _ in range(3)))
        assert sum(result is not None for result in results) == 1
        assert await dbs[0].store.count_messages("100") == 1


async def test_a_pending_request_is_claimed_by_one_process_only(url: str) -> None:
    async with processes(url) as dbs:
        await dbs[0].store.append_message(message("7", request_state="pending"))
        claims = await asyncio.gather(*(db.store.claim_request("7", "failed") for db in dbs))
        assert claims.count(True) == 1


async def test_shared_image_survives_concurrent_delete_and_append(url: str) -> None:
    """One process deletes the last message that uses a picture while another stores a new one with it.

    Neither may fail, and the picture must stay stored exactly as long as a message links to it.
    """
    shared = png((200, 10, 10))
    rounds = 40

    async def churn(db: Database, who: int) -> None:
        for i in range(rounds):
            platform_id = f"{who}-{i}"
            stored = await db.store.append_message(message(platform_id, channel=f"c{who}", images=(shared,)))
            assert stored is not None and stored.images[0].data == shared.data
            assert await db.store.delete_message(platform_id)

    async with processes(url) as dbs:
        await asyncio.gather(*(churn(db, who) for who, db in enumerate(dbs)))
        await dbs[0].store.append_message(message("last", images=(shared,)))
        [kept] = await dbs[1].store.recent_window("100", 10)
        assert kept.images[0].data == shared.data
        async with dbs[0].sessions() as session:
            assert await session.scalar(select(func.count()).select_from(Image)) == 1
            assert await session.scalar(select(func.count()).select_from(MessageImage)) == 1

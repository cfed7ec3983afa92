"""The database as opened: migrations, pragmas, files, errors, and what storage may import."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.util import greenlet_spawn

from storage import Database, DatabaseUnavailable, open_database
from storage.database import alembic_config
from storage.models import Base
from tests.storage.conftest import message, png


def _schema_diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


async def test_migrations_create_exactly_the_models_schema(database: Database) -> None:
    async with database.engine.connect() as connection:
        diff = await connection.run_sync(_schema_diff)
    assert diff == []


async def test_database_is_at_the_head_revision(database: Database) -> None:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    async with database.engine.connect() as connection:
        current = await connection.scalar(text("SELECT version_num FROM alembic_version"))
    assert current == head == "0002"


async def test_sqlite_pragmas_on_every_connection(sqlite_database: Database) -> None:
    # Two connections at once: the second is new, so the pragmas come from the connect hook each time.
    async with sqlite_database.engine.connect() as first, sqlite_database.engine.connect() as second:
        for connection in (first, second):
            assert await connection.scalar(text("PRAGMA journal_mode")) == "wal"
            assert await connection.scalar(text("PRAGMA foreign_keys")) == 1
            assert await connection.scalar(text("PRAGMA busy_timeout")) == 5000
            assert await connection.scalar(text("PRAGMA synchronous")) == 1  # NORMAL


async def test_sqlite_connection_returned_inside_a_transaction_is_rolled_back(sqlite_database: Database) -> None:
    # The pool's reset rolls back only connections still in a transaction (`_reset_sqlite`): one handed back
    # half-way through a write must not carry that write into the next store call, which would commit it.
    engine = sqlite_database.engine

    def write_and_hand_back() -> bool:
        raw = engine.sync_engine.raw_connection()
        cursor = raw.cursor()
        cursor.execute("INSERT INTO channels (key, created_at) VALUES ('left-open', '2024-01-01 00:00:00')")
        cursor.close()
        in_transaction = bool(raw.driver_connection.in_transaction)  # type: ignore[union-attr]
        raw.close()  # back to the pool without COMMIT or ROLLBACK
        return in_transaction

    assert await greenlet_spawn(write_and_hand_back)
    stored = await sqlite_database.store.append_message(message("1", channel="after"))  # commits its connection
    assert stored is not None
    async with engine.connect() as connection:
        keys = (await connection.scalars(text("SELECT key FROM channels ORDER BY key"))).all()
    assert keys == ["after"]


async def test_parent_folder_of_the_sqlite_file_is_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "bot.sqlite3"
    async with open_database(f"sqlite+aiosqlite:///{path}"):
        pass
    assert path.is_file()


async def test_reopening_keeps_the_data_and_migrates_idempotently(database_url: str) -> None:
    async with open_database(database_url) as db:
        await db.store.append_message(message("1", images=(png((1, 2, 3)),)))
        await db.store.update_channel_settings("100", answer_mode="always")
    for _ in range(2):
        async with open_database(database_url) as db:
            [stored] = await db.store.recent_window("100", 10)
            assert stored.platform_id == "1"
            assert stored.images[0].data == png((1, 2, 3)).data
            assert (await db.store.channel_settings("100")).answer_mode == "always"
            async with db.engine.connect() as connection:
                assert await connection.scalar(text("SELECT count(*) FROM alembic_version")) == 1


async def test_unparsable_url_is_a_storage_error() -> None:
    with pytest.raises(DatabaseUnavailable) as caught:
        async with open_database("not a url"):
            pass
    assert caught.value.user_message


async def test_unreadable_sqlite_location_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DatabaseUnavailable):
        async with open_database(f"sqlite+aiosqlite:///{blocker / 'db.sqlite3'}"):
            pass


@pytest.mark.skipif(
    importlib.util.find_spec("asyncpg") is not None,
    reason="asyncpg is installed: the missing-driver path cannot be reached here",
)
async def test_postgres_url_without_asyncpg_is_a_clear_error() -> None:
    with pytest.raises(DatabaseUnavailable) as caught:
        async with open_database("postgresql+asyncpg://user:secret@localhost/db"):
            pass
    assert "secret" not in str(caught.value)
    assert "postgres" in caught.value.user_message.lower()


def test_storage_imports_no_discord_torch_or_transformers() -> None:
    code = (
        "import sys, storage, storage.store, storage.database, storage.models\n"
        "bad = [m for m in ('discord', 'torch', 'transformers', 'bot', 'model_server') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


async def test_a_database_of_the_first_schema_is_upgraded_with_its_rows(tmp_path: Path) -> None:
    """0001 -> 0002 (`messages.partial_reply_id`): a pending request of the old schema stays, with no partial."""
    from alembic import command
    from sqlalchemy.ext.asyncio import create_async_engine

    url = f"sqlite+aiosqlite:///{tmp_path / 'old.sqlite3'}"
    engine = create_async_engine(url)
    async with engine.begin() as connection:
        await connection.run_sync(lambda sync: command.upgrade(alembic_config(sync), "0001"))
        await connection.execute(text("INSERT INTO channels (key, created_at) VALUES ('100', '2026-01-01')"))
        await connection.execute(text(
            "INSERT INTO messages (platform_id, channel_id, role, author_id, author_name, text, created_at, "
            "request_state) VALUES ('1', 1, 'user', 'u', 'u', 'hello', '2026-01-01', 'pending')"))
    await engine.dispose()
    async with open_database(url) as db:
        old = await db.store.get_message("1")
        assert old is not None and old.request_state == "pending" and old.partial_reply_id is None
        assert await db.store.set_partial_reply("1", "2")
        assert (await db.store.get_message("1")).partial_reply_id == "2"  # type: ignore[union-attr]

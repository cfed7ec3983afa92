"""Opening a database: engine, SQLite pragmas, Alembic migrations, and the `Store` built on top.

    async with open_database(settings.database_url) as db:
        await db.store.append_message(...)

`main()` opens it once and hands `db.store` down (one engine per process); the engine is disposed when
the block exits.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import URL, Connection, event, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import PoolResetState

from storage.errors import DatabaseUnavailable
from storage.store import DEFAULT_MAX_IMAGE_BYTES, Store

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

MIGRATION_LOCK_KEY = 0x1DEF1C5
"""PostgreSQL advisory lock held while migrating (any fixed number, the same in every process of the bot)."""

DEFAULT_BUSY_TIMEOUT_MS = 5000
"""How long an SQLite connection waits for another writer's lock before "database is locked"."""

CONNECT_TIMEOUT_S = 5.0
"""How long opening one connection to a database server may take (asyncpg), before it counts as unreachable."""

# Run after `PRAGMA busy_timeout`, so that switching the journal mode waits for a lock instead of failing.
# WAL lets readers (window loads) run while a writer appends; NORMAL is durable enough in WAL mode (a
# power cut may lose the last commits, never corrupt) and saves one fsync per commit.
SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",  # off by default in SQLite; the ON DELETE CASCADEs depend on it
)


@dataclass(frozen=True)
class Database:
    """An open database. `store` is the whole query API; `engine` and `sessions` are for tests and tools."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    store: Store


@asynccontextmanager
async def open_database(
    url: str,
    *,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    lock_retries: int = 3,
) -> AsyncIterator[Database]:
    """Open (creating if needed) and migrate the database at `url`; dispose of the engine on exit.

    `url`: an SQLAlchemy async URL, e.g. `sqlite+aiosqlite:///./data/idefics-bot.sqlite3` or
    `postgresql+asyncpg://user:pass@host/db` (needs the `postgres` extra).
    `max_image_bytes`: the store refuses larger image blobs with `ImageTooLarge`.
    `busy_timeout_ms` (SQLite only): how long one attempt waits for another writer's lock.
    `lock_retries`: attempts after the first when a write still finds the database locked; then the
    store raises `DatabaseBusy` (see `storage.retry`). The worst case is about
    `(lock_retries + 1) * busy_timeout_ms` plus the backoff pauses (under 2 s with the defaults).
    """
    try:
        sa_url = make_url(url)
    except ArgumentError as exc:
        raise DatabaseUnavailable(detail=f"cannot parse database URL: {exc}") from exc
    shown = sa_url.render_as_string(hide_password=True)
    engine = _create_engine(sa_url, busy_timeout_ms)
    try:
        try:
            await _migrate(engine)
        except (DBAPIError, OSError) as exc:
            raise DatabaseUnavailable(detail=f"cannot open or migrate {shown}: {exc}") from exc
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        log.info("database open: %s", shown)
        yield Database(
            engine=engine,
            sessions=sessions,
            store=Store(sessions, engine=engine, max_image_bytes=max_image_bytes, lock_retries=lock_retries),
        )
    finally:
        await engine.dispose()


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config built in code (no alembic.ini needed at run time).

    With `connection`, `migrations/env.py` runs on it instead of opening its own engine.
    """
    config = Config()
    # ConfigParser interpolation: a literal % in the path must be doubled.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _create_engine(url: URL, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> AsyncEngine:
    is_sqlite = url.get_backend_name() == "sqlite"
    if is_sqlite:
        _make_parent_folder(url)
    # A server (PostgreSQL) can restart under us and end every pooled connection: `pool_pre_ping` checks a
    # pooled connection at checkout (one short round trip, lost in the noise next to a store call) and
    # replaces it, and every older one, when the server has gone. A SQLite file has no server to lose;
    # pinging it would only cost a trip to aiosqlite's thread per call.
    connect_args: dict[str, Any] = {}
    if url.get_driver_name() == "asyncpg":
        # asyncpg waits 60 s for a connection by default; a server that does not answer (a host that is
        # down) must fail a call within seconds, like a refused one (`storage.retry`).
        connect_args["timeout"] = CONNECT_TIMEOUT_S
    try:
        # The driver (aiosqlite, asyncpg) is imported here, on demand: a SQLite install needs no asyncpg.
        # SQLite: the pool's own reset (an unconditional ROLLBACK) is replaced by `_reset_sqlite`.
        engine = create_async_engine(url, pool_pre_ping=not is_sqlite, connect_args=connect_args,
                                     pool_reset_on_return=None if is_sqlite else "rollback")
    except ImportError as exc:
        raise DatabaseUnavailable(
            "The database driver is missing (PostgreSQL: pip install 'idefics-bot[postgres]').",
            detail=f"database driver for {url.drivername} is not installed: {exc}",
        ) from exc
    if is_sqlite:
        event.listen(engine.sync_engine, "connect", functools.partial(_set_sqlite_pragmas, busy_timeout_ms))
        event.listen(engine.sync_engine, "reset", _reset_sqlite)
    return engine


def _make_parent_folder(url: URL) -> None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    try:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseUnavailable(detail=f"cannot create the folder of {database}: {exc}") from exc


def _set_sqlite_pragmas(busy_timeout_ms: int, dbapi_connection: Any, _record: Any) -> None:
    # Per connection: these pragmas (except journal_mode) do not persist in the file.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
    finally:
        cursor.close()


def _reset_sqlite(dbapi_connection: Any, record: Any, state: PoolResetState) -> None:
    """A SQLite connection back in the pool: roll back only if it is still in a transaction.

    The pool's usual reset is a ROLLBACK on every return, and on aiosqlite each one is a trip to the
    connection's thread: one per store call (two per message handled, and more), almost always for nothing,
    since the session has already committed or rolled back. SQLite says whether a transaction is open
    (`in_transaction`, read without a trip); a connection left in one is rolled back as before.
    """
    if state.terminate_only or not state.asyncio_safe:
        return  # the pool closes this connection instead, which ends any transaction
    driver = getattr(record, "driver_connection", None)
    if driver is None or driver.in_transaction:
        dbapi_connection.rollback()


async def _migrate(engine: AsyncEngine) -> None:
    """Upgrade to the latest revision, on a connection of `engine` (idempotent)."""
    is_sqlite = engine.dialect.name == "sqlite"
    async with engine.connect() as connection:
        if is_sqlite:
            # SQLite "batch" migrations copy a table and drop the old one; with foreign keys on, that DROP
            # would cascade into the rows that reference it. The pragma only takes effect outside a
            # transaction, hence here and after the commit below.
            await connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        elif engine.dialect.name == "postgresql":
            # Several processes (shards) starting together would each find an empty or old schema and
            # migrate it at once: the losers fail on CREATE TABLE. A transaction-scoped advisory lock makes
            # them take turns; PostgreSQL's DDL is transactional, so the next one sees the schema at head.
            await connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
        await connection.run_sync(_upgrade)
        await connection.commit()
        if is_sqlite:
            await connection.exec_driver_sql("PRAGMA foreign_keys=ON")  # back before the pool reuses it


def _upgrade(connection: Connection) -> None:
    command.upgrade(alembic_config(connection), "head")

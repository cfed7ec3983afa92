"""Running tests against a real PostgreSQL as well as SQLite.

`TEST_DATABASE_URL` (e.g. `postgresql+asyncpg://user:pass@127.0.0.1:5432/idefics_test`) names a database the
tests may wipe: its `public` schema is dropped and recreated before and after every test that uses it. Its
name must contain "test", so that a production `DATABASE_URL` pasted by mistake is refused, not wiped.
`tests/fakes/postgres/with-postgres.sh CMD` starts a throwaway server and sets it; `.ci/run` does that for CI.

Without it, the PostgreSQL variant of each test is skipped with a reason that `-ra` prints in the summary.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import make_url
from sqlalchemy.ext.asyncio import create_async_engine

ENV = "TEST_DATABASE_URL"
BACKENDS = ("sqlite", "postgresql")
"""The `params` of every database-URL fixture: the SQLite variant always runs, the other needs ENV."""


def postgres_url_or_skip(what: str) -> str:
    """The URL in TEST_DATABASE_URL, or skip the calling test (saying why) when it is not set."""
    url = os.environ.get(ENV, "").strip()
    if not url:
        pytest.skip(f"{ENV} is not set: {what} not run against PostgreSQL (see tests/fakes/postgres/with-postgres.sh)")
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        pytest.fail(f"{ENV} must be a postgresql+asyncpg:// URL, not {parsed.drivername}")
    if "test" not in (parsed.database or ""):
        pytest.fail(f"{ENV} names database {parsed.database!r}: the tests wipe it, so its name must contain 'test'")
    return url


async def reset_schema(url: str) -> None:
    """Leave the database empty: drop and recreate its `public` schema (tables, sequences, alembic_version).

    One statement whatever the schema holds, so each test starts from a fresh migration quickly.
    """
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            # A test that failed half-way may have left connections (and their locks) behind: end them, and
            # never wait long for a lock, so one broken test cannot hang the rest of the run.
            await connection.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            await connection.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
            await connection.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
            await connection.exec_driver_sql("CREATE SCHEMA public")
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def backend_database_url(backend: str, sqlite_path: Path, what: str) -> AsyncIterator[str]:
    """The body of every database-URL fixture: a SQLite file at `sqlite_path`, or (with TEST_DATABASE_URL) an
    emptied PostgreSQL database, emptied again afterwards; `what` names the tests in the skip reason."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{sqlite_path}"
        return
    url = postgres_url_or_skip(what)
    await reset_schema(url)
    yield url
    await reset_schema(url)

"""Storage fixtures: a database URL (SQLite file, plus `TEST_DATABASE_URL` when set), then an open database.

Every test that takes `database` or `store` runs once per backend. Without `TEST_DATABASE_URL` the second
run is skipped with its reason shown in the summary (`-ra`), so a missing PostgreSQL is never silent.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from typing import Any

import pytest
from PIL import Image

from storage import Database, ImageBlob, NewMessage, Store, open_database
from tests.fakes.postgres import BACKENDS, backend_database_url

MAX_IMAGE_BYTES = 64 * 1024
"""The bound the test store enforces: small, so `ImageTooLarge` is cheap to reach."""


@pytest.fixture(params=BACKENDS)
async def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[str]:
    # A folder that does not exist yet: open_database must create it.
    async with backend_database_url(request.param, tmp_path / "data" / "idefics-bot.sqlite3", "storage tests") as url:
        yield url


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    async with open_database(database_url, max_image_bytes=MAX_IMAGE_BYTES) as db:
        yield db


@pytest.fixture
async def store(database: Database) -> Store:
    return database.store


@pytest.fixture
async def sqlite_database(tmp_path: Any) -> AsyncIterator[Database]:
    """SQLite only: for what is SQLite's own (pragmas, EXPLAIN QUERY PLAN)."""
    async with open_database(f"sqlite+aiosqlite:///{tmp_path / 'sqlite.db'}") as db:
        yield db


def png(color: tuple[int, int, int], size: tuple[int, int] = (4, 3)) -> ImageBlob:
    """A real, tiny PNG: what the bot hands in after checking and re-encoding an attachment."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return ImageBlob(data=buffer.getvalue(), mime="image/png", width=size[0], height=size[1])


def message(platform_id: str, channel: str = "100", author: str = "u1", **fields: Any) -> NewMessage:
    fields.setdefault("role", "user")
    fields.setdefault("author_name", f"name-{author}")
    fields.setdefault("text", f"text of {platform_id}")
    return NewMessage(platform_id=platform_id, channel_key=channel, author_id=author, **fields)


def reply(platform_id: str, to: str, channel: str = "100", **fields: Any) -> NewMessage:
    """An assistant answer to message `to`."""
    return message(platform_id, channel, author="bot", role="assistant", reply_to=to, **fields)

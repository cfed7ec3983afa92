"""Pytest fixture for other test folders.

In a conftest: ``from tests.fakes.discord_api.fixtures import fake_discord  # noqa: F401``.

The fixture yields a started :class:`FakeDiscord` with discord.py patched to use it and ``fake.world``
(a :class:`DefaultWorld`): guild "Test Guild", text channels "general" and "images", a thread under general
(with a starter message), a moderator member (Manage Channels), a regular member and a DM with the member.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from .server import FakeDiscord


@pytest_asyncio.fixture
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as fake:
        fake.build_default_world()
        with fake.patch_discord():
            yield fake

"""Fixtures for the TGI backend: a started loopback fake TGI -> a config with short timeouts -> an executor."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from model_server.tgi import TgiConfig, TgiExecutor
from tests.fakes.discord_api.fixtures import fake_discord  # noqa: F401
from tests.fakes.tgi import FakeTgi


@pytest.fixture
async def fake_tgi() -> AsyncIterator[FakeTgi]:
    async with FakeTgi() as fake:
        yield fake
        assert fake.problems == [], "requests the fake TGI found invalid"


@pytest.fixture
def tgi_config(fake_tgi: FakeTgi) -> TgiConfig:
    """Short timeouts and backoffs, so failure cases take a fraction of a second."""
    return TgiConfig(url=fake_tgi.url, max_batch_size=4, max_queue=8, request_timeout_s=10.0,
                     connect_timeout_s=2.0, stall_s=0.5, max_retries=2, backoff_s=0.02, start_wait_s=0.0)


@pytest.fixture
async def tgi(tgi_config: TgiConfig) -> AsyncIterator[TgiExecutor]:
    async with TgiExecutor(tgi_config) as executor:
        yield executor

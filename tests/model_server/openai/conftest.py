"""Fixtures for the OpenAI-compatible backend: a loopback fake server -> a config with short timeouts -> an
executor; and the same fake on a thread of its own, for the terminal commands (which run their own event loop)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from model_server.openai import OpenAIConfig, OpenAIExecutor
from tests.fakes.discord_api.fixtures import fake_discord  # noqa: F401
from tests.fakes.openai_server import MODEL_ID, FakeOpenAI


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as fake:
        yield fake
        assert fake.problems == [], "requests the fake server found invalid"


def short_config(url: str, **overrides) -> OpenAIConfig:
    """Short timeouts and backoffs, so failure cases take a fraction of a second."""
    values = dict(url=url, max_batch_size=4, max_queue=8, request_timeout_s=10.0, connect_timeout_s=2.0,
                  stall_s=0.5, max_retries=2, backoff_s=0.02, start_wait_s=0.0, model=MODEL_ID)
    values.update(overrides)
    return OpenAIConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
async def openai_backend(fake_openai: FakeOpenAI) -> AsyncIterator[OpenAIExecutor]:
    async with OpenAIExecutor(short_config(fake_openai.url)) as executor:
        yield executor


@pytest.fixture
def threaded_fake_openai() -> Iterator[FakeOpenAI]:
    """A fake server on its own thread and loop, for code that calls `asyncio.run` itself."""
    loop = asyncio.new_event_loop()
    fake = FakeOpenAI()
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(fake.__aenter__())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    yield fake
    asyncio.run_coroutine_threadsafe(fake.__aexit__(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()
    assert fake.problems == []

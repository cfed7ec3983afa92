"""Fixtures for the OpenAI-compatible backend: a loopback fake server -> a config with short timeouts -> an
executor."""

from __future__ import annotations

from collections.abc import AsyncIterator

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

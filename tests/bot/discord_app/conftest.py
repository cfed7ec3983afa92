"""Layered fixtures for the Discord bot: settings -> services (tiny model, temp SQLite or PostgreSQL) -> the real
bot running against the loopback fake Discord.

The tiny model is loaded once per session (`engine` in tests/conftest.py); each test gets its own executor,
database and bot, so no queue or history leaks from one test into another.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bot.discord_app.client import IdeficsBot
from bot.images.addresses import create_session
from bot.images.fetch import ImageFetcher
from bot.pipeline.conversation import Conversation, ModelInfo
from bot.pipeline.services import Services
from bot.settings import Settings
from model_server.executor import Executor
from storage import open_database
from tests.conftest import noise_image
from tests.fakes.discord_api import DefaultWorld, FakeDiscord
from tests.fakes.discord_api.fixtures import fake_discord  # noqa: F401
from tests.fakes.postgres import BACKENDS, backend_database_url

FAST_EDIT_INTERVAL_S = 0.05
"""Streaming edits in tests: short enough to be quick, long enough that several deltas share an edit."""


@pytest.fixture(params=BACKENDS)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A temp SQLite file, then (with `TEST_DATABASE_URL`) the same test on an emptied PostgreSQL."""
    async with backend_database_url(request.param, tmp_path / "bot.sqlite3", "Discord tests") as url:
        yield url


@pytest.fixture
def bot_settings(database_url: str, model_config: Any) -> Settings:
    """Settings as `idefics-bot run` would read them, pointed at the tiny model and a temp database."""
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        discord_token="fake-discord-token",
        idefics_model=model_config.model,
        idefics_device="cpu",
        database_url=database_url,
        max_new_tokens=12,
        stream_edit_interval_s=FAST_EDIT_INTERVAL_S,
        batch_window_ms=20,
        user_max_inflight=2,
        user_max_per_minute=30,
    )


@contextlib.asynccontextmanager
async def open_test_services(settings: Settings, engine: Any, model_config: Any, loaded_model: Any, *,
                             batch_window_s: float | None = None) -> AsyncIterator[Services]:
    """`open_services` without reloading the model: the session's engine, a fresh executor and database.

    The fetcher may reach loopback addresses: the fake Discord serves attachments and linked images there.
    """
    window = settings.batch_window_ms / 1000 if batch_window_s is None else batch_window_s
    async with contextlib.AsyncExitStack() as stack:
        database = await stack.enter_async_context(open_database(settings.database_url,
                                                                 max_image_bytes=settings.max_image_bytes))
        session = create_session(allow_private=True)
        stack.push_async_callback(session.close)
        fetcher = ImageFetcher(session, settings.image_limits(), allow_private=True)
        executor = await stack.enter_async_context(Executor(engine, model_config, batch_window_s=window))
        info = ModelInfo(name=model_config.model, instruct=loaded_model.instruct,
                         max_positions=loaded_model.max_positions, count_tokens=loaded_model.count_tokens)
        conversation = Conversation(database.store, executor, info, settings.chat_defaults())
        yield Services(settings, database, executor, info, fetcher, conversation)


@pytest.fixture
def services_factory(engine: Any, model_config: Any, loaded_model: Any) -> Callable[..., Any]:
    """`services_factory(settings, batch_window_s=...)`: an async context manager of `Services`."""

    def make(settings: Settings, *, batch_window_s: float | None = None) -> Any:
        return open_test_services(settings, engine, model_config, loaded_model, batch_window_s=batch_window_s)

    return make


@pytest.fixture
async def services(bot_settings: Settings, services_factory: Callable[..., Any]) -> AsyncIterator[Services]:
    async with services_factory(bot_settings) as opened:
        yield opened


@dataclass
class RunningBot:
    fake: FakeDiscord
    bot: IdeficsBot
    services: Services
    world: DefaultWorld
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def store(self) -> Any:
        return self.services.conversation.store


@contextlib.asynccontextmanager
async def run_bot(fake: FakeDiscord, services: Services) -> AsyncIterator[RunningBot]:
    bot = IdeficsBot(services, guild_ready_timeout=0.01)
    async with fake.running(bot):
        yield RunningBot(fake=fake, bot=bot, services=services, world=fake.world)


@pytest.fixture
async def running_bot(fake_discord: FakeDiscord, services: Services) -> AsyncIterator[RunningBot]:  # noqa: F811
    """The real `IdeficsBot`, logged in to the fake Discord with the default world, ready."""
    async with run_bot(fake_discord, services) as running:
        yield running


def png_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A noise picture (distinct per seed) as PNG bytes."""
    out = io.BytesIO()
    noise_image(seed, size).save(out, "PNG")
    return out.getvalue()


def add_image_attachment(fake: FakeDiscord, seed: int = 1, filename: str = "photo.png",
                         size: tuple[int, int] = (40, 30)) -> dict[str, Any]:
    """Register a noise PNG with the fake; returns the attachment payload to pass to `send_message_as`."""
    return fake.add_attachment(png_bytes(seed, size), filename, "image/png", width=size[0], height=size[1])


@pytest.fixture
def image_attachment(fake_discord: FakeDiscord) -> Callable[..., dict[str, Any]]:  # noqa: F811
    """`image_attachment(seed=1, filename="photo.png")`: a registered noise PNG attachment payload."""

    def make(seed: int = 1, filename: str = "photo.png", size: tuple[int, int] = (40, 30)) -> dict[str, Any]:
        return add_image_attachment(fake_discord, seed, filename, size)

    return make


async def eventually(check: Callable[[], Any], within: float = 15.0, what: str = "condition") -> Any:
    """Poll an async (or plain) check until it returns something truthy; fail after `within` seconds."""
    import asyncio
    import inspect

    try:
        async with asyncio.timeout(within):
            while True:
                value = check()
                if inspect.isawaitable(value):
                    value = await value
                if value:
                    return value
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {within}s waiting for {what}") from None


async def settle(running: RunningBot, within: float = 20.0) -> None:
    """Wait until the bot has no message being recorded or answered."""
    await running.fake.wait_for(lambda: running.bot.tasks_running == 0, within, "bot idle")


async def answer_to(running: RunningBot, channel: Any, asked: Any, within: float = 20.0) -> Any:
    """The bot's final answer (replying to `asked`), once its task is done."""
    fake = running.fake

    def find() -> Any:
        return next((m for m in fake.sent_messages(channel)
                     if m.message_reference and int(m.message_reference["message_id"]) == asked.id), None)

    await fake.wait_for(find, within, f"answer to {asked.id}")
    await settle(running, within)
    return find()


def spy_prompts(services: Services) -> list[Any]:
    """Record every prompt submitted to the executor (the call itself is what such tests check)."""
    prompts: list[Any] = []
    executor = services.executor
    assert executor is not None
    submit = executor.submit

    def recording(prompt: Any, **kwargs: Any) -> Any:
        prompts.append(prompt)
        return submit(prompt, **kwargs)

    executor.submit = recording  # type: ignore[method-assign]
    return prompts

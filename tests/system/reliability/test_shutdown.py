"""Stop: SIGTERM/SIGINT stop new answers, let running ones finish within `SHUTDOWN_GRACE_S` or cancel them with
a short notice (their requests stay "pending" for the next start), close everything and exit 0. A model
that fails beyond recovery stops the bot with exit status 1, for its supervisor to restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import bot.discord_app.app
from bot.discord_app.answering import RESTARTING
from bot.discord_app.app import serve
from bot.pipeline.services import Services
from bot.settings import Settings
from storage import open_database
from tests.fakes.discord_api import FakeDiscord
from tests.system.reliability.bot_process import (
    bot_env,
    bot_process,
    final_answer,
    replies_to,
    sqlite_url,
    stored,
    wait_for_state,
)

EXIT_MARGIN_S = 15.0
"""Time allowed past the grace period to close the connection, the executor and the database."""


async def test_sigterm_lets_the_running_answer_finish_and_exits_0(
    fake_discord: FakeDiscord, tiny_model_path: Path, tmp_path: Path
) -> None:
    fake, world = fake_discord, fake_discord.world
    url = sqlite_url(tmp_path)
    grace = 30.0
    env = bot_env(fake, tiny_model_path, url, SHUTDOWN_GRACE_S=grace)
    path = f"/channels/{world.general.id}/messages"
    async with bot_process(env, tmp_path, "bot") as bot:
        await bot.wait_ready()
        fake.delay_next("POST", path, 3.0)  # the answer is still on its way when the signal comes
        asked = await fake.send_message_as(world.member, world.general, "describe a dog", mentions_bot=True)
        await fake.wait_for(lambda: fake.requests_to("POST", path), 60, "the answer to start")
        os.kill(bot.pid, signal.SIGTERM)
        started = time.monotonic()
        await bot.wait_for_log("shutting down:", 10)
        late = await fake.send_message_as(world.member, world.general, "one more?", mentions_bot=True)
        await bot.wait_for_log("recorded during shutdown", 10)
        assert await bot.wait_exit(grace + EXIT_MARGIN_S) == 0
        assert time.monotonic() - started < grace
    answer = next(m for m in replies_to(fake, asked) if final_answer(asked)(m))
    request = await stored(url, str(asked.id))
    assert request is not None and request.request_state == "answered"
    async with open_database(url) as db:
        window = await db.store.recent_window(str(world.general.id), 10)
    assert [m.text for m in window if m.role == "assistant"] == [answer.content]  # delivered complete
    # The message that came during the shutdown is kept, not started: the next start answers it.
    assert replies_to(fake, late) == []
    left = await stored(url, str(late.id))
    assert left is not None and left.request_state == "pending"


async def test_sigint_past_the_grace_cancels_tells_the_user_and_the_restart_answers_in_that_message(
    fake_discord: FakeDiscord, tiny_model_path: Path, tmp_path: Path
) -> None:
    fake, world = fake_discord, fake_discord.world
    url = sqlite_url(tmp_path)
    grace = 1.0
    path = f"/channels/{world.dm.id}/messages"
    async with bot_process(bot_env(fake, tiny_model_path, url, SHUTDOWN_GRACE_S=grace), tmp_path, "first") as bot:
        await bot.wait_ready()
        fake.inject_fault("POST", path, status=503, delay=600)  # the answer cannot be delivered in time
        asked = await fake.send_message_as(world.member, world.dm, "what is in the sky?")
        await fake.wait_for(lambda: fake.requests_to("POST", path), 60, "the answer to start")
        assert await bot.stop(signal.SIGINT, within=grace + EXIT_MARGIN_S) == 0
    [notice] = replies_to(fake, asked)
    assert notice.content == RESTARTING and notice.allowed_mentions == {"parse": []}
    cut_off = await stored(url, str(asked.id))
    assert cut_off is not None and cut_off.request_state == "pending"
    assert cut_off.partial_reply_id == str(notice.id)

    # The notice promised the answer: the restart gives it, in that very message (no "ask again", no second one).
    async with bot_process(bot_env(fake, tiny_model_path, url), tmp_path, "second") as bot:
        await wait_for_state(url, asked, "answered")
        await bot.wait_ready()
        assert [m.id for m in replies_to(fake, asked)] == [notice.id]
        assert notice.content != RESTARTING and final_answer(asked)(notice)
        assert all(e.get("allowed_mentions") == {"parse": []} for e in fake.edits_of(notice))
        answer = await stored(url, str(notice.id))
        assert answer is not None and answer.role == "assistant" and answer.text == notice.content
        assert await bot.stop() == 0


async def test_a_fatal_model_fault_stops_the_bot_with_status_1(
    fake_discord: FakeDiscord, bot_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[Services] = []
    open_services = bot.discord_app.app.open_services

    @contextlib.asynccontextmanager
    async def keeping(*args: Any, **kwargs: Any) -> AsyncIterator[Services]:
        async with open_services(*args, **kwargs) as services:
            opened.append(services)
            yield services

    monkeypatch.setattr(bot.discord_app.app, "open_services", keeping)
    server = asyncio.create_task(serve(bot_settings))
    await fake_discord.wait_for(lambda: fake_discord.identify_count == 1, 60, "login")
    executor = opened[0].executor
    assert executor is not None and executor.on_fatal is not None
    # The executor's watchdog calls the hook from its own thread.
    threading.Thread(target=executor.on_fatal, args=("model thread stuck for 240 s",)).start()
    assert await asyncio.wait_for(server, 30) == 1
    assert executor.on_fatal is None

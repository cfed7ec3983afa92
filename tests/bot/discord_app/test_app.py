"""`serve()`, what `idefics-bot run` calls: the whole start-up path against the fake Discord, then SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal

from bot.discord_app.app import serve
from bot.settings import Settings
from tests.bot.discord_app.conftest import add_image_attachment
from tests.fakes.discord_api import FakeDiscord


async def test_serve_answers_a_mention_with_an_image_and_stops_on_sigterm(
    fake_discord: FakeDiscord, bot_settings: Settings
) -> None:
    world = fake_discord.world
    server = asyncio.create_task(serve(bot_settings))
    # Ready once the slash commands are synced (setup_hook) and the gateway said READY.
    await fake_discord.wait_for(lambda: fake_discord.identify_count == 1, 30, "login")
    await asyncio.sleep(0.2)
    asked = await fake_discord.send_message_as(world.member, world.general, "what is this?",
                                               attachments=[add_image_attachment(fake_discord, seed=9)],
                                               mentions_bot=True)
    answer = await fake_discord.wait_for_message(
        world.general, lambda m: int((m.message_reference or {}).get("message_id", 0)) == asked.id, 30)
    assert answer.allowed_mentions == {"parse": []}
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(server, 30) == 0

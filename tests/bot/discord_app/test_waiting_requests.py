"""Requests while they wait their turn or run: the channel moving on meanwhile, the user leaving meanwhile.

The real bot against the fake Discord, with the tiny model held (`stuck_forward`) so that the waiting is certain
on any machine.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bot.pipeline.conversation import WITHDRAWN
from model_server.prompt import prompt_text
from tests.bot.discord_app.conftest import answer_to, eventually, run_bot, settle, spy_prompts
from tests.bot.discord_app.test_commands import answered, slash
from tests.fakes.faults import stuck_forward


async def test_a_request_that_waited_while_the_channel_moved_on_is_answered_from_its_own_window(
    fake_discord: Any, bot_settings: Any, services_factory: Any, engine: Any
) -> None:
    """More than `HISTORY_MESSAGES` messages come while a request waits behind another: its window still ends at
    it, and still holds the answer before it (stored after it, when the model let go)."""
    fake, world = fake_discord, fake_discord.world
    settings = bot_settings.model_copy(update={"history_messages": 4})
    with stuck_forward(engine) as gate:
        async with services_factory(settings) as services, run_bot(fake, services) as running:
            prompts = spy_prompts(services)
            first = await fake.send_message_as(world.member, world.general, "first question", mentions_bot=True)
            await eventually(lambda: prompts, what="the first request at the model")
            second = await fake.send_message_as(world.moderator, world.general, "second question",
                                                mentions_bot=True)
            for i in range(6):
                await fake.send_message_as(world.member, world.general, f"chatter {i}")
            channel = str(world.general.id)
            await eventually(lambda: _count_is(running.store, channel, 8), what="the chatter stored")
            gate.set()
            await answer_to(running, world.general, first)
            answer = await answer_to(running, world.general, second)

            request = await running.store.get_message(str(second.id))
            assert request.request_state == "answered"
            stored_answer = await running.store.get_message(str(answer.id))
            assert stored_answer is not None and stored_answer.reply_to == str(second.id)
            assert len(prompts) == 2
            text = prompt_text(prompts[1].items)
            assert "chatter" not in text
            assert text.index("first question") < text.index("second question")
            # The first answer sits between the two questions, and the prompt ends on the second one.
            assert text.count("Assistant:") == 2 and text.rstrip().endswith("Assistant:")


async def _count_is(store: Any, channel: str, count: int) -> bool:
    return bool(await store.count_messages(channel) == count)


async def test_forget_me_stops_the_callers_running_answer_and_nothing_of_it_is_stored(
    fake_discord: Any, bot_settings: Any, services_factory: Any, engine: Any
) -> None:
    """`/forget-me` while the caller's answer is at the model: the answer is stopped, not stored afterwards,
    and its place says why; another user's answer in the same batch is not touched."""
    fake, world = fake_discord, fake_discord.world
    with stuck_forward(engine) as gate:
        async with services_factory(bot_settings) as services, run_bot(fake, services) as running:
            store = running.store
            prompts = spy_prompts(services)
            asked = await fake.send_message_as(world.member, world.dm, "describe a cat")
            other = await fake.send_message_as(world.moderator, world.images, "describe a dog", mentions_bot=True)
            await eventually(lambda: len(prompts) == 2, what="both requests at the model")
            forget = asyncio.ensure_future(slash(running, "forget-me", channel=world.general, member=world.member))
            await eventually(lambda: _gone(store, str(asked.id)), what="the caller's question erased")
            gate.set()  # the model goes on: the caller's answer would come now
            record = await forget
            assert answered(record, ephemeral=True).startswith("Done: 1 message of yours")
            # Once /forget-me returned, nothing of the caller is stored, nor stored later.
            await settle(running)
            assert await store.count_messages(str(world.dm.id)) == 0
            assert [m.content for m in fake.sent_messages(world.dm)] == [WITHDRAWN]
            kept = await answer_to(running, world.images, other)
            assert (await store.get_message(str(kept.id))).reply_to == str(other.id)
            assert (await store.get_message(str(other.id))).request_state == "answered"


async def _gone(store: Any, platform_id: str) -> bool:
    return await store.get_message(platform_id) is None

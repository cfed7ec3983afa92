"""Gateway drops: discord.py resumes (or identifies again); no event is answered twice and none is lost.

Discord delivers gateway events at least once: a resume replays what the client may not have seen, and a new
session can bring an event again. The bot's guard is the stored platform id (a message is recorded once; a
second MESSAGE_CREATE for it is a duplicate and starts nothing).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from tests.bot.discord_app.conftest import RunningBot, answer_to, eventually, settle
from tests.fakes.discord_api import FakeDiscord, MessageRecord
from tests.system.reliability.bot_process import replies_to

DUPLICATE = "already stored: duplicate event"


def dispatched_seq(fake: FakeDiscord, message: MessageRecord) -> int:
    """The sequence number the fake gave the MESSAGE_CREATE of `message` (from its own replay buffer)."""
    for session in fake._sessions.values():
        for frame in session.buffer:
            if frame["t"] == "MESSAGE_CREATE" and frame["d"]["id"] == str(message.id):
                return int(frame["s"])
    raise AssertionError(f"message {message.id} was never dispatched")


def duplicates_logged(caplog: pytest.LogCaptureFixture, message: MessageRecord) -> int:
    return sum(1 for r in caplog.records if DUPLICATE in r.getMessage() and str(message.id) in r.getMessage())


@pytest.fixture(autouse=True)
def _log_duplicates(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bot.pipeline.conversation")


async def test_events_replayed_by_a_resume_are_answered_once(
    running_bot: RunningBot, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake, world = running_bot.fake, running_bot.world
    path = f"/channels/{world.general.id}/messages"
    fake.delay_next("POST", path, 1.0)  # the answer is still on its way when the connection drops
    asked = await fake.send_message_as(world.member, world.general, "tell me about dogs", mentions_bot=True)
    replay_from = dispatched_seq(fake, asked) - 1
    original = fake._resume

    async def resume_replaying(conn: Any, data: dict[str, Any]) -> None:
        # As if the client's acknowledgement was lost: the resume sends the message's event again.
        await original(conn, {**data, "seq": replay_from})

    monkeypatch.setattr(fake, "_resume", resume_replaying)
    await fake.wait_for(lambda: fake.requests_to("POST", path), 10, "the answer to start")
    await fake.close_gateway(4000)
    await fake.wait_for(lambda: fake.resume_count == 1, 15, "the bot to resume")
    await eventually(lambda: duplicates_logged(caplog, asked), what="the replayed event")
    answer = await answer_to(running_bot, world.general, asked)
    await settle(running_bot)
    assert [m.id for m in replies_to(fake, asked)] == [answer.id]
    assert fake.identify_count == 1 and duplicates_logged(caplog, asked) == 1
    assert (await running_bot.store.get_message(str(asked.id))).request_state == "answered"
    assert await running_bot.store.count_messages(str(world.general.id)) == 2


async def test_the_same_event_in_a_new_session_is_answered_once(
    running_bot: RunningBot, caplog: pytest.LogCaptureFixture
) -> None:
    fake, world = running_bot.fake, running_bot.world
    asked = await fake.send_message_as(world.member, world.general, "what is a cat?", mentions_bot=True)
    answer = await answer_to(running_bot, world.general, asked)
    await fake.close_gateway(4009)  # session timed out: the resume is refused, discord.py identifies again
    await fake.wait_for(lambda: fake.identify_count == 2, 15, "a new session")
    await fake.wait_for(lambda: any(s.conn is not None for s in fake._sessions.values() if s.valid), 15,
                        "the new session to be connected")
    assert await fake.dispatch("MESSAGE_CREATE", asked.payload) == 1
    await eventually(lambda: duplicates_logged(caplog, asked), what="the repeated event")
    await settle(running_bot)
    assert [m.id for m in replies_to(fake, asked)] == [answer.id]
    # The bot still answers new messages in the new session.
    after = await fake.send_message_as(world.member, world.general, "and a dog?", mentions_bot=True)
    await answer_to(running_bot, world.general, after)


async def test_a_message_sent_while_disconnected_is_answered_after_the_resume(
    running_bot: RunningBot, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, world = running_bot.fake, running_bot.world
    reconnect = asyncio.Event()
    original = fake._resume

    async def held_resume(conn: Any, data: dict[str, Any]) -> None:
        await reconnect.wait()  # the bot stays disconnected until the message below was sent
        await original(conn, data)

    monkeypatch.setattr(fake, "_resume", held_resume)
    frames = len(fake.gateway_frames)
    await fake.close_gateway(4000)
    await fake.wait_for_gateway_op(6, 15, start=frames)  # the bot asks to resume...
    asked = await fake.send_message_as(world.member, world.general, "are you back?", mentions_bot=True)
    assert all(s.conn is None for s in fake._sessions.values())  # ...and the message waits in the session
    reconnect.set()
    answer = await answer_to(running_bot, world.general, asked)
    assert fake.resume_count == 1 and fake.identify_count == 1
    assert [m.id for m in replies_to(fake, asked)] == [answer.id]


async def test_a_malformed_event_costs_that_event_not_the_bot(
    running_bot: RunningBot, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot.discord_app.gateway_guard")
    fake, world = running_bot.fake, running_bot.world
    earlier = await fake.send_message_as(world.member, world.general, "a link https://example.com/x")
    await settle(running_bot)
    # discord.py's parser cannot build a message from this payload: it raises inside the gateway read loop.
    await fake.dispatch_partial_message_update(earlier)
    await eventually(lambda: [r for r in caplog.records if "MESSAGE_UPDATE dropped" in r.getMessage()],
                     what="the dropped event logged")
    dropped = [r for r in caplog.records if "MESSAGE_UPDATE dropped" in r.getMessage()]
    assert len(dropped) == 1 and dropped[0].exc_info is None and str(earlier.id) in dropped[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # Still connected, same session: a mention right after is answered.
    asked = await fake.send_message_as(world.member, world.general, "still there?", mentions_bot=True)
    answer = await answer_to(running_bot, world.general, asked)
    assert answer is not None and not running_bot.bot.is_closed()
    assert fake.identify_count == 1

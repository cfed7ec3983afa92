"""Discord limits: HTTP 429 (with retry-after) on the edits of a streamed answer.

discord.py waits out a 429 and sends the edit again; the reply sink then spaces its edits further apart. The
answer still arrives complete (equal to what the model generates for the same prompt), in fewer edits than
the same answer streamed without 429s.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from bot.discord_app.replies import SLOW_EDIT_S, MessageReplySink
from tests.bot.discord_app.conftest import RunningBot, answer_to, run_bot, spy_prompts

STEP_S = 0.02
"""Each model step is slowed to this, so an answer streams over more than a second, in many edits."""
QUESTION = "tell me a long story about this channel"


@contextlib.contextmanager
def slow_model(engine: Any) -> Iterator[None]:
    original = engine.forward

    def slow(**kwargs: Any) -> Any:
        time.sleep(STEP_S)
        return original(**kwargs)

    engine.forward = slow
    try:
        yield
    finally:
        engine.forward = original


@pytest.fixture
async def streaming_bot(fake_discord: Any, bot_settings: Any, services_factory: Any) -> AsyncIterator[RunningBot]:
    settings = bot_settings.model_copy(update={"max_new_tokens": 32})
    async with services_factory(settings) as services, run_bot(fake_discord, services) as running:
        yield running


async def ask(running: RunningBot, channel: Any) -> Any:
    asked = await running.fake.send_message_as(running.world.member, channel, QUESTION, mentions_bot=True)
    return await answer_to(running, channel, asked, within=30)


async def test_streamed_answer_survives_429s_on_edits_with_fewer_edits(streaming_bot: RunningBot,
                                                                     engine: Any) -> None:
    fake, world, services = streaming_bot.fake, streaming_bot.world, streaming_bot.services
    quiet, limited = world.general, fake.add_text_channel(world.guild, "limited")
    prompts = spy_prompts(services)
    with slow_model(engine):
        plain = await ask(streaming_bot, quiet)
        fake.rate_limit_next("PATCH", f"/channels/{limited.id}/messages/*", retry_after=0.5, count=2)
        before = len(fake.requests)
        started = time.monotonic()
        throttled = await ask(streaming_bot, limited)
        took = time.monotonic() - started
    # The 429s were really sent, on edits of the streamed answer, and each was retried.
    refused = [r for r in fake.requests[before:] if r.status == 429]
    assert len(refused) == 2 and all(r.method == "PATCH" for r in refused)
    assert all(r.path.endswith(f"/messages/{throttled.id}") for r in refused)
    assert took > 2 * 0.5
    # Complete: the same prompt in both channels, the same text, equal to the model's own answer.
    assert len(prompts) == 2 and prompts[0] == prompts[1]
    expected = (await services.executor.generate(prompts[0])).text
    assert len(expected) > 30
    assert plain.content == expected and throttled.content == expected
    stored = await streaming_bot.store.get_message(str(throttled.id))
    assert stored is not None and stored.role == "assistant" and stored.text == expected
    # Streamed in both cases, in fewer edits when Discord pushed back.
    plain_edits, throttled_edits = len(fake.edits_of(plain)), len(fake.edits_of(throttled))
    assert plain_edits >= 5
    assert 1 <= throttled_edits < plain_edits
    assert fake.edits_of(throttled)[-1]["content"] == expected


class _SlowMessage:
    """Stands in for a sent message whose edits Discord holds back (as discord.py does during a 429)."""

    def __init__(self, hold_s: float) -> None:
        self.id = 1
        self.hold_s = hold_s
        self.edits: list[str] = []

    async def edit(self, *, content: str, allowed_mentions: Any) -> None:
        import asyncio

        await asyncio.sleep(self.hold_s)
        self.edits.append(content)


async def test_sink_spaces_edits_after_a_held_back_edit() -> None:
    sink = MessageReplySink(channel=None, reference=None, edit_interval_s=0.05)  # type: ignore[arg-type]
    slow = _SlowMessage(SLOW_EDIT_S + 0.05)
    sink._messages, sink._shown, sink._has_text = [slow], ["…"], True
    await sink.delta("first words")
    assert slow.edits == ["first words"]
    assert sink.edit_interval_s >= SLOW_EDIT_S + 0.05  # at least what the held-back edit took
    await sink.delta(" and more")  # too soon after the slow edit landed: no edit
    assert slow.edits == ["first words"]

"""Messages with nothing the model can read (a sticker, a voice message, a poll) and files that are no image.

Payloads as Discord's documentation gives them (`docs/resources/message.mdx`, `sticker.mdx`, `poll.mdx`): a
sticker comes as `sticker_items`, a voice message as flag IS_VOICE_MESSAGE with one audio attachment carrying
`duration_secs` and `waveform`, a poll as the `poll` object; all three with empty `content`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bot.discord_app.readable import CAN_READ
from tests.bot.discord_app.conftest import RunningBot, add_image_attachment, answer_to, settle, spy_prompts
from tests.fakes.discord_api import FakeDiscord

IS_VOICE_MESSAGE = 1 << 13
"""Message flag (and attachment flag) of a voice message."""


def sticker(payload: dict[str, Any]) -> None:
    payload["sticker_items"] = [{"id": "749054660769218631", "name": "Wave", "format_type": 1}]


def voice(fake: FakeDiscord) -> Any:
    def add(payload: dict[str, Any]) -> None:
        attachment = fake.add_attachment(b"OggS" + bytes(400), "voice-message.ogg", "audio/ogg")
        attachment.update(duration_secs=2.5, waveform="AAAAAAAAAAAA", flags=IS_VOICE_MESSAGE)
        payload["attachments"] = [attachment]
        payload["flags"] = IS_VOICE_MESSAGE

    return add


def poll(payload: dict[str, Any]) -> None:
    payload["poll"] = {
        "question": {"text": "Cats or dogs?"},
        "answers": [{"answer_id": 1, "poll_media": {"text": "cats"}},
                    {"answer_id": 2, "poll_media": {"text": "dogs"}}],
        "expiry": (datetime.now(UTC) + timedelta(hours=24)).isoformat(),
        "allow_multiselect": False,
        "layout_type": 1,
        "results": {"is_finalized": False, "answer_counts": []},
    }


async def send_special(fake: FakeDiscord, author: Any, channel: Any, shape: Any, *, mentions_bot: bool = False) -> Any:
    payload = fake.message_payload(channel, author, "", mentions_bot=mentions_bot)
    shape(payload)
    return await fake.send_message_payload(payload)


@pytest.mark.parametrize(("kind", "told"), [("sticker", "I cannot see stickers"),
                                            ("voice", "I cannot listen to voice messages"),
                                            ("poll", "I cannot read polls")])
async def test_a_dm_with_nothing_to_read_is_told_what_the_bot_reads(running_bot: RunningBot, kind: str,
                                                                     told: str) -> None:
    fake, world = running_bot.fake, running_bot.world
    prompts = spy_prompts(running_bot.services)
    shape = {"sticker": sticker, "voice": voice(fake), "poll": poll}[kind]
    asked = await send_special(fake, world.member, world.dm, shape)
    reply = await answer_to(running_bot, world.dm, asked)
    assert reply.content == f"{told}; {CAN_READ}."
    assert reply.allowed_mentions == {"parse": []}
    assert prompts == [] and not running_bot.services.executor.batches  # no empty turn reached the model
    assert await running_bot.store.get_message(str(asked.id)) is None  # nor the history
    assert not fake.requests_to("GET", "/attachments/*")  # a voice message is not even downloaded


async def test_a_bare_mention_is_asked_for_a_question(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    asked = await fake.send_message_as(world.member, world.general, "", mentions_bot=True)
    reply = await answer_to(running_bot, world.general, asked)
    assert reply.content == f"Ask me something: {CAN_READ}."
    assert not running_bot.services.executor.batches


async def test_nothing_to_read_in_an_always_channel_is_passed_over_in_silence(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    await running_bot.store.update_channel_settings(str(world.images.id), answer_mode="always")
    for shape in (sticker, voice(fake), poll):
        await send_special(fake, world.member, world.images, shape)
    await settle(running_bot)
    probe = await fake.send_message_as(world.member, world.images, "and this one?")
    await answer_to(running_bot, world.images, probe)
    assert len(fake.sent_messages(world.images)) == 1
    window = await running_bot.store.recent_window(str(world.images.id), 10)
    assert [m.platform_id for m in window if m.role == "user"] == [str(probe.id)]


async def test_files_that_are_no_usable_image_are_named_above_the_answer(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    prompts = spy_prompts(running_bot.services)
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8" height="8"/></svg>'
    files = [
        fake.add_attachment(svg, "logo.svg", "image/svg+xml"),
        fake.add_attachment(b"<!doctype html><html><body>not a picture</body></html>", "page.png", "image/png"),
        fake.add_attachment(b"", "empty.jpg", "image/jpeg"),
        add_image_attachment(fake, seed=4),
    ]
    asked = await fake.send_message_as(world.member, world.general, "what are these?", attachments=files,
                                       mentions_bot=True)
    answer = await answer_to(running_bot, world.general, asked)
    note = "(left out: `logo.svg`, `page.png`, `empty.jpg` are not images I can read)"
    assert answer.content.startswith(note + "\n")
    assert len(prompts) == 1 and len(prompts[0].images) == 1  # the one picture is answered
    assert len(fake.requests_to("GET", "/attachments/*")) == len(files)
    request = await running_bot.store.get_message(str(asked.id))
    assert request.request_state == "answered" and len(request.images) == 1
    stored_answer = await running_bot.store.get_message(str(answer.id))
    assert stored_answer.text == answer.content.removeprefix(note + "\n")  # the model's text, not the note

    # Only such files, with a question: told which file, in the one reply.
    only = await fake.send_message_as(world.member, world.dm, "", attachments=[
        fake.add_attachment(svg, "logo.svg", "image/svg+xml")])
    reply = await answer_to(running_bot, world.dm, only)
    assert reply.content == f"I cannot read `logo.svg`; {CAN_READ}."

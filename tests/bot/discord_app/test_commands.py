"""The slash commands and the "Caption image" menu: the real bot, the fake Discord, the tiny model, SQLite."""

from __future__ import annotations

import asyncio
import re
import threading
from typing import Any

import discord
import pytest

from bot.discord_app.cogs import EXTENSIONS
from bot.discord_app.cogs.channel import NEEDS_MANAGE_CHANNELS
from bot.discord_app.cogs.frame import BUSY_MESSAGE
from bot.discord_app.cogs.tasks import INCOMPLETE_EXAMPLE, NO_IMAGE_IN_MESSAGE, _continue, format_ranking
from model_server.errors import Busy
from model_server.tasks import MAX_CATEGORIES
from model_server.types import GenerationParams, Prompt, RankedCategory
from tests.bot.discord_app.conftest import RunningBot, add_image_attachment, answer_to, eventually
from tests.conftest import noise_image
from tests.fakes.discord_api import EPHEMERAL, MANAGE_CHANNELS, InteractionRecord

NONE = {"parse": []}
RANK_LINE = re.compile(r"^(\d+)\. (.+) — (\d+)%$")


async def _completed(running: RunningBot, payload: dict[str, Any], wait_s: float) -> InteractionRecord:
    """Dispatch an interaction and wait until the bot's handler returned (discord.py's completion event)."""
    interaction_id = int(payload["id"])
    done = asyncio.ensure_future(running.bot.wait_for(
        "app_command_completion", check=lambda interaction, _command: interaction.id == interaction_id,
        timeout=wait_s))
    await asyncio.sleep(0)  # the waiter is registered before the event can arrive
    await running.fake.dispatch("INTERACTION_CREATE", payload)
    await done
    return running.fake.interaction_responses(interaction_id)


async def slash(running: RunningBot, name: str, options: dict[str, Any] | None = None, *, channel: Any = None,
                member: Any = None, wait_s: float = 30.0) -> InteractionRecord:
    world = running.world
    payload = running.fake.slash_command_payload(name, options, channel=channel or world.images,
                                                 member=member or world.member)
    return await _completed(running, payload, wait_s)


async def menu(running: RunningBot, target: Any, *, wait_s: float = 30.0) -> InteractionRecord:
    world = running.world
    payload = running.fake.context_menu_payload("Caption image", target, channel=world.images, member=world.member)
    return await _completed(running, payload, wait_s)


def answered(record: InteractionRecord, *, ephemeral: bool = False) -> str:
    """The final text of a deferred-then-edited interaction, after checking how it was delivered."""
    assert record.deferred and record.response_type == 5
    assert bool(record.callbacks[0].get("data", {}).get("flags", 0) & EPHEMERAL) == ephemeral
    original = record.original
    assert original is not None and not original.loading and original.edits
    assert original.allowed_mentions == NONE
    assert all(m.allowed_mentions == NONE for m in record.followups)
    assert not original.content.startswith("⏳")
    return "\n".join([original.content, *(m.content for m in record.followups)])


def ranking(text: str) -> list[tuple[int, str, int]]:
    rows = []
    for line in text.splitlines():
        match = RANK_LINE.match(line)
        if match:
            rows.append((int(match[1]), match[2], int(match[3])))
    return rows


async def batches(running: RunningBot, count: int) -> list[Any]:
    """The executor's batch records: each is added just after its results reached the loop, so wait."""
    executor = running.services.executor
    await eventually(lambda: len(executor.batches) >= count, what=f"{count} batches recorded")
    return list(executor.batches)


def command_payload(running: RunningBot, name: str) -> dict[str, Any]:
    fake = running.fake
    found = [c for c in fake.commands() + fake.commands(running.world.guild) if c["name"] == name]
    assert found, f"/{name} was not registered"
    return found[0]


# -- registration -----------------------------------------------------------------------------------------


async def test_every_command_is_registered_with_described_options(running_bot: RunningBot) -> None:
    names = {"caption", "ask", "classify", "story", "fewshot", "reset", "settings", "status", "forget-me"}
    for name in names:
        command = command_payload(running_bot, name)
        assert command["description"]
        for option in command.get("options", []):
            assert option["description"], (name, option["name"])
    caption_options = command_payload(running_bot, "caption")["options"]
    caption = {o["name"]: (o["type"], o.get("required", False)) for o in caption_options}
    assert caption == {"image": (11, True), "prompt": (3, False), "image2": (11, False), "image3": (11, False),
                       "image4": (11, False)}
    fewshot = [o["name"] for o in command_payload(running_bot, "fewshot")["options"]]
    assert fewshot == ["example_image", "example_answer", "image", "instruction", "example_image2",
                       "example_answer2"]
    settings = {o["name"]: o for o in command_payload(running_bot, "settings")["options"]}
    assert [c["value"] for c in settings["decoding"]["choices"]] == ["greedy", "sample", "beam"]
    assert [c["value"] for c in settings["answer_mode"]["choices"]] == ["mention", "always"]
    menu_command = next(c for c in running_bot.fake.commands() if c["name"] == "Caption image")
    assert menu_command["type"] == 3


# -- the guide's tasks ------------------------------------------------------------------------------------


async def test_caption_one_image_streams_into_the_original(running_bot: RunningBot) -> None:
    image = add_image_attachment(running_bot.fake, seed=1)
    record = await slash(running_bot, "caption", {"image": image})
    text = answered(record)
    assert text.strip()
    assert [b.size for b in await batches(running_bot, 1)] == [1]


async def test_caption_three_images_run_as_one_batch(running_bot: RunningBot) -> None:
    fake = running_bot.fake
    images = {"image": add_image_attachment(fake, seed=1), "image2": add_image_attachment(fake, seed=2),
              "image3": add_image_attachment(fake, seed=3)}
    record = await slash(running_bot, "caption", images)
    text = answered(record)
    assert [line[:6] for line in text.splitlines()] == ["**1.**", "**2.**", "**3.**"]
    assert [b.size for b in await batches(running_bot, 1)] == [3]


async def test_caption_with_prompt_shows_prompt_and_continuation(running_bot: RunningBot) -> None:
    image = add_image_attachment(running_bot.fake, seed=4)
    record = await slash(running_bot, "caption", {"image": image, "prompt": "This is an image of "})
    text = answered(record)
    assert text.startswith("This is an image of ") and len(text) > len("This is an image of ")


async def test_ask(running_bot: RunningBot) -> None:
    image = add_image_attachment(running_bot.fake, seed=5)
    record = await slash(running_bot, "ask", {"image": image, "question": "What colour is it? @everyone"})
    text = answered(record)
    assert text.strip()
    assert not record.original.mention_everyone and record.original.mentions == []


async def test_classify_ranks_every_category(running_bot: RunningBot) -> None:
    fake = running_bot.fake
    categories = "animals, vegetables, city landscape, cars, office, Animals"
    record = await slash(running_bot, "classify", {"image": add_image_attachment(fake, seed=6),
                                                   "categories": categories, "top": 10})
    rows = ranking(answered(record))
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    assert sorted(r[1] for r in rows) == sorted(["animals", "vegetables", "city landscape", "cars", "office"])
    assert abs(sum(r[2] for r in rows) - 100) <= 1
    assert [r[2] for r in rows] == sorted((r[2] for r in rows), reverse=True)

    record = await slash(running_bot, "classify", {"image": add_image_attachment(fake, seed=6),
                                                   "categories": categories, "top": 2})
    text = answered(record)
    assert [r[0] for r in ranking(text)] == [1, 2] and "(and 3 more)" in text


@pytest.mark.parametrize(("categories", "message"), [
    (" , ,", "give at least one category"),
    (", ".join(f"category {n}" for n in range(MAX_CATEGORIES + 1)), f"at most {MAX_CATEGORIES} categories"),
])
async def test_classify_refuses_bad_category_lists(running_bot: RunningBot, categories: str, message: str) -> None:
    record = await slash(running_bot, "classify", {"image": add_image_attachment(running_bot.fake, seed=7),
                                                   "categories": categories})
    assert answered(record) == message
    assert not running_bot.services.executor.batches


async def test_story_uses_beam_search(running_bot: RunningBot) -> None:
    fake = running_bot.fake
    record = await slash(running_bot, "story", {"image": add_image_attachment(fake, seed=8),
                                                "image2": add_image_attachment(fake, seed=9)}, wait_s=60)
    assert answered(record).strip()
    assert [b.kind for b in await batches(running_bot, 1)] == ["beam"]
    # Not streamed: the original went from "thinking" to the answer in one edit.
    assert len(record.original_edits) == 1


async def test_fewshot_with_two_examples(running_bot: RunningBot) -> None:
    fake = running_bot.fake
    record = await slash(running_bot, "fewshot", {
        "example_image": add_image_attachment(fake, seed=10), "example_answer": "A red square. Fun fact: red.",
        "image": add_image_attachment(fake, seed=11), "instruction": "Describe this image.",
        "example_image2": add_image_attachment(fake, seed=12), "example_answer2": "A blue square. Fun fact: blue.",
    })
    assert answered(record).strip()
    assert len(await batches(running_bot, 1)) == 1


async def test_fewshot_needs_both_parts_of_the_second_example(running_bot: RunningBot) -> None:
    fake = running_bot.fake
    record = await slash(running_bot, "fewshot", {
        "example_image": add_image_attachment(fake, seed=10), "example_answer": "A red square.",
        "image": add_image_attachment(fake, seed=11), "example_image2": add_image_attachment(fake, seed=12),
    })
    assert answered(record) == INCOMPLETE_EXAMPLE
    assert not running_bot.services.executor.batches


async def test_a_file_that_is_not_an_image(running_bot: RunningBot) -> None:
    text_file = running_bot.fake.add_attachment(b"just some notes, not a picture\n" * 4, "notes.txt")
    record = await slash(running_bot, "ask", {"image": text_file, "question": "what is this?"})
    assert answered(record) == "that file is not an image"


class GatedEngine:
    """The real engine, except that beam searches wait for `gate`: a request that runs as long as a test needs."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.gate = threading.Event()

    def beam_search(self, rows: Any) -> Any:
        self.gate.wait(30)
        return self.inner.beam_search(rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_waiting_request_shows_its_place_in_the_queue(running_bot: RunningBot,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    executor = running_bot.services.executor
    engine = GatedEngine(executor.engine)
    monkeypatch.setattr(executor, "engine", engine)
    story = Prompt(items=(noise_image(20), "Story: \n"),
                   params=GenerationParams(decoding="beam", num_beams=2, max_new_tokens=4))
    # Beam requests never share a batch with greedy ones: one runs, one waits, and the caption waits behind.
    running = asyncio.ensure_future(executor.generate(story))
    await eventually(lambda: executor.stats().running == 1, what="the first request running")
    waiting = asyncio.ensure_future(executor.generate(story))
    try:
        asked = asyncio.ensure_future(slash(running_bot, "caption",
                                            {"image": add_image_attachment(running_bot.fake, seed=21)}))
        await eventually(lambda: any(e.get("content") == "⏳ queued, 1 ahead"
                                     for r in running_bot.fake.interactions.values() for e in r.original_edits),
                         what="the queue position shown")
    finally:
        engine.gate.set()
    record = await asked
    assert answered(record).strip()
    assert record.original_edits[0]["content"] == "⏳ queued, 1 ahead"
    assert all(edit.get("allowed_mentions") == NONE for edit in record.original_edits)
    await asyncio.gather(running, waiting)


async def test_busy_model_gets_a_short_message(running_bot: RunningBot, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_args: Any, **_kwargs: Any) -> Any:
        raise Busy(16, 16)

    monkeypatch.setattr(running_bot.services.executor, "submit", full)
    record = await slash(running_bot, "caption", {"image": add_image_attachment(running_bot.fake, seed=2)})
    assert answered(record) == BUSY_MESSAGE
    # The failed request gave its per-user slot back.
    assert running_bot.bot.limiter.inflight(str(running_bot.world.member.id)) == 0


async def test_caption_image_menu(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    with_image = await fake.send_message_as(world.member, world.images, "look",
                                            attachments=[add_image_attachment(fake, seed=13)])
    record = await menu(running_bot, with_image)
    assert answered(record).strip()
    without = await fake.send_message_as(world.member, world.images, "no picture here")
    record = await menu(running_bot, without)
    assert answered(record) == NO_IMAGE_IN_MESSAGE


# -- the channel and the user -----------------------------------------------------------------------------


async def _recorded(running: RunningBot, channel: Any, count: int) -> list[Any]:
    return await eventually(lambda: _window_of(running, channel, count), what=f"{count} messages stored")


async def _window_of(running: RunningBot, channel: Any, count: int) -> list[Any] | None:
    window = await running.store.recent_window(str(channel.id), 50)
    return window if len(window) >= count else None


async def test_reset_clears_the_channel(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    for text in ("first", "second"):
        await fake.send_message_as(world.member, world.general, text)
    await fake.send_message_as(world.member, world.images, "elsewhere")
    await _recorded(running_bot, world.general, 2)
    await _recorded(running_bot, world.images, 1)
    record = await slash(running_bot, "reset", channel=world.general, member=world.moderator)
    assert answered(record) == "History cleared: 2 messages removed."
    assert await running_bot.store.count_messages(str(world.general.id)) == 0
    assert await running_bot.store.count_messages(str(world.images.id)) == 1


async def test_reset_and_settings_need_manage_channels(running_bot: RunningBot) -> None:
    world = running_bot.world
    for name in ("reset", "settings"):
        assert int(command_payload(running_bot, name)["default_member_permissions"]) == MANAGE_CHANNELS
    await running_bot.fake.send_message_as(world.member, world.general, "keep me")
    await _recorded(running_bot, world.general, 1)
    record = await slash(running_bot, "reset", channel=world.general, member=world.member)
    assert answered(record) == NEEDS_MANAGE_CHANNELS
    assert await running_bot.store.count_messages(str(world.general.id)) == 1
    record = await slash(running_bot, "settings", {"answer_mode": "always"}, channel=world.general,
                         member=world.member)
    assert answered(record, ephemeral=True) == NEEDS_MANAGE_CHANNELS
    assert (await running_bot.store.channel_settings(str(world.general.id))).answer_mode is None


async def test_settings_show_set_validate_and_persist(running_bot: RunningBot) -> None:
    world, store = running_bot.world, running_bot.store
    key = str(world.general.id)
    shown = answered(await slash(running_bot, "settings", channel=world.general, member=world.moderator),
                     ephemeral=True)
    assert "- answer_mode: mention (default)" in shown and "- max_new_tokens: 12 (default)" in shown

    record = await slash(running_bot, "settings", {
        "answer_mode": "always", "record_mode": "addressed", "system_prompt": "Answer in French.",
        "max_new_tokens": 100, "temperature": 0.5, "decoding": "sample",
    }, channel=world.general, member=world.moderator)
    text = answered(record, ephemeral=True)
    assert "- decoding: sample (default: greedy)" in text and "- max_new_tokens: 100 (default: 12)" in text
    current = await store.channel_settings(key)
    assert (current.answer_mode, current.record_mode, current.system_prompt, current.max_new_tokens,
            current.temperature, current.decoding) == ("always", "addressed", "Answer in French.", 100, 0.5,
                                                       "sample")

    record = await slash(running_bot, "settings", {"temperature": 5.0, "decoding": "beam"}, channel=world.general,
                         member=world.moderator)
    assert "temperature must be a number from 0.01 to 2.0" in answered(record, ephemeral=True)
    assert (await store.channel_settings(key)).decoding == "sample"  # one bad value changes nothing

    record = await slash(running_bot, "settings", {"system_prompt": "none", "clear": "max_new_tokens"},
                         channel=world.general, member=world.moderator)
    answered(record, ephemeral=True)
    current = await store.channel_settings(key)
    assert current.system_prompt is None and current.max_new_tokens is None and current.decoding == "sample"


async def test_settings_and_reset_in_a_dm(running_bot: RunningBot) -> None:
    world = running_bot.world
    record = await slash(running_bot, "settings", {"decoding": "beam"}, channel=world.dm, member=world.member)
    assert "Changed: decoding." in answered(record, ephemeral=True)
    assert (await running_bot.store.channel_settings(str(world.dm.id))).decoding == "beam"
    record = await slash(running_bot, "reset", channel=world.dm, member=world.member)
    assert answered(record) == "History cleared: 0 messages removed."


async def test_status(running_bot: RunningBot) -> None:
    await slash(running_bot, "caption", {"image": add_image_attachment(running_bot.fake, seed=1)})
    await batches(running_bot, 1)
    text = answered(await slash(running_bot, "status"))
    assert text.startswith("```") and text.endswith("```")
    fields = dict(line.split(": ", 1) for line in text.strip("`\n").splitlines())
    assert fields["model"] == running_bot.services.model.name.rsplit("/", 1)[-1]
    assert fields["backend"] == "local" and fields["type"] == "instruct"
    assert fields["queue"] == "0 waiting, 0 running" and fields["batches run"] == "1"
    assert re.fullmatch(r"\d+\.\d\d s", fields["median latency"])
    # The caption's image went through the vision tower once and is kept for the next question about it.
    assert re.fullmatch(r"[1-9]\d* images, \d+\.\d of \d+ MiB, \d+% hits", fields["image cache"])


async def test_forget_me_removes_only_the_callers_messages(running_bot: RunningBot) -> None:
    fake, world, store = running_bot.fake, running_bot.world, running_bot.store
    await fake.send_message_as(world.member, world.general, "mine")
    await fake.send_message_as(world.moderator, world.general, "not mine")
    await fake.send_message_as(world.member, world.images, "mine too")
    await _recorded(running_bot, world.general, 2)
    await _recorded(running_bot, world.images, 1)
    record = await slash(running_bot, "forget-me", channel=world.general, member=world.member)
    assert answered(record, ephemeral=True).startswith("Done: 2 messages of yours")
    left = await store.recent_window(str(world.general.id), 10)
    assert [m.author_id for m in left] == [str(world.moderator.id)]
    assert await store.count_messages(str(world.images.id)) == 0


# -- pure helpers -----------------------------------------------------------------------------------------


def test_ranking_percentages_sum_to_100_and_top_cuts() -> None:
    ranked = [RankedCategory(name, p, 0.0) for name, p in
              [("a", 1 / 3), ("b", 1 / 3), ("c", 1 / 3 - 1e-9)]]
    rows = ranking(format_ranking(ranked, 5))
    assert [r[1] for r in rows] == ["a", "b", "c"] and sum(r[2] for r in rows) == 100
    assert format_ranking(ranked, 1) == "1. a — 34%\n(and 2 more)"


@pytest.mark.parametrize(("lead", "text", "joined"), [
    ("This is an image of", " a dog", "This is an image of a dog"),
    ("This is an image of", "a dog", "This is an image of a dog"),
    ("A photo", ", taken at night", "A photo, taken at night"),
    ("", "a dog", "a dog"),
])
def test_prompted_caption_joins_prompt_and_continuation(lead: str, text: str, joined: str) -> None:
    assert _continue(lead, text) == joined


async def test_the_commands_come_from_two_cogs_and_no_message_is_a_text_command(running_bot: RunningBot) -> None:
    bot = running_bot.bot
    assert sorted(bot.extensions) == sorted(EXTENSIONS)
    assert sorted(bot.cogs) == ["ChannelCommands", "TaskCommands"]
    assert {c.name for c in bot.tree.get_commands()} == {
        "caption", "ask", "classify", "story", "fewshot", "Caption image", "reset", "settings", "forget-me", "status"}
    assert not bot.all_commands
    fake, world = running_bot.fake, running_bot.world
    asked = await fake.send_message_as(world.member, world.general, "help", mentions_bot=True)
    await answer_to(running_bot, world.general, asked)
    channel = bot.get_channel(world.general.id)
    assert isinstance(channel, discord.TextChannel)
    message = await channel.fetch_message(asked.id)
    assert await bot.get_prefix(message) == []
    context = await bot.get_context(message)
    assert context.prefix is None and not context.valid

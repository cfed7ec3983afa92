"""Reply delivery: splitting (pure), and both sinks driven against the fake Discord."""

from __future__ import annotations

import discord
import pytest

from bot.discord_app.replies import (
    MESSAGE_LIMIT,
    InteractionReplySink,
    MessageReplySink,
    split_message,
    spoiler_parts,
)
from tests.bot.discord_app.conftest import RunningBot


# -- split_message ---------------------------------------------------------------------------------------
def test_short_text_is_one_chunk_and_blank_is_none() -> None:
    assert split_message("hello") == ["hello"]
    assert split_message("   \n ") == []


def test_split_at_line_boundaries_within_the_limit() -> None:
    lines = [f"line {i:04d} " + "x" * 40 for i in range(200)]
    chunks = split_message("\n".join(lines))
    assert len(chunks) > 1 and all(len(c) <= MESSAGE_LIMIT for c in chunks)
    assert "\n".join(chunks).split("\n") == lines  # nothing lost, no line cut


def test_code_block_is_closed_and_reopened_across_a_split() -> None:
    text = "before\n```python\n" + "\n".join(f"print({i})" for i in range(400)) + "\n```\nafter"
    chunks = split_message(text, limit=1000)
    assert len(chunks) >= 4 and all(len(c) <= 1000 for c in chunks)
    for chunk in chunks:
        assert chunk.count("```") % 2 == 0, chunk[:30]
    assert all(c.startswith("```python\n") for c in chunks[1:-1])
    assert chunks[0].endswith("\n```") and chunks[-1].endswith("```\nafter")


def test_overlong_line_is_cut() -> None:
    words = " ".join(["word"] * 1000)
    chunks = split_message(words)
    assert all(len(c) <= MESSAGE_LIMIT for c in chunks) and " ".join(chunks).split() == words.split()
    solid = "x" * 4500
    assert "".join(split_message(solid)) == solid


@pytest.mark.parametrize("limit", [100, 333, 2000])
def test_every_chunk_fits_whatever_the_text(limit: int) -> None:
    text = ("```\n" + "y" * 700 + "\n" + "short\n" * 50 + "```\n") * 5 + "z" * 2500
    assert all(0 < len(c) <= limit for c in split_message(text, limit))


def hidden(part: str) -> bool:
    """Discord shows nothing of `part` until clicked: one `||...||` pair around all of it, none inside."""
    return (part.startswith("||") and part.endswith("||") and len(part) > 4 and "||" not in part[2:-2]
            and not part[2:-2].endswith("|"))


@pytest.mark.parametrize("text", [
    "short", "x" * 4500, "\n".join(f"{i}: " + "word " * 30 for i in range(100)), "a||b|||c||" * 300,
    "ends with a pipe |", "```\n" + "code line\n" * 400 + "```",
])
def test_spoiler_parts_hide_every_part_within_the_limit(text: str) -> None:
    parts = spoiler_parts(text)
    assert parts and all(len(p) <= MESSAGE_LIMIT and hidden(p) for p in parts)
    if "```" not in text:  # (a split code block is closed and reopened: more text than was given)
        assert "".join(p[2:-2] for p in parts).replace("\u200b", "").replace("\n", "") == text.replace("\n", "")


# -- MessageReplySink against the fake --------------------------------------------------------------------
async def asking_message(running: RunningBot, text: str = "question") -> discord.Message:
    fake, world = running.fake, running.world
    record = await fake.send_message_as(world.member, world.images, text)
    channel = running.bot.get_channel(world.images.id)
    return await channel.fetch_message(record.id)


async def test_long_answer_is_split_over_several_messages(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    asked = await asking_message(running_bot)
    text = "\n".join(f"{i}: " + "the model goes on and on " * 3 for i in range(70))
    assert len(text) > 2 * MESSAGE_LIMIT
    async with MessageReplySink.for_message(asked, edit_interval_s=0.01) as sink:
        await sink.queued(1)
        for start in range(0, len(text), 300):
            await sink.delta(text[start:start + 300])
        reply = await sink.finish(text)
    sent = fake.sent_messages(world.images)
    assert len(sent) == 3 and reply is not None and reply.platform_id == str(sent[0].id) and reply.text == text
    assert "\n".join(m.content for m in sent) == text
    assert int(sent[0].message_reference["message_id"]) == asked.id
    assert all(m.allowed_mentions == {"parse": []} for m in sent)
    assert all(e["allowed_mentions"] == {"parse": []} for m in sent for e in m.edits)
    assert fake.edits_of(sent[0])[0]["content"] != "⏳ queued, 1 ahead"  # the queue note was replaced
    assert fake.requests_to("POST", f"/channels/{world.images.id}/typing")


async def test_everyone_in_model_output_pings_nobody(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    asked = await asking_message(running_bot)
    text = f"@everyone @here <@{world.member.id}> <@&{world.mod_role.id}> look"
    async with MessageReplySink.for_message(asked, edit_interval_s=0.0) as sink:
        await sink.delta(text[:10])
        await sink.delta(text[10:])
        await sink.finish(text)
    (sent,) = fake.sent_messages(world.images)
    assert sent.content == text
    assert not sent.mention_everyone and sent.mentions == [] and sent.mention_roles == []


async def test_failed_edits_still_deliver_the_final_answer(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    asked = await asking_message(running_bot)
    async with MessageReplySink.for_message(asked, edit_interval_s=0.0) as sink:
        await sink.queued(2)
        fake.inject_fault("PATCH", "/channels/{c}/messages/{m}", status=403, count=10,
                          json_body={"message": "Missing Access", "code": 50001})
        await sink.delta("hello ")
        await sink.delta("world")
        reply = await sink.finish("hello world")
    (sent,) = fake.sent_messages(world.images)
    assert sent.content == "hello world" and reply is not None and reply.platform_id == str(sent.id)
    assert fake.sent_messages(world.images, include_deleted=True)[0].content == "⏳ queued, 2 ahead"


async def test_failure_message_replaces_the_queue_note(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    asked = await asking_message(running_bot)
    async with MessageReplySink.for_message(asked) as sink:
        await sink.queued(0)
        await sink.failed("the model is busy, try again in a minute")
    (sent,) = fake.sent_messages(world.images)
    assert sent.content == "the model is busy, try again in a minute"


# -- InteractionReplySink -------------------------------------------------------------------------------
async def test_interaction_sink_edits_the_original_then_follows_up(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    bot = running_bot.bot
    text = "\n".join(f"an answer for a slash command, line {i}" for i in range(80))
    replies = []

    @bot.tree.command(name="long-answer", description="test only")
    async def long_answer(interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        sink = InteractionReplySink(interaction, edit_interval_s=0.0)
        await sink.queued(3)
        await sink.delta(text[:1500])
        await sink.delta(text[1500:])
        replies.append(await sink.finish(text))

    await bot.tree.sync()
    record = await fake.invoke_slash("long-answer", channel=world.images, member=world.member)
    await fake.wait_for(lambda: replies, what="interaction answered")
    assert record.original is not None and len(record.followups) == 1
    assert record.original.content + "\n" + record.followups[0].content == text
    assert replies[0].platform_id == str(record.original.id)
    assert record.original_edits[0]["content"] == "⏳ queued, 3 ahead"
    assert all(e["allowed_mentions"] == {"parse": []} for e in record.original_edits)
    assert record.followups[0].allowed_mentions == {"parse": []}


async def test_a_spoiler_answer_is_hidden_in_every_edit_and_every_part(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    asked = await asking_message(running_bot)
    text = "\n".join(f"{i}: " + "the picture shows a || plot twist " * 3 for i in range(70))
    async with MessageReplySink.for_message(asked, edit_interval_s=0.0, spoiler=True) as sink:
        await sink.queued(1)
        for start in range(0, len(text), 150):
            await sink.delta(text[start:start + 150])
        reply = await sink.finish(text)
    sent = fake.sent_messages(world.images)
    assert len(sent) >= 3 and reply is not None and reply.text == text  # stored as the model wrote it
    created = [r.json["content"] for r in fake.requests_to("POST", f"/channels/{world.images.id}/messages")]
    shown = [*created, *(e["content"] for m in sent for e in m.edits), *(m.content for m in sent)]
    assert len(shown) > 10
    assert all(hidden(c) for c in shown if not c.startswith("⏳")), [c[:40] for c in shown if not hidden(c)][:3]

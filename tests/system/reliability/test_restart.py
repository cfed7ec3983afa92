"""Killed mid-answer (SIGKILL), then restarted: what was received is stored, and each cut-off request is
answered (recent) or its author told to ask again (older), exactly once.

The bot runs as a real `idefics-bot run` child process against the fake Discord of this process; the answer
in flight is held by the fake (its first message hangs), so the kill lands mid-answer on any machine.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bot.discord_app.recovery import RESTARTED, recover_pending
from storage import NewMessage, open_database
from tests.bot.discord_app.conftest import RunningBot, settle
from tests.fakes.discord_api import FakeDiscord, MessageRecord
from tests.system.reliability.bot_process import (
    bot_env,
    bot_process,
    final_answer,
    is_reply_to,
    replies_to,
    sqlite_url,
    stored,
    wait_for_state,
)


def pending(message: MessageRecord, channel_key: str, age_s: float, author_id: str) -> NewMessage:
    """A request as the pipeline stores it, made `age_s` ago and never answered."""
    return NewMessage(platform_id=str(message.id), channel_key=channel_key, role="user", author_id=author_id,
                      author_name="bob", text=message.content, request_state="pending",
                      created_at=datetime.now(UTC) - timedelta(seconds=age_s))


async def test_killed_mid_answer_is_answered_once_after_restart(
    fake_discord: FakeDiscord, tiny_model_path: Path, tmp_path: Path
) -> None:
    fake, world = fake_discord, fake_discord.world
    url = sqlite_url(tmp_path)
    env = bot_env(fake, tiny_model_path, url)
    messages_path = f"/channels/{world.general.id}/messages"
    async with bot_process(env, tmp_path, "first") as first:
        await first.wait_ready()
        # The answer's first message hangs (then fails): the process is killed while it answers.
        fake.inject_fault("POST", messages_path, status=503, delay=600)
        asked = await fake.send_message_as(world.member, world.general, "describe a cat", mentions_bot=True)
        await fake.wait_for(lambda: fake.requests_to("POST", messages_path), 60, "the answer to start")
        await first.kill()

    cut_off = await stored(url, str(asked.id))
    assert cut_off is not None and cut_off.text == "describe a cat" and cut_off.request_state == "pending"
    assert replies_to(fake, asked) == []

    async with bot_process(env, tmp_path, "second") as second:
        answer = await fake.wait_for_message(world.general, final_answer(asked), 120)
        await wait_for_state(url, asked, "answered")
        await second.wait_ready()
        await asyncio.sleep(0.5)  # room for a second answer, if there were one
        assert [m.id for m in replies_to(fake, asked)] == [answer.id]
        assert answer.allowed_mentions == {"parse": []}
        assert await second.stop() == 0
    async with open_database(url) as db:
        window = await db.store.recent_window(str(world.general.id), 10)
    assert [(m.role, m.platform_id) for m in window] == [("user", str(asked.id)), ("assistant", str(answer.id))]
    assert window[1].text == answer.content and window[1].reply_to == str(asked.id)


async def test_killed_past_the_first_chunk_continues_in_the_cut_off_message(
    fake_discord: FakeDiscord, tiny_model_path: Path, tmp_path: Path
) -> None:
    """The first part of the answer is out, then the process is killed: the restart edits that message into the
    whole answer, and sends no second one."""
    fake, world = fake_discord, fake_discord.world
    url = sqlite_url(tmp_path)
    env = bot_env(fake, tiny_model_path, url)
    edits = f"/channels/{world.general.id}/messages/{{id}}"
    async with bot_process(env, tmp_path, "first") as first:
        await first.wait_ready()
        # The first edit after the first message hangs (and the answer with it): the kill lands past the first
        # streamed chunk.
        fake.inject_fault("PATCH", edits, status=503, delay=600)
        asked = await fake.send_message_as(world.member, world.general, "describe a cat", mentions_bot=True)
        partial = await fake.wait_for_message(world.general, lambda m: is_reply_to(m, asked), 60)
        await fake.wait_for(lambda: fake.requests_to("PATCH", edits), 60, "the answer's first edit")
        cut_off = await stored(url, str(asked.id))
        assert cut_off is not None and cut_off.partial_reply_id == str(partial.id)
        await first.kill()
    shown = partial.content

    async with bot_process(env, tmp_path, "second") as second:
        await wait_for_state(url, asked, "answered")
        await second.wait_ready()
        await asyncio.sleep(0.5)  # room for a second answer, if there were one
        assert [m.id for m in replies_to(fake, asked)] == [partial.id]
        assert partial.content != shown and partial.edits
        assert await second.stop() == 0
    async with open_database(url) as db:
        window = await db.store.recent_window(str(world.general.id), 10)
    assert [(m.role, m.platform_id) for m in window] == [("user", str(asked.id)), ("assistant", str(partial.id))]
    assert window[1].text == partial.content


async def test_old_requests_are_told_to_ask_again_and_a_clean_restart_sends_nothing(
    fake_discord: FakeDiscord, tiny_model_path: Path, tmp_path: Path
) -> None:
    """Requests a crashed run left behind, made while the bot was down: an hour old, a minute old (in a DM),
    one whose message was deleted since, and one of the terminal (not Discord's: left alone)."""
    fake, world = fake_discord, fake_discord.world
    url = sqlite_url(tmp_path)
    member_id = str(world.member.id)
    old = await fake.send_message_as(world.member, world.general, "an old question", mentions_bot=True)
    recent = await fake.send_message_as(world.member, world.dm, "a recent question")
    gone = await fake.send_message_as(world.member, world.images, "deleted since", mentions_bot=True)
    fake.messages[gone.id].deleted = True
    async with open_database(url) as db:
        await db.store.append_message(pending(old, str(world.general.id), 3600, member_id))
        await db.store.append_message(pending(recent, str(world.dm.id), 60, member_id))
        await db.store.append_message(pending(gone, str(world.images.id), 60, member_id))
        await db.store.append_message(NewMessage(
            platform_id="console-1", channel_key="console", role="user", author_id="local", author_name="me",
            text="from the terminal", request_state="pending", created_at=datetime.now(UTC) - timedelta(seconds=5)))

    env = bot_env(fake, tiny_model_path, url)  # RESUME_WINDOW_S: the default, 600 s
    async with bot_process(env, tmp_path, "after-crash") as bot:
        notice = await fake.wait_for_message(world.general, lambda m: is_reply_to(m, old), 120)
        answer = await fake.wait_for_message(world.dm, final_answer(recent), 120)
        await wait_for_state(url, recent, "answered")
        await bot.wait_ready()
        assert notice.content == RESTARTED and notice.allowed_mentions == {"parse": []}
        assert len(replies_to(fake, old)) == 1 and [m.id for m in replies_to(fake, recent)] == [answer.id]
        assert (await stored(url, str(old.id))).request_state == "failed"  # type: ignore[union-attr]
        assert (await stored(url, str(gone.id))).request_state == "failed"  # type: ignore[union-attr]
        assert (await stored(url, "console-1")).request_state == "pending"  # type: ignore[union-attr]
        assert fake.sent_messages(world.images) == []
        assert await bot.stop() == 0

    sent_before = len(fake.requests_to("POST", "/channels/{id}/messages"))
    async with bot_process(env, tmp_path, "clean-restart") as bot:
        await bot.wait_ready()
        await asyncio.sleep(0.5)
        assert "recovery done: 0 resumed, 0 told to ask again, 0 dropped" in bot.log()
        assert len(fake.requests_to("POST", "/channels/{id}/messages")) == sent_before
        assert await bot.stop() == 0


async def test_two_recoveries_at_once_act_once(running_bot: RunningBot) -> None:
    """Two processes starting together both see the request "pending": the claim lets only one answer it."""
    fake, world, store = running_bot.fake, running_bot.world, running_bot.store
    asked = await fake.send_message_as(world.member, world.images, "still there?")  # not addressed: not answered
    await settle(running_bot)
    await store.set_request_state(str(asked.id), "pending")  # as a crashed run left it
    bot = running_bot.bot
    reports = await asyncio.gather(*(recover_pending(bot, started_at=datetime.now(UTC), window_s=600)
                                     for _ in range(2)))
    assert sorted((r.resumed, r.skipped) for r in reports) == [(0, 1), (1, 0)]
    await fake.wait_for_message(world.images, final_answer(asked), 30)
    await settle(running_bot)
    assert len(replies_to(fake, asked)) == 1
    assert (await store.get_message(str(asked.id))).request_state == "answered"
    # A third look finds nothing left to do.
    again = await recover_pending(bot, started_at=datetime.now(UTC), window_s=600)
    assert (again.resumed, again.told, again.skipped) == (0, 0, 0)


async def test_a_claim_is_won_once(tmp_path: Path) -> None:
    async with open_database(sqlite_url(tmp_path)) as db:
        store = db.store
        await store.append_message(NewMessage(platform_id="1", channel_key="2", role="user", author_id="3",
                                              author_name="bob", text="hi", request_state="pending"))
        results = await asyncio.gather(*(store.claim_request("1", "failed") for _ in range(4)))
        assert sorted(results) == [False, False, False, True]
        assert not await store.claim_request("unknown", "failed")
        assert await store.claim_request("1", "pending", expected="failed")  # given back
        assert (await store.get_message("1")).request_state == "pending"  # type: ignore[union-attr]

"""The real bot against the fake Discord: when it answers, what it remembers, how it replies."""

from __future__ import annotations

import asyncio

from bot.discord_app.incoming import starter_platform_id
from tests.bot.discord_app.conftest import (
    RunningBot,
    add_image_attachment,
    answer_to,
    eventually,
    run_bot,
    settle,
    spy_prompts,
)


def key(channel) -> str:
    return str(channel.id)


async def test_mention_with_image_gets_a_reply_and_both_turns_are_stored(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    image = add_image_attachment(fake, seed=3)
    asked = await fake.send_message_as(world.member, world.general, "what is in this picture?",
                                       attachments=[image], mentions_bot=True)
    answer = await answer_to(running_bot, world.general, asked)
    assert answer.allowed_mentions == {"parse": []}
    assert int(answer.message_reference["message_id"]) == asked.id
    assert answer.mentions == [] and not answer.mention_everyone
    assert all(e.get("allowed_mentions") == {"parse": []} for e in fake.edits_of(answer))
    window = await running_bot.store.recent_window(key(world.general), 10)
    assert [m.role for m in window] == ["user", "assistant"]
    user, assistant = window
    # The bot's mention is not part of what the model reads.
    assert user.platform_id == str(asked.id) and user.text == "what is in this picture?"
    assert len(user.images) == 1 and user.images[0].width == 40 and user.request_state == "answered"
    assert assistant.platform_id == str(answer.id) and assistant.reply_to == str(asked.id)
    assert assistant.text == answer.content and assistant.author_id == str(fake.bot.id)
    assert fake.requests_to("POST", f"/channels/{world.general.id}/typing")


async def test_other_mentions_become_names(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    asked = await fake.send_message_as(world.member, world.general, f"hey <@{fake.bot.id}> ask <@{world.moderator.id}>")
    await answer_to(running_bot, world.general, asked)
    stored = await running_bot.store.get_message(str(asked.id))
    assert stored.text == "hey ask @mod-alice"


async def test_dm_is_answered_without_mention(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    asked = await fake.send_message_as(world.member, world.dm, "hello there")
    answer = await answer_to(running_bot, world.dm, asked)
    assert answer.allowed_mentions == {"parse": []}
    window = await running_bot.store.recent_window(key(world.dm), 10)
    assert [m.role for m in window] == ["user", "assistant"]


async def test_thread_has_its_own_history_with_the_starter_message(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    asked = await fake.send_message_as(world.member, world.thread, "what do you think?", mentions_bot=True)
    answer = await answer_to(running_bot, world.thread, asked)
    assert answer.channel_id == world.thread.id
    window = await running_bot.store.recent_window(key(world.thread), 10)
    assert [(m.platform_id, m.role) for m in window] == [
        (starter_platform_id(world.thread.id), "user"), (str(asked.id), "user"), (str(answer.id), "assistant"),
    ]
    assert window[0].text == "let's talk in a thread"
    assert await running_bot.store.count_messages(key(world.general)) == 0
    # A second message does not store the starter again.
    again = await fake.send_message_as(world.member, world.thread, "and now?", mentions_bot=True)
    await answer_to(running_bot, world.thread, again)
    assert await running_bot.store.count_messages(key(world.thread)) == 5
    # Deleting the starter message removes it from the thread's history too.
    await fake.dispatch_message_delete(world.thread.id)
    await eventually(lambda: _gone(running_bot, starter_platform_id(world.thread.id)), what="starter gone")


async def _gone(running: RunningBot, platform_id: str) -> bool:
    return await running.store.get_message(platform_id) is None


async def test_reply_to_the_bot_is_answered_without_mention(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    first = await fake.send_message_as(world.member, world.general, "describe a cat", mentions_bot=True)
    answer = await answer_to(running_bot, world.general, first)
    follow = await fake.send_message_as(world.member, world.general, "and a dog?", reference=answer)
    second = await answer_to(running_bot, world.general, follow)
    assert second.id != answer.id
    stored = await running_bot.store.get_message(str(follow.id))
    assert stored.reply_to == str(answer.id) and stored.request_state == "answered"


async def test_always_mode_answers_every_message(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    await running_bot.store.update_channel_settings(key(world.images), answer_mode="always")
    asked = await fake.send_message_as(world.member, world.images, "no mention here")
    await answer_to(running_bot, world.images, asked)


async def test_plain_message_is_recorded_not_answered_and_addressed_mode_skips_it(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    plain = await fake.send_message_as(world.member, world.general, "just chatting")
    probe = await fake.send_message_as(world.member, world.general, "you there?", mentions_bot=True)
    await answer_to(running_bot, world.general, probe)
    stored = await running_bot.store.get_message(str(plain.id))
    assert stored is not None and stored.request_state is None
    assert len(fake.sent_messages(world.general)) == 1

    await running_bot.store.update_channel_settings(key(world.images), record_mode="addressed")
    skipped = await fake.send_message_as(world.member, world.images, "not for the bot")
    probe = await fake.send_message_as(world.member, world.images, "for the bot", mentions_bot=True)
    await answer_to(running_bot, world.images, probe)
    assert await running_bot.store.get_message(str(skipped.id)) is None
    window = await running_bot.store.recent_window(key(world.images), 10)
    assert window[0].platform_id == str(probe.id)


async def test_the_picture_above_reaches_the_prompt(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    prompts = spy_prompts(running_bot.services)
    posted = await fake.send_message_as(world.member, world.general, "look at this",
                                        attachments=[add_image_attachment(fake, seed=7, size=(32, 24))])
    asked = await fake.send_message_as(world.moderator, world.general, "what is in the picture above?",
                                       mentions_bot=True)
    await answer_to(running_bot, world.general, asked)
    request = await running_bot.store.get_message(str(asked.id))
    assert request.images == () and (await running_bot.store.get_message(str(posted.id))).images
    assert [image.size for image in prompts[0].images] == [(32, 24)]


async def test_same_message_create_twice_is_answered_once(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    asked = await fake.send_message_as(world.member, world.general, "once please", mentions_bot=True)
    await fake.dispatch("MESSAGE_CREATE", asked.payload)
    await answer_to(running_bot, world.general, asked)
    await asyncio.sleep(0.1)
    await settle(running_bot)
    assert len(fake.sent_messages(world.general)) == 1
    assert await running_bot.store.count_messages(key(world.general)) == 2


async def test_edit_updates_history(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    asked = await fake.send_message_as(world.member, world.general, "first words", mentions_bot=True)
    await answer_to(running_bot, world.general, asked)
    await fake.dispatch_message_update(asked, content=f"<@{fake.bot.id}> better words")

    async def edited() -> bool:
        return (await running_bot.store.get_message(str(asked.id))).text == "better words"

    await eventually(edited, what="edit stored")


async def test_single_and_bulk_deletes_leave_history(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    a = await fake.send_message_as(world.member, world.general, "a",
                                   attachments=[add_image_attachment(fake, seed=11)])
    b = await fake.send_message_as(world.member, world.general, "b")
    c = await fake.send_message_as(world.member, world.general, "c", mentions_bot=True)
    answer = await answer_to(running_bot, world.general, c)
    assert await running_bot.store.count_messages(key(world.general)) == 4
    await fake.dispatch_message_delete(a)
    await eventually(lambda: _gone(running_bot, str(a.id)), what="single delete")
    await fake.dispatch_message_delete_bulk([b, answer])
    await eventually(lambda: _gone(running_bot, str(answer.id)), what="bulk delete")
    window = await running_bot.store.recent_window(key(world.general), 10)
    assert [m.platform_id for m in window] == [str(c.id)]


async def test_restart_keeps_history(fake_discord, bot_settings, services_factory) -> None:
    world = fake_discord.world
    async with services_factory(bot_settings) as services, run_bot(fake_discord, services) as running:
        first = await fake_discord.send_message_as(world.member, world.general, "remember me", mentions_bot=True)
        await answer_to(running, world.general, first)
    async with services_factory(bot_settings) as services, run_bot(fake_discord, services) as running:
        window = await running.store.recent_window(key(world.general), 10)
        assert window[0].platform_id == str(first.id) and len(window) == 2
        prompts = spy_prompts(services)
        second = await fake_discord.send_message_as(world.member, world.general, "still there?",
                                                    mentions_bot=True)
        await answer_to(running, world.general, second)
        assert any("remember me" in item for item in prompts[0].items if isinstance(item, str))


async def test_two_channels_are_batched_together(fake_discord, bot_settings, services_factory) -> None:
    world = fake_discord.world
    async with services_factory(bot_settings, batch_window_s=0.8) as services, \
            run_bot(fake_discord, services) as running:
        a = await fake_discord.send_message_as(world.member, world.general, "one", mentions_bot=True)
        b = await fake_discord.send_message_as(world.moderator, world.images, "two", mentions_bot=True)
        await answer_to(running, world.general, a)
        await answer_to(running, world.images, b)
        assert [batch.size for batch in services.executor.batches] == [2]


async def test_per_user_limit_gets_a_clear_reply(fake_discord, bot_settings, services_factory) -> None:
    world = fake_discord.world
    settings = bot_settings.model_copy(update={"user_max_per_minute": 1})
    async with services_factory(settings) as services, run_bot(fake_discord, services) as running:
        first = await fake_discord.send_message_as(world.member, world.general, "one", mentions_bot=True)
        await answer_to(running, world.general, first)
        second = await fake_discord.send_message_as(world.member, world.general, "two", mentions_bot=True)
        refusal = await answer_to(running, world.general, second)
        assert refusal.content.startswith("you sent too many requests; try again in ")
        assert refusal.allowed_mentions == {"parse": []}
        # Stored all the same, as context, but not as a request.
        assert (await running.store.get_message(str(second.id))).request_state is None
        # Another user is not affected.
        other = await fake_discord.send_message_as(world.moderator, world.general, "three", mentions_bot=True)
        answer = await answer_to(running, world.general, other)
        assert not answer.content.startswith("you sent")


async def test_unusable_image_gets_a_clear_reply(fake_discord, bot_settings, services_factory) -> None:
    world = fake_discord.world
    settings = bot_settings.model_copy(update={"max_image_bytes": 2048})
    async with services_factory(settings) as services, run_bot(fake_discord, services) as running:
        big = add_image_attachment(fake_discord, seed=5, size=(64, 64))
        asked = await fake_discord.send_message_as(world.member, world.general, "and this?", attachments=[big],
                                                   mentions_bot=True)
        notice = await answer_to(running, world.general, asked)
        assert notice.content.startswith("the image is too large (max ")
        assert (await running.store.get_message(str(asked.id))).request_state == "failed"
        assert not services.executor.batches


async def test_other_bots_are_recorded_not_answered(fake_discord, bot_settings, services_factory) -> None:
    world = fake_discord.world
    other = fake_discord.add_user("other-bot", bot=True)
    async with services_factory(bot_settings) as services, run_bot(fake_discord, services) as running:
        from_bot = await fake_discord.send_message_as(other, world.general, "hi bot", mentions_bot=True)
        probe = await fake_discord.send_message_as(world.member, world.general, "probe", mentions_bot=True)
        await answer_to(running, world.general, probe)
        assert len(fake_discord.sent_messages(world.general)) == 1
        assert (await running.store.get_message(str(from_bot.id))).request_state is None
    allowed = bot_settings.model_copy(update={"answer_bots": True})
    async with services_factory(allowed) as services, run_bot(fake_discord, services) as running:
        from_bot = await fake_discord.send_message_as(other, world.images, "hi bot", mentions_bot=True)
        await answer_to(running, world.images, from_bot)


async def test_own_messages_are_ignored(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    own = await fake.send_message_as(fake.bot, world.general, f"<@{fake.bot.id}> talking to myself")
    probe = await fake.send_message_as(world.member, world.general, "probe", mentions_bot=True)
    await answer_to(running_bot, world.general, probe)
    assert await running_bot.store.get_message(str(own.id)) is None
    assert len([m for m in fake.sent_messages(world.general) if m.kind != "user"]) == 1


async def test_dms_off(fake_discord, bot_settings, services_factory) -> None:
    world = fake_discord.world
    settings = bot_settings.model_copy(update={"answer_dms": False})
    async with services_factory(settings) as services, run_bot(fake_discord, services) as running:
        dm = await fake_discord.send_message_as(world.member, world.dm, "hello?")
        probe = await fake_discord.send_message_as(world.member, world.general, "probe", mentions_bot=True)
        await answer_to(running, world.general, probe)
        await settle(running)
        assert fake_discord.sent_messages(world.dm) == []
        assert await running.store.get_message(str(dm.id)) is None

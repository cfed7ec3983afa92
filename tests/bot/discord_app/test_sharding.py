"""Sharding: the real bot on two gateway connections against the fake Discord, in one process and split over
two "processes" (two bots on one database), and the restart recovery's rule of whose requests are whose.

discord.py waits 5 s before every identify but the first (Discord's rate limit): the bots here do not.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from bot.discord_app.client import IdeficsBot, ShardedIdeficsBot, create_bot
from bot.discord_app.recovery import RESTARTED, shard_of
from bot.pipeline.services import Services
from bot.settings import Settings
from storage import NewMessage
from tests.bot.discord_app.conftest import RunningBot, answer_to, eventually, settle
from tests.fakes.discord_api import (
    MANAGE_CHANNELS,
    FakeChannel,
    FakeDiscord,
    FakeGuild,
    InteractionRecord,
    MessageRecord,
)

SHARDS = 2


class FastShardedBot(ShardedIdeficsBot):
    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        return None


async def guild_on_shard(fake: FakeDiscord, shard: int, name: str = "Other Guild") -> FakeGuild:
    """A new guild of the fake whose id puts it on `shard` (of `SHARDS`): ids carry the time in ms."""
    while True:
        guild = fake.add_guild(name)
        if shard_of(guild.id, SHARDS) == shard:
            return guild
        del fake.guilds[guild.id]
        await asyncio.sleep(0.002)


def identified_shards(fake: FakeDiscord) -> list[list[int]]:
    return [frame["d"]["shard"] for frame in fake.gateway_frames if frame["op"] == 2]


@contextlib.asynccontextmanager
async def sharded(fake: FakeDiscord, services: Services, **kwargs: Any) -> AsyncIterator[RunningBot]:
    bot = FastShardedBot(services, guild_ready_timeout=0.01, **kwargs)
    async with fake.running(bot):
        yield RunningBot(fake=fake, bot=bot, services=services, world=fake.world)


async def slash(running: RunningBot, name: str, channel: FakeChannel, member: Any) -> InteractionRecord:
    payload = running.fake.slash_command_payload(name, channel=channel, member=member)
    interaction_id = int(payload["id"])
    done = asyncio.ensure_future(running.bot.wait_for(
        "app_command_completion", check=lambda interaction, _command: interaction.id == interaction_id, timeout=20))
    await asyncio.sleep(0)
    assert await running.fake.dispatch("INTERACTION_CREATE", payload) == 1
    await done
    return running.fake.interaction_responses(interaction_id)


def replies(fake: FakeDiscord, asked: MessageRecord) -> list[MessageRecord]:
    return [m for m in fake.sent_messages()
            if m.message_reference and int(m.message_reference["message_id"]) == asked.id]


def pending(message: MessageRecord, channel_id: int, age_s: float = 3600) -> NewMessage:
    """A request as the pipeline stores it, left "pending" by a crashed run `age_s` ago (too old: told)."""
    return NewMessage(platform_id=str(message.id), channel_key=str(channel_id), role="user",
                      author_id=message.payload["author"]["id"], author_name="bob", text=message.content,
                      request_state="pending", created_at=datetime.now(UTC) - timedelta(seconds=age_s))


@pytest.fixture
def shard_settings(bot_settings: Settings) -> Callable[..., Settings]:
    def make(**changes: Any) -> Settings:
        return bot_settings.model_copy(update=changes)

    return make


async def test_two_shards_in_one_process_answer_guilds_dms_and_commands(
    fake_discord: FakeDiscord, shard_settings: Callable[..., Settings], services_factory: Callable[..., Any]
) -> None:
    fake, world = fake_discord, fake_discord.world
    home_shard = shard_of(world.guild.id, SHARDS)
    other = await guild_on_shard(fake, 1 - home_shard)
    other_channel = fake.add_text_channel(other, "elsewhere")
    carol = fake.add_member(other, "carol", roles=[fake.add_role(other, "Moderator", MANAGE_CHANNELS)])
    async with services_factory(shard_settings(discord_shards=SHARDS)) as services:
        assert type(create_bot(services)) is ShardedIdeficsBot
        async with sharded(fake, services) as running:
            bot = running.bot
            assert fake.identify_count == 2 and identified_shards(fake) == [[0, 2], [1, 2]]
            assert bot.shard_count == SHARDS and sorted(bot.shards) == [0, 1]
            assert bot.shard_scope == (SHARDS, frozenset({0, 1}))
            assert bot.get_guild(world.guild.id).shard_id == home_shard  # type: ignore[union-attr]
            assert bot.get_guild(other.id).shard_id == 1 - home_shard  # type: ignore[union-attr]
            assert fake.commands()  # this process runs shard 0: it registered the commands

            asked = [
                await fake.send_message_as(world.member, world.general, "what is this?", mentions_bot=True),
                await fake.send_message_as(carol, other_channel, "and this?", mentions_bot=True),
                await fake.send_message_as(world.member, world.dm, "hello in private"),
            ]
            for message, channel in zip(asked, [world.general, other_channel, world.dm], strict=True):
                answer = await answer_to(running, channel, message)
                assert answer.content and not answer.content.startswith("⏳")
            await settle(running)
            assert [len(replies(fake, message)) for message in asked] == [1, 1, 1]

            record = await slash(running, "reset", other_channel, carol)
            assert record.deferred and record.original is not None
            assert record.original.content.startswith("History cleared:")


async def test_auto_takes_discords_recommended_count(
    fake_discord: FakeDiscord, shard_settings: Callable[..., Settings], services_factory: Callable[..., Any]
) -> None:
    fake_discord.shard_count = SHARDS
    async with services_factory(shard_settings(discord_shards="auto")) as services:
        async with sharded(fake_discord, services) as running:
            assert running.bot.shard_count == SHARDS and sorted(running.bot.shards) == [0, 1]
            assert identified_shards(fake_discord) == [[0, 2], [1, 2]]
            assert fake_discord.requests_to("GET", "/gateway/bot")


async def test_two_processes_recover_only_their_own_shards_requests(
    fake_discord: FakeDiscord, shard_settings: Callable[..., Settings], services_factory: Callable[..., Any]
) -> None:
    """A restarted process must leave alone the requests of channels on another process's shards."""
    fake, world = fake_discord, fake_discord.world
    home_shard = shard_of(world.guild.id, SHARDS)
    other = await guild_on_shard(fake, 1 - home_shard)
    carol = fake.add_member(other, "carol", roles=[fake.add_role(other, "Moderator", MANAGE_CHANNELS)])
    channels = {home_shard: (world.general, world.member),
                1 - home_shard: (fake.add_text_channel(other, "elsewhere"), carol)}
    moderator_on_shard1 = world.moderator if home_shard == 1 else carol
    spare_on_shard1 = fake.add_text_channel(world.guild if home_shard == 1 else other, "spare")
    on_shard0 = await fake.send_message_as(channels[0][1], channels[0][0], "zero?", mentions_bot=True)
    on_shard1 = await fake.send_message_as(channels[1][1], channels[1][0], "one?", mentions_bot=True)
    in_dm = await fake.send_message_as(world.member, world.dm, "private?")  # DMs: shard 0
    gone_channel = fake.add_text_channel(other, "deleted since")
    in_gone = await fake.send_message_as(carol, gone_channel, "lost?", mentions_bot=True)
    del fake.channels[gone_channel.id]  # now 404: counts as shard 0's
    other.channels.remove(gone_channel)
    settings = shard_settings(discord_shards=SHARDS)
    async with services_factory(settings) as services:
        store = services.conversation.store
        for message, channel in [(on_shard0, channels[0][0]), (on_shard1, channels[1][0]), (in_dm, world.dm),
                                 (in_gone, gone_channel)]:
            await store.append_message(pending(message, channel.id))

        async def state(message: MessageRecord) -> str:
            return (await store.get_message(str(message.id))).request_state  # type: ignore[union-attr]

        async with sharded(fake, services, shard_ids=[1]) as second:
            report = await eventually(lambda: second.bot.recovery, what="recovery of the shard-1 process")
            assert (report.told, report.dropped, report.resumed, report.elsewhere) == (1, 0, 0, 3)
            assert identified_shards(fake) == [[1, 2]]
            assert fake.commands() == []  # the process running shard 0 registers them
            record = await slash(second, "reset", spare_on_shard1, moderator_on_shard1)  # but each handles them
            assert record.original is not None and record.original.content.startswith("History cleared:")
            assert [await state(m) for m in (on_shard0, on_shard1, in_dm, in_gone)] == [
                "pending", "failed", "pending", "pending"]

            async with sharded(fake, services, shard_ids=[0]) as first:
                report = await eventually(lambda: first.bot.recovery, what="recovery of the shard-0 process")
                assert (report.told, report.dropped, report.resumed, report.elsewhere) == (2, 1, 0, 0)
                assert identified_shards(fake) == [[1, 2], [0, 2]]
                assert [await state(m) for m in (on_shard0, on_shard1, in_dm, in_gone)] == ["failed"] * 4

        for message in (on_shard0, on_shard1, in_dm):
            assert [m.content for m in replies(fake, message)] == [RESTARTED]


def test_shard_of_follows_discord() -> None:
    assert shard_of(None, 4) == 0  # DMs
    guild_id = (123_456 << 22) | 999
    assert shard_of(guild_id, 1) == 0 and shard_of(guild_id, 4) == 123_456 % 4


async def test_unsharded_bot_owns_every_channel(services: Services) -> None:
    bot = create_bot(services)
    assert type(bot) is IdeficsBot and bot.shard_scope is None
    assert bot.runs_shard_of(None) and bot.runs_shard_of(1 << 40)
    sharded_bot = FastShardedBot(services, shard_count=4, shard_ids=[1, 3])
    assert sharded_bot.shard_scope == (4, frozenset({1, 3}))
    assert not sharded_bot.runs_shard_of(None) and sharded_bot.runs_shard_of(1 << 22)


@pytest.mark.parametrize(("env", "expected"), [
    ({}, (None, None)),
    ({"DISCORD_SHARDS": ""}, (None, None)),
    ({"DISCORD_SHARDS": "auto"}, ("auto", None)),
    ({"DISCORD_SHARDS": "4", "DISCORD_SHARD_IDS": "0, 2"}, (4, (0, 2))),
    ({"DISCORD_SHARDS": "x"}, "DISCORD_SHARDS"),
    ({"DISCORD_SHARDS": "0"}, "DISCORD_SHARDS"),
    ({"DISCORD_SHARD_IDS": "0"}, "DISCORD_SHARD_IDS"),
    ({"DISCORD_SHARDS": "auto", "DISCORD_SHARD_IDS": "0"}, "DISCORD_SHARD_IDS"),
    ({"DISCORD_SHARDS": "2", "DISCORD_SHARD_IDS": "0,2"}, "DISCORD_SHARD_IDS"),
    ({"DISCORD_SHARDS": "2", "DISCORD_SHARD_IDS": "1,1"}, "DISCORD_SHARD_IDS"),
])
def test_shard_settings(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: Any) -> None:
    for name in ("DISCORD_SHARDS", "DISCORD_SHARD_IDS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if isinstance(expected, str):
        with pytest.raises(ValidationError) as caught:
            Settings(_env_file=None)  # type: ignore[call-arg]
        assert str(caught.value.errors()[0]["loc"][0]).upper() == expected
        return
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (settings.discord_shards, settings.discord_shard_ids) == expected

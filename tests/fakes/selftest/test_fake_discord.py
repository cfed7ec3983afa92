"""Self-tests: the real discord.py client against the loopback fake."""

from __future__ import annotations

import asyncio
import collections

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.gateway import DiscordWebSocket
from discord.http import Route

from tests.fakes.discord_api import FakeDiscord, MessageRecord

PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"fake image bytes" * 8


class Bot(discord.Client):
    """A minimal bot written for these tests (not the product's bot)."""

    def __init__(self, fake: FakeDiscord, **options):
        intents = discord.Intents.default()
        intents.message_content = True
        intents.members = True
        super().__init__(intents=intents, guild_ready_timeout=0.01, **options)
        self.fake = fake
        self.tree = app_commands.CommandTree(self)
        self.seen: list[discord.Message] = []
        self.seen_event = asyncio.Event()
        self.resumed = asyncio.Event()
        self.replies: list[discord.Message] = []

    async def on_message(self, message: discord.Message) -> None:
        self.seen.append(message)
        self.seen_event.set()
        if message.author == self.user:
            return
        if message.content.startswith("!echo"):
            sizes = [len(await a.read()) for a in message.attachments]
            reply = await message.reply(
                f"{message.author.mention} got {sizes}",
                allowed_mentions=discord.AllowedMentions.none(),
            )
            self.replies.append(reply)
            await reply.edit(content=f"edited: got {sizes}")
        elif message.content == "!dm":
            self.replies.append(await message.channel.send("hello in DM"))

    async def on_resumed(self) -> None:
        self.resumed.set()


def seen_with(bot: Bot, content: str) -> list[discord.Message]:
    return [m for m in bot.seen if m.content == content]


async def test_login_ready_and_cache(fake_discord: FakeDiscord) -> None:
    world = fake_discord.world
    bot = Bot(fake_discord)
    async with fake_discord.running(bot):
        assert bot.user is not None and bot.user.id == fake_discord.bot.id
        assert bot.application_id == fake_discord.application_id
        guild = bot.get_guild(world.guild.id)
        assert guild is not None and guild.name == "Test Guild"
        assert {c.name for c in guild.text_channels} == {"general", "images"}
        thread = guild.get_thread(world.thread.id)
        assert thread is not None and thread.parent_id == world.general.id
        assert thread.starter_message is not None or (await world_starter(bot, world)).id == world.thread.id
        mod = guild.get_member(world.moderator.id)
        regular = guild.get_member(world.member.id)
        assert mod is not None and regular is not None and guild.me is not None
        assert guild.member_count == len(guild.members) == 4  # bot, owner, moderator, member
        assert mod.guild_permissions.manage_channels
        assert not regular.guild_permissions.manage_channels
        assert guild.chunked
    assert fake_discord.identify_count == 1
    assert not fake_discord.unknown_routes


async def world_starter(bot: Bot, world) -> discord.Message:
    channel = bot.get_channel(world.general.id)
    return await channel.fetch_message(world.thread.id)


async def test_attachment_download_reply_and_edit(fake_discord: FakeDiscord) -> None:
    world = fake_discord.world
    bot = Bot(fake_discord)
    attachment = fake_discord.add_attachment(PNG_BYTES, "cat.png", width=8, height=8)
    async with fake_discord.running(bot):
        sent = await fake_discord.send_message_as(
            world.member, world.general, "!echo what is this?", attachments=[attachment], mentions_bot=False
        )
        reply = await fake_discord.wait_for_message(world.general, lambda m: m.content.startswith("edited"))
        assert reply.content == f"edited: got [{len(PNG_BYTES)}]"
        assert reply.allowed_mentions == discord.AllowedMentions.none().to_dict() == {"parse": []}
        assert reply.message_reference is not None
        assert int(reply.message_reference["message_id"]) == sent.id
        assert reply.payload["type"] == 19 and reply.payload["referenced_message"]["id"] == str(sent.id)
        assert reply.mentions == []  # the author's mention in the text did not ping
        edits = fake_discord.edits_of(reply.id)
        assert [e["content"] for e in edits] == [reply.content]
        assert fake_discord.sent_messages(world.general) == [reply]
        # the attachment was downloaded from the fake itself
        download = await fake_discord.wait_for_request(lambda r: r.path.startswith("/attachments/"))
        assert download.method == "GET" and download.status == 200
        # discord.py saw the user's message, and its own reply, over the gateway
        await fake_discord.wait_for(lambda: any(m.id == reply.id for m in bot.seen), what="own message")
        own = next(m for m in bot.seen if m.id == reply.id)
        assert own.author == bot.user
        assert bot.replies[0].content == f"{world.member.mention} got [{len(PNG_BYTES)}]"
        assert bot.seen[0].attachments[0].filename == "cat.png"


async def test_mentions_honour_allowed_mentions(fake_discord: FakeDiscord) -> None:
    world = fake_discord.world
    bot = Bot(fake_discord)
    async with fake_discord.running(bot):
        channel = bot.get_channel(world.images.id)
        text = f"<@{world.member.id}> <@&{world.mod_role.id}> @everyone"
        await channel.send(text, allowed_mentions=discord.AllowedMentions.none())
        pinged = await channel.send(text)
        quiet = fake_discord.sent_messages(world.images)[0]
        assert quiet.mentions == [] and quiet.mention_roles == [] and not quiet.mention_everyone
        loud = fake_discord.messages[pinged.id]
        assert loud.mentions == [world.member.id] and loud.mention_roles == [world.mod_role.id]
        assert loud.mention_everyone
        # Discord's limits are enforced
        with pytest.raises(discord.HTTPException) as err:
            await channel.send("x" * 2001)
        assert err.value.code == 50035
        # a fetched message (e.g. a replied-to one) comes back from the store
        fetched = await channel.fetch_message(pinged.id)
        assert fetched.content == text


async def test_slash_command_defer_edit_followup(fake_discord: FakeDiscord) -> None:
    world = fake_discord.world
    bot = Bot(fake_discord)
    guild_obj = discord.Object(world.guild.id)
    calls: list[tuple[str, int]] = []

    @bot.tree.command(name="ask", description="Ask about an image")
    async def ask(interaction: discord.Interaction, image: discord.Attachment, question: str) -> None:
        await interaction.response.defer(thinking=True)
        data = await image.read()
        calls.append((question, len(data)))
        await interaction.edit_original_response(content=f"answer about {image.filename} ({len(data)} bytes)")
        await interaction.followup.send("more details", allowed_mentions=discord.AllowedMentions.none())

    @bot.tree.command(name="ping", description="Guild only", guild=guild_obj)
    async def ping(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("pong", ephemeral=True)

    async with fake_discord.running(bot):
        synced = await bot.tree.sync()
        synced_guild = await bot.tree.sync(guild=guild_obj)
        assert [c.name for c in synced] == ["ask"] and synced[0].id > 0
        assert [c.name for c in synced_guild] == ["ping"]
        assert [c["name"] for c in fake_discord.commands()] == ["ask"]
        assert [c["name"] for c in fake_discord.commands(world.guild)] == ["ping"]
        options = {o["name"]: o["type"] for o in fake_discord.commands()[0]["options"]}
        assert options == {"image": 11, "question": 3}
        fetched = await bot.tree.fetch_commands()
        assert [c.id for c in fetched] == [c.id for c in synced]

        image = fake_discord.add_attachment(PNG_BYTES, "dog.png")
        record = await fake_discord.invoke_slash(
            "ask", {"image": image, "question": "what?"}, channel=world.images, member=world.member
        )
        await fake_discord.wait_for(lambda: record.followups, what="followup")
        assert calls == [("what?", len(PNG_BYTES))]
        assert record.deferred and record.response_type == 5
        assert record.original is not None and not record.original.loading
        assert record.original.content == f"answer about dog.png ({len(PNG_BYTES)} bytes)"
        assert record.original_edits[0]["content"] == record.original.content
        assert [m.content for m in record.followups] == ["more details"]
        assert record.followups[0].allowed_mentions == {"parse": []}
        assert fake_discord.interaction_responses(record.id) is record
        assert {m.content for m in fake_discord.sent_messages(world.images)} == {
            record.original.content,
            "more details",
        }

        pong = await fake_discord.invoke_slash("ping", channel=world.general, member=world.moderator)
        await fake_discord.wait_for(lambda: pong.original, what="pong")
        assert pong.response_type == 4 and pong.original.content == "pong" and pong.ephemeral
    assert not fake_discord.unknown_routes


async def test_message_context_menu(fake_discord: FakeDiscord) -> None:
    world = fake_discord.world
    bot = Bot(fake_discord)
    targets: list[tuple[int, str]] = []

    @bot.tree.context_menu(name="Describe image")
    async def describe(interaction: discord.Interaction, message: discord.Message) -> None:
        targets.append((message.id, message.attachments[0].filename))
        await interaction.response.send_message(f"describing {message.id}")

    async with fake_discord.running(bot):
        await bot.tree.sync()
        image = fake_discord.add_attachment(PNG_BYTES, "bird.png")
        target = await fake_discord.send_message_as(world.member, world.images, "look", attachments=[image])
        record = await fake_discord.invoke_context_menu(
            "Describe image", target, channel=world.images, member=world.moderator
        )
        await fake_discord.wait_for(lambda: record.original, what="context menu answer")
        assert targets == [(target.id, "bird.png")]
        assert record.original.content == f"describing {target.id}"
        assert record.original.payload["type"] == 23


async def test_dm_message(fake_discord: FakeDiscord) -> None:
    world = fake_discord.world
    bot = Bot(fake_discord)
    async with fake_discord.running(bot):
        await fake_discord.send_message_as(world.member, world.dm, "!dm")
        answer = await fake_discord.wait_for_message(world.dm)
        assert answer.content == "hello in DM"
        incoming = next(m for m in bot.seen if m.content == "!dm")
        assert isinstance(incoming.channel, discord.DMChannel) and incoming.guild is None
        # opening a DM from the bot side returns the same channel
        user = await bot.fetch_user(world.member.id)
        dm = await user.create_dm()
        assert dm.id == world.dm.id


async def test_rate_limited_edit_is_retried(fake_discord: FakeDiscord) -> None:
    world = fake_discord.world
    bot = Bot(fake_discord)
    async with fake_discord.running(bot):
        channel = bot.get_channel(world.general.id)
        message = await channel.send("first")
        fake_discord.rate_limit_next("PATCH", "/channels/{channel_id}/messages/{message_id}", 0.2)
        await message.edit(content="second")
        patches = fake_discord.requests_to("PATCH", f"/channels/{world.general.id}/messages/*")
        assert [r.status for r in patches] == [429, 200]
        assert fake_discord.messages[message.id].content == "second"
        assert len(fake_discord.edits_of(message.id)) == 1


async def test_gateway_close_resumes_and_replays_once(fake_discord: FakeDiscord) -> None:
    world = fake_discord.world
    bot = Bot(fake_discord)
    async with fake_discord.running(bot):
        await fake_discord.close_gateway(code=4000)
        missed = await fake_discord.send_message_as(world.member, world.general, "sent while away")
        await asyncio.wait_for(bot.resumed.wait(), 5)
        assert fake_discord.resume_count == 1 and fake_discord.identify_count == 1
        after = await fake_discord.send_message_as(world.member, world.general, "after resume")
        await fake_discord.wait_for(lambda: seen_with(bot, "after resume"), what="event after resume")
        await asyncio.sleep(0.05)  # give a duplicate the chance to show up
        counts = collections.Counter(m.id for m in bot.seen)
        assert counts[missed.id] == 1 and counts[after.id] == 1


async def test_clean_close_leaves_no_tasks(fake_discord: FakeDiscord) -> None:
    bot = Bot(fake_discord)
    before = asyncio.all_tasks()
    async with fake_discord.running(bot):
        pass
    assert bot.is_closed()
    await asyncio.sleep(0)
    leftover = [t for t in asyncio.all_tasks() - before if not t.done()]
    assert not [t for t in leftover if "discord" in repr(t.get_coro())], leftover


async def test_raw_http_contract_and_patch_is_undone() -> None:
    original = (Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY)
    async with FakeDiscord() as fake:
        with fake.patch_discord():
            assert Route.BASE == fake.api_base
        assert (Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY) == original
        auth = {"Authorization": f"Bot {fake.token}"}
        async with aiohttp.ClientSession() as http:
            async with http.get(fake.api_base + "/users/@me", headers=auth) as resp:
                assert resp.status == 200 and resp.headers["Content-Type"] == "application/json"
            async with http.get(fake.api_base + "/users/@me") as resp:
                assert resp.status == 401
            async with http.get(fake.api_base + "/no/such/route", headers=auth) as resp:
                assert resp.status == 404 and resp.headers["Content-Type"] == "application/json"
                assert "no route" in (await resp.json())["message"]
            async with http.get(fake.api_base + "/gateway/bot", headers=auth) as resp:
                assert (await resp.json())["shards"] == 1
        assert fake.unknown_routes == ["GET /no/such/route"]


class FastShardedClient(discord.AutoShardedClient):
    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        return None  # discord.py sleeps 5 s before every identify but the first


async def test_auto_sharded_client(fake_discord: FakeDiscord) -> None:
    fake_discord.shard_count = 2
    intents = discord.Intents.default()
    intents.message_content = True
    bot = FastShardedClient(intents=intents, guild_ready_timeout=0.01)
    async with fake_discord.running(bot):
        assert bot.shard_count == 2
        assert bot.get_guild(fake_discord.world.guild.id) is not None
    assert fake_discord.identify_count == 2


async def test_message_events_helpers(fake_discord: FakeDiscord) -> None:
    world = fake_discord.world
    bot = Bot(fake_discord)
    got: dict[str, list] = collections.defaultdict(list)

    @bot.event
    async def on_raw_message_edit(payload):
        got["edit"].append(payload.message_id)

    @bot.event
    async def on_raw_message_delete(payload):
        got["delete"].append(payload.message_id)

    @bot.event
    async def on_raw_bulk_message_delete(payload):
        got["bulk"].append(sorted(payload.message_ids))

    @bot.event
    async def on_thread_create(thread):
        got["thread"].append(thread.id)

    async with fake_discord.running(bot):
        a = await fake_discord.send_message_as(world.member, world.thread, "in thread")
        b = await fake_discord.send_message_as(world.member, world.general, "b")
        c = await fake_discord.send_message_as(world.member, world.general, "c")
        await fake_discord.dispatch_message_update(a, content="in thread (edited)")
        await fake_discord.dispatch_message_delete(a)
        await fake_discord.dispatch_message_delete_bulk([b, c])
        thread = await fake_discord.create_thread(world.general, "new thread", owner=world.member)
        await fake_discord.wait_for(lambda: got["thread"], what="thread create")
        assert got == {"edit": [a.id], "delete": [a.id], "bulk": [sorted([b.id, c.id])], "thread": [thread.id]}
        in_thread = next(m for m in bot.seen if m.id == a.id)
        assert isinstance(in_thread.channel, discord.Thread)
        assert isinstance(b, MessageRecord)


async def test_file_upload_typing_and_followup_file(fake_discord: FakeDiscord) -> None:
    import io

    world = fake_discord.world
    bot = Bot(fake_discord)

    @bot.tree.command(name="draw", description="Sends a file")
    async def draw(interaction: discord.Interaction) -> None:
        await interaction.response.defer()
        await interaction.followup.send("here", file=discord.File(io.BytesIO(PNG_BYTES), "out.png"))

    async with fake_discord.running(bot):
        await bot.tree.sync()
        channel = bot.get_channel(world.images.id)
        async with channel.typing():
            sent = await channel.send("file", file=discord.File(io.BytesIO(PNG_BYTES), "a.png"))
        assert sent.attachments[0].filename == "a.png"
        assert await sent.attachments[0].read() == PNG_BYTES
        record = fake_discord.messages[sent.id]
        assert record.files[0].data == PNG_BYTES and record.files[0].filename == "a.png"
        assert fake_discord.requests_to("POST", f"/channels/{world.images.id}/typing")
        await sent.add_reaction("👍")
        interaction = await fake_discord.invoke_slash("draw", channel=world.images, member=world.member)
        await fake_discord.wait_for(lambda: interaction.followups, what="followup with file")
        followup = interaction.followups[0]
        assert fake_discord.attachment_bytes(followup.attachments[0]) == PNG_BYTES
        assert interaction.original is not None and interaction.original.loading  # deferred, never edited
    assert not fake_discord.unknown_routes

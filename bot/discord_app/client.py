"""The Discord client: which events it listens to, and how each becomes a call into the pipeline.

Thin by design: Discord objects are turned into the project's own types here (`bot.discord_app.incoming`), a
message's trigger facts and its thread's starter in `bot.discord_app.ingest`, the rules of when to answer in
`bot.discord_app.triggers`, storing and generating in `bot.pipeline.conversation`, delivery of an answer in
`bot.discord_app.answering` and `bot.discord_app.replies`, edits and deletions in `bot.discord_app.history_events`.

Order: each message is handled in a task of its own (on_message returns at once), but the messages of one
channel are recorded in the order they arrived (a chain of ingest tasks per channel) and answered in that
order (the pipeline's per-channel lock); answers of different channels run together and share batches.

Restarts: once ready, requests a crashed run left "pending" are answered or their authors told
(`bot.discord_app.recovery`). Shutdown (`drain`): new requests are stored but not started (they stay "pending" for the
next start), running answers get a grace period, then are cancelled with a short notice and stay "pending". The
first message of every answer is stored with its request as it is sent, so the next start continues in it (the cut
off text, or the notice) instead of leaving it beside a new one.

Sharding (`DISCORD_SHARDS`, `DISCORD_SHARD_IDS`): `create_bot` picks the class. Unset, `IdeficsBot` is a plain
`commands.Bot` on one gateway connection. Set, `ShardedIdeficsBot` adds discord.py's `AutoShardedBot`: several
connections in this process, each with its share of the guilds (Discord sends a guild's events to shard
`(guild_id >> 22) % shard_count`, DMs to shard 0). Everything else is the same class: a channel's events all
reach one shard, so the per-channel ordering above holds within a process. Several processes may split the
shards and share one database; then only the process running shard 0 syncs the slash commands, and each
process's restart recovery touches only its own shards' channels (`bot.discord_app.recovery`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

import discord
from discord.ext import commands

from bot.discord_app.answering import NOTICE_TIMEOUT_S, answer_in_reply
from bot.discord_app.attachments import images_from_message
from bot.discord_app.cogs import EXTENSIONS
from bot.discord_app.command_errors import IdeficsCommandTree
from bot.discord_app.gateway_guard import guard_parsers
from bot.discord_app.history_events import apply_edit, forget_channel, forget_messages, forget_thread
from bot.discord_app.incoming import channel_key, clean_text, to_incoming
from bot.discord_app.ingest import PERSON_TYPES, ThreadStarters, message_facts
from bot.discord_app.readable import nothing_to_read, unreadable_note
from bot.discord_app.recovery import RecoveryReport, recover_pending, shard_of
from bot.discord_app.replies import send_notice
from bot.discord_app.triggers import decide
from bot.errors import RateLimited, UnreadableFile
from bot.pipeline.limits import UserLimiter
from bot.pipeline.services import Services
from storage import StorageError, StoredMessage

log = logging.getLogger(__name__)

STORAGE_FAILED = "I could not save your message right now; please try again in a minute"

def bot_intents() -> discord.Intents:
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    intents.dm_messages = True
    intents.message_content = True  # privileged: enable "Message Content Intent" in the Developer Portal
    intents.members = True  # privileged: display names of mentioned members, permissions in /settings
    return intents


class IdeficsBot(commands.Bot):
    def __init__(self, services: Services, **kwargs: Any) -> None:
        kwargs.setdefault("intents", bot_intents())
        # Application commands only: no prefix, so no message is ever read as a text command (`on_message` below
        # does not hand messages to discord.py's command processing either).
        kwargs.setdefault("command_prefix", ())
        kwargs.setdefault("help_command", None)
        # Every failed interaction gets one short answer and one log line (`bot.discord_app.command_errors`).
        kwargs.setdefault("tree_cls", IdeficsCommandTree)
        # Model output must never ping: the default for every message, on top of each send's own.
        kwargs.setdefault("allowed_mentions", discord.AllowedMentions.none())
        super().__init__(**kwargs)
        guard_parsers(self)  # a malformed gateway event is logged and dropped, not the end of the connection
        self.services = services
        settings = services.settings
        self.limiter = UserLimiter(settings.user_max_inflight, settings.user_max_per_minute)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ingest_tail: dict[str, asyncio.Task[Any]] = {}
        self._starters = ThreadStarters(services)
        self._started_at = datetime.now(UTC)
        self._draining = False
        self._recovery: asyncio.Task[Any] | None = None
        self.recovery: RecoveryReport | None = None
        """What this start's recovery of an earlier run's requests did, once it is done."""
        self._live_requests: set[str] | None = set()
        """Requests this run recorded before its recovery finished (None after): recovery leaves them alone."""

    # -- lifecycle -----------------------------------------------------------------------------------
    async def setup_hook(self) -> None:
        self._adopt_identity()
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        guild_id = self.services.settings.discord_dev_guild_id
        if guild_id is not None:
            self.tree.copy_global_to(guild=discord.Object(guild_id))
        scope = self.shard_scope
        if scope is not None and 0 not in scope[1]:
            # The commands are the application's, not a shard's: one process (shard 0's) registers them.
            log.info("application commands registered by the process running shard 0")
        elif guild_id is not None:
            synced = await self.tree.sync(guild=discord.Object(guild_id))
            log.info("synced %d application commands to guild %s", len(synced), guild_id)
        else:
            synced = await self.tree.sync()
            log.info("synced %d application commands globally", len(synced))

    async def on_ready(self) -> None:
        self._adopt_identity()
        scope = self.shard_scope
        log.info("ready as user %s in %d guilds%s", self.user.id if self.user else "?", len(self.guilds),
                 "" if scope is None else f" (shards {sorted(scope[1])} of {scope[0]})")
        # Once per process (on_ready comes again after a new gateway session): channels resolve from here on.
        if self._recovery is None and not self._draining:
            self._recovery = self.spawn(self._recover(), name="recover-pending")

    async def _recover(self) -> None:
        try:
            self.recovery = await recover_pending(
                self, started_at=self._started_at, window_s=self.services.settings.resume_window_s,
                live=self._live_requests if self._live_requests is not None else ())
        finally:
            self._live_requests = None

    def _adopt_identity(self) -> None:
        if self.user is not None:
            conversation = self.services.conversation
            conversation.assistant_id = str(self.user.id)
            conversation.assistant_name = self.user.display_name

    @property
    def shard_scope(self) -> tuple[int, frozenset[int]] | None:
        """(shard count, the shard ids this process runs), or None on one unsharded connection (it sees all)."""
        return None

    def runs_shard_of(self, guild_id: int | None) -> bool:
        """Whether Discord sends this process the events of that guild (None: a DM)."""
        scope = self.shard_scope
        return scope is None or shard_of(guild_id, scope[0]) in scope[1]

    @property
    def draining(self) -> bool:
        """True once shutdown began: requests are stored but no new answer starts."""
        return self._draining

    async def drain(self, grace_s: float, *, hurry: asyncio.Event | None = None) -> None:
        """Stop starting answers; let running ones finish for `grace_s` (or until `hurry` is set), then cancel them.

        A cancelled answer's user is told briefly (`RESTARTING`) and its request stays "pending", so the next
        start answers it if it is recent. The connection stays open meanwhile: answers can still be delivered.
        """
        self._draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        log.info("shutting down: %d tasks running, up to %.1fs to finish", len(self._tasks), grace_s)
        hurried = asyncio.create_task(hurry.wait()) if hurry is not None else None
        try:
            while self._tasks and (hurried is None or not hurried.done()):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                waiting: set[asyncio.Task[Any]] = set(self._tasks) | ({hurried} if hurried else set())
                await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if hurried is not None:
                hurried.cancel()
        left = list(self._tasks)
        if left:
            log.info("cancelling %d tasks still running", len(left))
            for task in left:
                task.cancel()
            await asyncio.wait(left, timeout=NOTICE_TIMEOUT_S + 5)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await super().close()

    @property
    def tasks_running(self) -> int:
        """Messages being recorded or answered right now (tests wait for 0; shutdown cancels them)."""
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Run `coro` in a task the bot keeps (cancelled on close) and whose failure is logged."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    # -- messages ------------------------------------------------------------------------------------
    async def on_message(self, message: discord.Message) -> None:
        if self.user is None or message.author.id == self.user.id or message.type not in PERSON_TYPES:
            return
        if message.guild is None and not self.services.settings.answer_dms:
            return
        key = channel_key(message.channel)
        # Chained before the first await: the channel's messages are recorded in arrival order.
        previous = self._ingest_tail.get(key)
        task = self.spawn(self._ingest(message, previous), name=f"ingest-{message.id}")
        self._ingest_tail[key] = task
        task.add_done_callback(lambda t: self._ingest_tail.pop(key, None) if self._ingest_tail.get(key) is t
                               else None)

    async def _ingest(self, message: discord.Message, previous: asyncio.Task[Any] | None) -> None:
        try:
            await self._ingest_one(message, previous)
        except StorageError as exc:
            log.error("message %s not recorded: %s", message.id, type(exc).__name__)
            if self.user is not None and (self.user.id in message.raw_mentions or message.guild is None):
                await send_notice(message, STORAGE_FAILED)

    async def _ingest_one(self, message: discord.Message, previous: asyncio.Task[Any] | None) -> None:
        services = self.services
        store = services.conversation.store
        key = channel_key(message.channel)
        channel_settings = await store.channel_settings(key)
        assert self.user is not None
        facts = await message_facts(message, self.user.id, store)
        decision = decide(facts, answer_mode=channel_settings.answer_mode,
                          record_mode=channel_settings.record_mode, answer_dms=services.settings.answer_dms,
                          answer_bots=services.settings.answer_bots)
        if not decision.record:
            if previous is not None:
                await asyncio.wait({previous})
            return
        images, errors = await images_from_message(message, services.fetcher, services.settings.image_limits())
        unreadable = [e for e in errors if isinstance(e, UnreadableFile)]
        errors = [e for e in errors if not isinstance(e, UnreadableFile)]
        if previous is not None:
            await asyncio.wait({previous})
        if not images and not errors and not clean_text(message, self.user.id if self.user else None):
            # Nothing the model can read (a sticker, a voice message, a poll, a file): never an empty turn, in
            # the history or to the model; told so when it was written to the bot.
            if decision.answer and facts.addressed:
                log.info("message %s in channel %s: nothing to read (%d files left out)", message.id, key,
                         len(unreadable))
                await send_notice(message, nothing_to_read(message, unreadable))
            return
        # A forum post is its thread's starter and its first message at once (same id): stored once, as itself.
        if isinstance(message.channel, discord.Thread) and message.id != message.channel.id:
            await self._starters.ensure(message.channel, self.user.id if self.user else None)
        if decision.answer and self._draining and not errors:
            await self._record_for_later(message, images)
            return
        slot: contextlib.AbstractContextManager[None] | None = None
        refusal: str | None = None
        if decision.answer:
            try:
                slot = self.limiter.acquire(str(message.author.id))
            except RateLimited as exc:
                log.info("message %s from user %s refused: %s", message.id, message.author.id, exc.detail)
                refusal = exc.user_message
            if refusal is None and errors:
                refusal = errors[0].user_message
        incoming = to_incoming(message, self.user.id if self.user else None, images)
        if slot is not None and self._live_requests is not None:
            self._live_requests.add(incoming.platform_id)
        try:
            stored = await services.conversation.record(incoming, request=slot is not None)
        except BaseException:
            if slot is not None:
                with slot:
                    pass
            raise
        if stored is None:  # the same event twice (gateway resume): it was handled the first time
            if slot is not None:
                with slot:
                    pass
            return
        log.info("message %s recorded in channel %s: %d chars, %d images, answer=%s", message.id, key,
                 len(incoming.text), len(images), decision.answer)
        if refusal is not None:
            if slot is not None:
                with slot:
                    await store.set_request_state(stored.platform_id, "failed")
            await send_notice(message, refusal)
            return
        if slot is not None:
            if self._draining:  # shutdown began while the message was being stored: the next start answers it
                with slot:
                    log.info("request %s not started: shutting down, left pending", stored.platform_id)
                return
            self.spawn(self._answer(message, stored, slot, note=unreadable_note(unreadable)),
                       name=f"answer-{message.id}")

    async def _record_for_later(self, message: discord.Message, images: Any) -> None:
        """During shutdown: store a request as "pending" without starting it (the next start answers it)."""
        incoming = to_incoming(message, self.user.id if self.user else None, images)
        stored = await self.services.conversation.record(incoming, request=True)
        if stored is not None:
            log.info("request %s recorded during shutdown: left pending", stored.platform_id)

    def answer_recovered(self, message: discord.Message, stored: StoredMessage) -> None:
        """Answer a request of an earlier run (already claimed by `bot.discord_app.recovery`) in a task of its own."""
        self.spawn(self._answer(message, stored, None, recovered=True), name=f"recover-{message.id}")

    async def _answer(self, message: discord.Message, stored: StoredMessage,
                      slot: contextlib.AbstractContextManager[None] | None, *, recovered: bool = False,
                      note: str = "") -> None:
        """Answer `stored` in a reply to `message`; `note` (files left out) shows above the answer."""
        with slot if slot is not None else contextlib.nullcontext():
            await answer_in_reply(message, stored, self.services, draining=lambda: self._draining,
                                  recovered=recovered, note=note)

    # -- edits and deletions -------------------------------------------------------------------------
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        await apply_edit(payload, bot_user_id=self.user.id if self.user else None,
                         store=self.services.conversation.store, is_thread=self._is_thread)

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await forget_messages([payload.message_id], store=self.services.conversation.store,
                              is_thread=self._is_thread)

    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        await forget_messages(sorted(payload.message_ids), store=self.services.conversation.store,
                              is_thread=self._is_thread)

    def _is_thread(self, channel_id: int) -> bool:
        return isinstance(self.get_channel(channel_id), discord.Thread)

    # -- threads and channels ------------------------------------------------------------------------
    async def on_raw_thread_delete(self, payload: discord.RawThreadDeleteEvent) -> None:
        await forget_thread(payload.thread_id, self.services.conversation.store)
        self._starters.forget(payload.thread_id)

    async def on_guild_channel_delete(self, channel: discord.abc.GuildChannel) -> None:
        await forget_channel(channel.id, self.services.conversation.store)


class ShardedIdeficsBot(IdeficsBot, commands.AutoShardedBot):
    """`IdeficsBot` on several gateway connections (discord.py's `AutoShardedBot`); built by `create_bot`.

    Shard count and ids come from the settings unless given: a number, or `auto` for the count Discord
    recommends. Between two identifies discord.py waits 5 s (Discord's rate limit on starting sessions).
    """

    def __init__(self, services: Services, **kwargs: Any) -> None:
        settings = services.settings
        if isinstance(settings.discord_shards, int):
            kwargs.setdefault("shard_count", settings.discord_shards)
            if settings.discord_shard_ids is not None:
                kwargs.setdefault("shard_ids", list(settings.discord_shard_ids))
        super().__init__(services, **kwargs)

    async def setup_hook(self) -> None:
        if self.shard_count is None:
            # `auto`: asked here rather than by `launch_shards`, which would also take Discord's gateway URL
            # over `DISCORD_GATEWAY_URL`.
            self.shard_count, _, _ = await self.http.get_bot_gateway()
            log.info("Discord recommends %d shards", self.shard_count)
        await super().setup_hook()

    @property
    def shard_scope(self) -> tuple[int, frozenset[int]] | None:
        count = self.shard_count
        if count is None:  # `auto` before login: all shards will be this process's
            return None
        return count, frozenset(self.shard_ids if self.shard_ids is not None else range(count))


def create_bot(services: Services, **kwargs: Any) -> IdeficsBot:
    """The bot the settings ask for: `IdeficsBot` unless `DISCORD_SHARDS` is set, then `ShardedIdeficsBot`."""
    cls = IdeficsBot if services.settings.discord_shards is None else ShardedIdeficsBot
    return cls(services, **kwargs)

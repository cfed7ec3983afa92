"""The Discord client: which events it listens to, and how each becomes a call into the pipeline.

Thin by design: Discord objects are turned into the project's own types here (`bot.discord_app.incoming`), the
rules of when to answer are in `bot.discord_app.triggers`, storing and generating in `bot.pipeline.conversation`,
delivery in `bot.discord_app.replies`.

Order: each message is handled in a task of its own (on_message returns at once), but the messages of one
channel are recorded in the order they arrived (a chain of ingest tasks per channel) and answered in that
order (the pipeline's per-channel lock); answers of different channels run together and share batches.

Restarts: once ready, requests a crashed run left "pending" are answered or their authors told
(`bot.discord_app.recovery`). Shutdown (`drain`): new requests are stored but not started (they stay "pending" for the
next start), running answers get a grace period, then are cancelled with a short notice and stay "pending".

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

from bot.discord_app.attachments import images_from_message, sent_as_spoiler
from bot.discord_app.cogs import EXTENSIONS
from bot.discord_app.command_errors import IdeficsCommandTree
from bot.discord_app.forwards import is_forward
from bot.discord_app.gateway_guard import guard_parsers
from bot.discord_app.incoming import channel_key, starter_platform_id, to_incoming
from bot.discord_app.recovery import RecoveryReport, recover_pending, shard_of
from bot.discord_app.replies import MessageReplySink, send_notice
from bot.discord_app.triggers import MessageFacts, decide
from bot.errors import RateLimited
from bot.pipeline.limits import UserLimiter
from bot.pipeline.services import Services
from storage import NewMessage, StorageError, StoredMessage

log = logging.getLogger(__name__)

STORAGE_FAILED = "I could not save your message right now; please try again in a minute"
RESTARTING = "I am restarting, please ask again in a minute"
"""Shown in place of an answer cut off by a shutdown (the request stays "pending" for the next start)."""
NOTICE_TIMEOUT_S = 5.0
"""Most time spent telling one user, at shutdown, that their answer was cut off."""

_PERSON_TYPES = frozenset({discord.MessageType.default, discord.MessageType.reply})
"""Message types people write; the others are notices (joins, pins, thread created, ...)."""


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
        self._starters_checked: set[int] = set()
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
        if self.user is None or message.author.id == self.user.id or message.type not in _PERSON_TYPES:
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
        decision = decide(await self._facts(message), answer_mode=channel_settings.answer_mode,
                          record_mode=channel_settings.record_mode, answer_dms=services.settings.answer_dms,
                          answer_bots=services.settings.answer_bots)
        if not decision.record:
            if previous is not None:
                await asyncio.wait({previous})
            return
        images, errors = await images_from_message(message, services.fetcher, services.settings.image_limits())
        if previous is not None:
            await asyncio.wait({previous})
        # A forum post is its thread's starter and its first message at once (same id): stored once, as itself.
        if isinstance(message.channel, discord.Thread) and message.id != message.channel.id:
            await self._ensure_thread_starter(message.channel)
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
            self.spawn(self._answer(message, stored, slot), name=f"answer-{message.id}")

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
                      slot: contextlib.AbstractContextManager[None] | None, *, recovered: bool = False) -> None:
        with slot if slot is not None else contextlib.nullcontext():
            # An answer about a hidden picture would give it away: it is hidden too.
            sink = MessageReplySink.for_message(message, edit_interval_s=self.services.settings.stream_edit_interval_s,
                                                spoiler=sent_as_spoiler(message))
            try:
                async with sink:
                    await self.services.conversation.respond(stored, sink)
            except asyncio.CancelledError:
                if self._draining:
                    await self._cut_off(stored, sink, recovered=recovered)
                raise

    async def _cut_off(self, stored: StoredMessage, sink: MessageReplySink, *, recovered: bool) -> None:
        """A shutdown cancelled this answer: tell the user, and leave the request "pending" for the next start."""
        log.info("request %s cut off by shutdown: left pending", stored.platform_id)
        try:
            await asyncio.wait_for(sink.failed(RESTARTING), NOTICE_TIMEOUT_S)
        except (TimeoutError, discord.HTTPException):
            log.info("request %s: restart notice not delivered", stored.platform_id)
        if recovered:  # claimed as "failed" by the recovery: give it back
            try:
                await self.services.conversation.store.claim_request(stored.platform_id, "pending",
                                                                     expected="failed")
            except StorageError:
                log.warning("request %s left failed", stored.platform_id)

    async def _facts(self, message: discord.Message) -> MessageFacts:
        assert self.user is not None
        return MessageFacts(
            from_self=message.author.id == self.user.id,
            from_bot=message.author.bot or message.webhook_id is not None,
            is_dm=message.guild is None,
            mentions_bot=self.user.id in message.raw_mentions,
            replies_to_bot=await self._replies_to_bot(message),
            is_system=message.type not in _PERSON_TYPES,
            is_forward=is_forward(message),
        )

    async def _replies_to_bot(self, message: discord.Message) -> bool:
        reference = message.reference
        if reference is None or reference.message_id is None or self.user is None or is_forward(message):
            return False  # a forward points at the message it copies: forwarding the bot's answer is no reply
        resolved = reference.resolved
        if isinstance(resolved, discord.Message):
            return resolved.author.id == self.user.id
        # Not resolved (old message, or deleted): our own answers are in the store.
        stored = await self.services.conversation.store.get_message(str(reference.message_id))
        return stored is not None and stored.role == "assistant"

    async def _ensure_thread_starter(self, thread: discord.Thread) -> None:
        """Put the thread's starter message at the head of its history, once (it is the thread's topic).

        A thread started from a message of a text channel: that message lives in the parent channel, and its copy
        here is stored under `<id>:starter`. A forum (or media) post: the thread's first message lives in the
        thread itself, with the thread's id; it is this history's own first message, stored under its own id,
        once (it arrives as an ordinary message too, which `_ingest_one` does not send here).
        """
        if thread.id in self._starters_checked:
            return
        self._starters_checked.add(thread.id)
        store = self.services.conversation.store
        starter = thread.starter_message
        in_thread = (starter.channel.id == thread.id if starter is not None
                     else isinstance(thread.parent, discord.ForumChannel))
        platform_id = str(thread.id) if in_thread else starter_platform_id(thread.id)
        if await store.get_message(platform_id) is not None:
            return
        source = thread if in_thread else thread.parent
        if starter is None and source is not None:
            try:
                starter = await source.fetch_message(thread.id)  # type: ignore[union-attr]
            except discord.HTTPException as exc:  # a thread without a starter, or it was deleted
                log.info("thread %s: no starter message (HTTP %s)", thread.id, exc.status)
                return
        if starter is None:
            return
        images, _ = await images_from_message(starter, self.services.fetcher, self.services.settings.image_limits())
        incoming = to_incoming(starter, self.user.id if self.user else None, images,
                               channel_key_override=channel_key(thread), platform_id=platform_id)
        if self.user is not None and starter.author.id == self.user.id:
            await store.append_message(NewMessage(
                platform_id=platform_id, channel_key=incoming.channel_key, role="assistant",
                author_id=incoming.author_id, author_name=incoming.author_name, text=incoming.text,
                created_at=incoming.created_at,
            ))
        else:
            await self.services.conversation.record(incoming, request=False)
        log.info("thread %s: starter message %s recorded", thread.id, starter.id)

    # -- edits and deletions -------------------------------------------------------------------------
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        if "content" not in payload.data:
            return  # an embed unfurled, a pin: the text did not change
        message = payload.message
        if self.user is not None and message.author.id == self.user.id:
            return  # our own streaming edits: the final text is stored by the pipeline
        text = to_incoming(message, self.user.id if self.user else None).text
        store = self.services.conversation.store
        changed = await store.edit_message(str(payload.message_id), text)
        if isinstance(self.get_channel(payload.message_id), discord.Thread):
            changed |= await store.edit_message(starter_platform_id(payload.message_id), text)
        if changed:
            log.info("message %s edited: %d chars", payload.message_id, len(text))

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self._forget_messages([payload.message_id])

    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        await self._forget_messages(sorted(payload.message_ids))

    async def _forget_messages(self, message_ids: list[int]) -> None:
        ids = [str(i) for i in message_ids]
        # A deleted thread starter also leaves the thread's history (a thread's id is its starter's id).
        ids += [starter_platform_id(i) for i in message_ids if isinstance(self.get_channel(i), discord.Thread)]
        count = await self.services.conversation.store.delete_messages(ids)
        if count:
            log.info("%d of %d deleted messages removed from history", count, len(message_ids))

    # -- threads and channels ------------------------------------------------------------------------
    async def on_raw_thread_delete(self, payload: discord.RawThreadDeleteEvent) -> None:
        # A deleted thread's history can never be shown again: drop it rather than keep it forever.
        count = await self.services.conversation.store.clear_channel(str(payload.thread_id))
        self._starters_checked.discard(payload.thread_id)
        log.info("thread %s deleted: %d messages removed", payload.thread_id, count)

    async def on_guild_channel_delete(self, channel: discord.abc.GuildChannel) -> None:
        count = await self.services.conversation.store.clear_channel(str(channel.id))
        log.info("channel %s deleted: %d messages removed", channel.id, count)


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

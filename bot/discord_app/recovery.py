"""After a crash: answer the requests a previous run left "pending", or tell their authors to ask again.

A request is "pending" from the moment the user's message is stored until its answer is stored, so a process
killed in between (SIGKILL, the OOM killer, a power cut) leaves a trace. On the next start, once the client is
ready (channels can be resolved), each such request is first claimed, then acted on:

- claimed: a compare-and-set "pending" -> "failed" in one UPDATE, so of two processes starting together only
  one acts on a request. The claim comes before the action: a crash during recovery leaves the request
  "failed", so a request is retried at most once (it may be what kills the process) and never answered twice;
- made within `RESUME_WINDOW_S` of the start: answered through the normal pipeline as a reply to the original
  message (the pipeline marks it "answered"), in the message the cut-off answer had begun in, if it had one;
- older: a short reply saying the bot restarted and asking to ask again (in that message, if there is one);
- its channel or message is gone: left "failed", nothing is sent.

Requests of the terminal (channel "console") are not Discord's and are left alone.

Several processes, each running some of the shards, may share one database: a process recovers only the
requests of channels on its own shards, or it would claim requests that another live process is answering.
A channel's shard is Discord's: `(guild_id >> 22) % shard_count` for a guild's channels and threads, shard 0
for DMs. The request row holds only the channel id, so the channel is looked up: in the client's cache (this
process's guilds, with their channels and active threads), else over REST (a DM, an archived thread, or a
channel of another process's guild). A channel that is gone (404) or out of reach (403) counts as shard 0's,
so exactly one process drops its requests; when Discord cannot say (5xx, timeouts) the request is left
"pending" for a later start. Without sharding the process runs every shard and nothing is filtered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Container
from dataclasses import dataclass
from datetime import datetime, timedelta

import discord

from bot.discord_app.protocol import RecoveryHost
from bot.discord_app.replies import NO_MENTIONS, send_notice, sibling_message
from storage import StorageError, StoredMessage

log = logging.getLogger(__name__)

RESTARTED = "I was restarted and lost track of your question; please ask again"
"""The reply to a request cut off by a crash and too old to answer now."""


@dataclass(frozen=True)
class RecoveryReport:
    """What one start-up recovery did, for logs and tests."""

    resumed: int
    """Requests being answered again."""
    told: int
    """Authors told to ask again (their request was older than the window)."""
    dropped: int
    """Requests whose channel or message no longer exists, or that could not be reached."""
    skipped: int
    """Requests another process claimed first, or that this process is answering itself."""
    elsewhere: int = 0
    """Requests of channels on shards this process does not run (another process's), or whose channel Discord
    could not locate just now: left "pending"."""


def shard_of(guild_id: int | None, shard_count: int) -> int:
    """The shard Discord sends a guild's events to (`guild_id` None, a DM: shard 0)."""
    return 0 if guild_id is None else (guild_id >> 22) % shard_count


async def recover_pending(bot: RecoveryHost, *, started_at: datetime, window_s: float,
                          live: Container[str] = ()) -> RecoveryReport:
    """Act once on every Discord request left "pending" by an earlier run (made before `started_at`).

    `live`: platform ids this process has recorded as requests itself; they are being answered already.
    """
    store = bot.services.conversation.store
    cutoff = started_at - timedelta(seconds=window_s)
    try:
        requests = await store.pending_requests_before(started_at)
    except StorageError as exc:
        log.warning("pending requests of an earlier run not read: %s", type(exc).__name__)
        return RecoveryReport(0, 0, 0, 0)
    resumed = told = dropped = skipped = elsewhere = 0
    for request in requests:
        if not (request.platform_id.isdigit() and request.channel_key.isdigit()):
            continue  # the terminal's, or not a message: not ours to answer
        if bot.draining:
            log.info("recovery stopped: shutting down (%d requests left pending)", len(requests))
            break
        if request.platform_id in live:
            skipped += 1
            continue
        located = await _find_channel(bot, request)
        channel, guild_id = located if located is not None else (None, None)
        if bot.shard_scope is not None and (located is None or not bot.runs_shard_of(guild_id)):
            elsewhere += 1
            continue
        try:
            claimed = await store.claim_request(request.platform_id, "failed")
        except StorageError as exc:
            log.warning("request %s not claimed: %s", request.platform_id, type(exc).__name__)
            continue
        if not claimed:
            skipped += 1
            continue
        try:
            message = None if channel is None else await _find_message(channel, request)
        except asyncio.CancelledError:
            await _unclaim(bot, request)  # cancelled before acting: the next start may try it
            raise
        if message is None:
            dropped += 1
            continue
        if request.created_at < cutoff:
            log.info("request %s of an earlier run is %.0fs old: asking its author to ask again",
                     request.platform_id, (started_at - request.created_at).total_seconds())
            await _tell_to_ask_again(message, request)
            told += 1
        else:
            log.info("request %s of an earlier run: answering it now", request.platform_id)
            bot.answer_recovered(message, request)
            resumed += 1
    report = RecoveryReport(resumed, told, dropped, skipped, elsewhere)
    log.info("recovery done: %d resumed, %d told to ask again, %d dropped, %d skipped, %d on other shards",
             resumed, told, dropped, skipped, elsewhere)
    return report


_Channel = discord.abc.GuildChannel | discord.Thread | discord.abc.PrivateChannel


async def _find_channel(bot: RecoveryHost, request: StoredMessage) -> tuple[_Channel | None, int | None] | None:
    """The request's channel (None if gone or out of reach) and its guild's id (None: a DM, or gone).

    None when Discord could not say (5xx, timeouts): nobody knows whose it is.
    """
    channel_id = int(request.channel_key)
    channel = bot.get_channel(channel_id)
    if channel is None:
        try:
            channel = await bot.fetch_channel(channel_id)
        except (discord.NotFound, discord.Forbidden) as exc:
            log.info("request %s: channel %s gone (HTTP %s)", request.platform_id, channel_id, exc.status)
            return None, None
        except discord.HTTPException as exc:
            log.info("request %s: channel %s not looked up (HTTP %s)", request.platform_id, channel_id, exc.status)
            return None
    guild = getattr(channel, "guild", None)
    return channel, None if guild is None else guild.id


async def _find_message(channel: _Channel, request: StoredMessage) -> discord.Message | None:
    """The request's Discord message, or None if the message is gone or out of reach."""
    if not isinstance(channel, discord.abc.Messageable):
        log.info("request %s: channel %s cannot hold messages", request.platform_id, channel.id)
        return None
    try:
        return await channel.fetch_message(int(request.platform_id))
    except discord.HTTPException as exc:  # NotFound (deleted), Forbidden (no access any more), or Discord trouble
        log.info("request %s not recovered: HTTP %s (code %s)", request.platform_id, exc.status, exc.code)
        return None


async def _tell_to_ask_again(message: discord.Message, request: StoredMessage) -> None:
    """`RESTARTED` in the cut-off answer's message (so no stale part stays), else in a new reply."""
    if request.partial_reply_id is not None:
        partial = sibling_message(message, int(request.partial_reply_id))
        try:
            await partial.edit(content=RESTARTED, allowed_mentions=NO_MENTIONS)
            return
        except discord.HTTPException as exc:  # deleted meanwhile: a new reply
            log.info("request %s: partial reply not edited: HTTP %s", request.platform_id, exc.status)
    await send_notice(message, RESTARTED)


async def _unclaim(bot: RecoveryHost, request: StoredMessage) -> None:
    try:
        await bot.services.conversation.store.claim_request(request.platform_id, "pending", expected="failed")
    except StorageError:
        log.warning("request %s left failed", request.platform_id)

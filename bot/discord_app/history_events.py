"""Discord's edit and delete events applied to the stored history.

An edited message's stored text follows the edit (and a thread starter's copy with it); deleted messages leave the
history (a deleted thread starter also leaves its thread's history), and so does the whole history of a deleted
thread or channel. Each function takes the store and what it needs to know of the client (the bot's user id,
whether an id is a thread's) so that the client's event methods stay one call each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import discord

from bot.discord_app.incoming import starter_platform_id, to_incoming
from storage import Store

log = logging.getLogger(__name__)

IsThread = Callable[[int], bool]
"""Whether a channel id is a thread this client knows (a thread's id is its starter message's id)."""


async def apply_edit(payload: discord.RawMessageUpdateEvent, *, bot_user_id: int | None, store: Store,
                     is_thread: IsThread) -> None:
    """Replace a stored message's text with its edited text (not the bot's own streaming edits)."""
    if "content" not in payload.data:
        return  # an embed unfurled, a pin: the text did not change
    message = payload.message
    if bot_user_id is not None and message.author.id == bot_user_id:
        return  # our own streaming edits: the final text is stored by the pipeline
    text = to_incoming(message, bot_user_id).text
    changed = await store.edit_message(str(payload.message_id), text)
    if is_thread(payload.message_id):
        changed |= await store.edit_message(starter_platform_id(payload.message_id), text)
    if changed:
        log.info("message %s edited: %d chars", payload.message_id, len(text))


async def forget_messages(message_ids: list[int], *, store: Store, is_thread: IsThread) -> None:
    """Remove deleted messages from the history."""
    ids = [str(i) for i in message_ids]
    # A deleted thread starter also leaves the thread's history (a thread's id is its starter's id).
    ids += [starter_platform_id(i) for i in message_ids if is_thread(i)]
    count = await store.delete_messages(ids)
    if count:
        log.info("%d of %d deleted messages removed from history", count, len(message_ids))


async def forget_thread(thread_id: int, store: Store) -> None:
    """A deleted thread's history can never be shown again: drop it rather than keep it forever."""
    count = await store.clear_channel(str(thread_id))
    log.info("thread %s deleted: %d messages removed", thread_id, count)


async def forget_channel(channel_id: int, store: Store) -> None:
    """A deleted channel's history goes with it."""
    count = await store.clear_channel(str(channel_id))
    log.info("channel %s deleted: %d messages removed", channel_id, count)

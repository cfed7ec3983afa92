"""What the client learns about a message before recording it: its trigger facts, and its thread's starter.

`message_facts` reads what `bot.discord_app.triggers.decide` needs from a Discord message (one store read at
most: whether an unresolved reply points at one of the bot's stored answers). `ThreadStarters` puts a thread's
starter message at the head of the thread's history, once per thread and process. Both take the bot's user id
rather than the client, so the client (`bot.discord_app.client`) calls them and nothing here imports it.
"""

from __future__ import annotations

import logging

import discord

from bot.discord_app.attachments import images_from_message
from bot.discord_app.forwards import is_forward
from bot.discord_app.incoming import channel_key, starter_platform_id, to_incoming
from bot.discord_app.triggers import MessageFacts
from bot.pipeline.services import Services
from storage import NewMessage, Store

log = logging.getLogger(__name__)

PERSON_TYPES = frozenset({discord.MessageType.default, discord.MessageType.reply})
"""Message types people write; the others are notices (joins, pins, thread created, ...)."""


async def message_facts(message: discord.Message, bot_user_id: int, store: Store) -> MessageFacts:
    """The facts of `message` that decide whether it is recorded and answered."""
    return MessageFacts(
        from_self=message.author.id == bot_user_id,
        from_bot=message.author.bot or message.webhook_id is not None,
        is_dm=message.guild is None,
        mentions_bot=bot_user_id in message.raw_mentions,
        replies_to_bot=await replies_to_bot(message, bot_user_id, store),
        is_system=message.type not in PERSON_TYPES,
        is_forward=is_forward(message),
    )


async def replies_to_bot(message: discord.Message, bot_user_id: int | None, store: Store) -> bool:
    """Whether `message` is a reply to one of the bot's messages (not a forward of one)."""
    reference = message.reference
    if reference is None or reference.message_id is None or bot_user_id is None or is_forward(message):
        return False  # a forward points at the message it copies: forwarding the bot's answer is no reply
    resolved = reference.resolved
    if isinstance(resolved, discord.Message):
        return resolved.author.id == bot_user_id
    # Not resolved (old message, or deleted): our own answers are in the store.
    stored = await store.get_message(str(reference.message_id))
    return stored is not None and stored.role == "assistant"


class ThreadStarters:
    """Records each thread's starter message at the head of its history, once per thread (it is the topic)."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._checked: set[int] = set()
        """Threads whose starter this process stored or found stored (or found missing)."""

    def forget(self, thread_id: int) -> None:
        """The thread is gone (its history cleared): check its starter again should it come back."""
        self._checked.discard(thread_id)

    async def ensure(self, thread: discord.Thread, bot_user_id: int | None) -> None:
        """Put the thread's starter message at the head of its history, once (it is the thread's topic).

        A thread started from a message of a text channel: that message lives in the parent channel, and its copy
        here is stored under `<id>:starter`. A forum (or media) post: the thread's first message lives in the
        thread itself, with the thread's id; it is this history's own first message, stored under its own id,
        once (it arrives as an ordinary message too, which the client does not send here).
        """
        if thread.id in self._checked:
            return
        self._checked.add(thread.id)
        services = self._services
        store = services.conversation.store
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
        images, _ = await images_from_message(starter, services.fetcher, services.settings.image_limits())
        incoming = to_incoming(starter, bot_user_id, images,
                               channel_key_override=channel_key(thread), platform_id=platform_id)
        if bot_user_id is not None and starter.author.id == bot_user_id:
            await store.append_message(NewMessage(
                platform_id=platform_id, channel_key=incoming.channel_key, role="assistant",
                author_id=incoming.author_id, author_name=incoming.author_name, text=incoming.text,
                created_at=incoming.created_at,
            ))
        else:
            await services.conversation.record(incoming, request=False)
        log.info("thread %s: starter message %s recorded", thread.id, starter.id)

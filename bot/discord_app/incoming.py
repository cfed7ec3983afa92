"""Turning a Discord message into the pipeline's `IncomingMessage`: channel key, readable text, author.

Discord writes mentions as `<@123>`; the model should read names, and never its own mention (every request
in a server starts with it). A forward's text is the forwarded message's, marked (`bot.discord_app.forwards`);
it is never a reply.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import discord

from bot.discord_app.forwards import defuse_mark, forwarded_text, is_forward, snapshots
from bot.images.check import CheckedImage
from bot.pipeline.conversation import IncomingMessage

_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")
_CHANNEL_MENTION = re.compile(r"<#(\d+)>")
_CUSTOM_EMOJI = re.compile(r"<a?:(\w+):\d+>")

STARTER_SUFFIX = ":starter"
"""A thread's starter message lives in the parent channel under its own id (which is the thread's id); its
copy at the head of the thread's history is stored under `<id>:starter`, as platform ids are unique."""


def channel_key(channel: discord.abc.Snowflake) -> str:
    """A channel's history key: its id (a thread is its own channel, a DM too)."""
    return str(channel.id)


def starter_platform_id(thread_id: int) -> str:
    return f"{thread_id}{STARTER_SUFFIX}"


def clean_text(message: discord.Message, bot_id: int | None) -> str:
    """The message's text as the model should read it: the bot's mention removed, others as names; a forward's
    text is the forwarded message's, behind the forwarded mark (typed marks are broken)."""
    names = {user.id: user.display_name for user in message.mentions}
    own = defuse_mark(_readable(message.content, names, message.guild, bot_id))
    if not is_forward(message):
        return own
    forwarded = "\n".join(defuse_mark(_readable(s.content, names, message.guild, bot_id))
                          for s in snapshots(message)).strip()
    return "\n".join([*([own] if own else []), forwarded_text(forwarded)])


def _readable(content: str, names: dict[int, str], guild: discord.Guild | None, bot_id: int | None) -> str:
    """`content` with mentions as names (the bot's own removed) and custom emoji as `:name:`."""

    def user(match: re.Match[str]) -> str:
        uid = int(match.group(1))
        if uid == bot_id:
            return ""
        if uid not in names and guild is not None:
            member = guild.get_member(uid)
            if member is not None:
                names[uid] = member.display_name
        return "@" + names.get(uid, "someone")

    def role(match: re.Match[str]) -> str:
        found = guild.get_role(int(match.group(1))) if guild is not None else None
        return "@" + (found.name if found is not None else "role")

    def channel(match: re.Match[str]) -> str:
        found = guild.get_channel_or_thread(int(match.group(1))) if guild is not None else None
        return "#" + (found.name if found is not None else "channel")

    text = _USER_MENTION.sub(user, content)
    text = _ROLE_MENTION.sub(role, text)
    text = _CHANNEL_MENTION.sub(channel, text)
    text = _CUSTOM_EMOJI.sub(r":\1:", text)
    # Removing "<@bot> " from "hey <@bot> look" leaves two spaces; collapse runs of spaces, keep newlines.
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def to_incoming(message: discord.Message, bot_id: int | None, images: Sequence[CheckedImage] = (), *,
                channel_key_override: str | None = None, platform_id: str | None = None) -> IncomingMessage:
    reference = None if is_forward(message) else message.reference  # a forward points at its original
    return IncomingMessage(
        platform_id=platform_id or str(message.id),
        channel_key=channel_key_override or channel_key(message.channel),
        author_id=str(message.author.id),
        author_name=message.author.display_name,
        text=clean_text(message, bot_id),
        images=tuple(images),
        reply_to=str(reference.message_id) if reference is not None and reference.message_id else None,
        created_at=message.created_at,
    )

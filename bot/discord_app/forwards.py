"""Forwarded messages: what they carry, and the mark that tells the model a message was forwarded.

A forward (Discord's message reference of type FORWARD, flag HAS_SNAPSHOT) has no content of its own: the text,
attachments and embeds of the forwarded message come in `message_snapshots`, a copy taken when it was forwarded
(without its author). The bot reads a forward as its forwarder's message whose text is the forwarded one behind
`FORWARDED_MARK`, with the forwarded images. A forward is never a reply (its reference points at the original,
which may be the bot's own answer), and it cannot mention the bot in its own words: it is answered only in a DM
(`bot.discord_app.triggers`).

The mark must mean what it says: a person who types `[forwarded]` (in any case, with control characters inside
that the prompt's neutralisation would later remove) gets it broken by a zero-width space after its `[`, so only
the bot ever writes the mark.
"""

from __future__ import annotations

import re

import discord

FORWARDED_MARK = "[forwarded]"
"""Starts the text of a forwarded message as the model reads it."""

_ZERO_WIDTH_SPACE = "\u200b"
_CONTROL = "[\x00-\x08\x0b-\x1f]*"
"""The control characters `model_server.neutralize` removes: ignored between the mark's letters here, so their
removal cannot join a broken-up mark."""
_MARK_TYPED = re.compile(
    re.escape(FORWARDED_MARK[0]) + "(?=" + _CONTROL + _CONTROL.join(re.escape(c) for c in FORWARDED_MARK[1:]) + ")",
    re.IGNORECASE)


def is_forward(message: discord.Message) -> bool:
    reference = message.reference
    return reference is not None and reference.type is discord.MessageReferenceType.forward


def snapshots(message: discord.Message) -> list[discord.MessageSnapshot]:
    """The forwarded message's copies (Discord sends one at most today); none for other messages."""
    return list(message.message_snapshots) if is_forward(message) else []


def attachments_of(message: discord.Message) -> list[discord.Attachment]:
    """The message's attachments, then those of the message it forwards."""
    return [*message.attachments, *(a for s in snapshots(message) for a in s.attachments)]


def embeds_of(message: discord.Message) -> list[discord.Embed]:
    return [*message.embeds, *(e for s in snapshots(message) for e in s.embeds)]


def contents_of(message: discord.Message) -> list[str]:
    """The message's own text, then the text of the message it forwards (empty ones left out)."""
    return [text for text in (message.content, *(s.content for s in snapshots(message))) if text]


def defuse_mark(text: str) -> str:
    """`text` with every typed `FORWARDED_MARK` broken, so that the mark in a prompt is always the bot's."""
    return _MARK_TYPED.sub(FORWARDED_MARK[0] + _ZERO_WIDTH_SPACE, text)


def forwarded_text(text: str) -> str:
    """The text of a forwarded message (already defused) as the model reads it."""
    return f"{FORWARDED_MARK} {text}".rstrip()

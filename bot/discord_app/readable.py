"""What of a message the model can read, and what its author is told about the rest.

The model reads text and images. A message with neither (a sticker, a voice message, a poll, a file of another
kind, a bare mention) is never sent to it as an empty turn: addressed to the bot, it gets a short reply saying
what the bot can read; elsewhere it is left alone. Attached files that could not be used are named in the reply
that answers the message, so nothing is dropped without a word.
"""

from __future__ import annotations

from collections.abc import Sequence

import discord

from bot.errors import UnreadableFile

CAN_READ = "I can read text and images"


def unreadable_note(files: Sequence[UnreadableFile]) -> str:
    """One line naming the files left out ("" for none), shown above the answer."""
    if not files:
        return ""
    names = ", ".join(f"`{f.filename}`" for f in files)
    verb = "is not an image" if len(files) == 1 else "are not images"
    return f"(left out: {names} {verb} I can read)"


def nothing_to_read(message: discord.Message, files: Sequence[UnreadableFile]) -> str:
    """The reply to an addressed message with no text and no usable image."""
    if message.flags.voice:
        seen = "I cannot listen to voice messages"
    elif message.stickers:
        seen = "I cannot see stickers"
    elif message.poll is not None:
        seen = "I cannot read polls"
    elif files:
        names = ", ".join(f"`{f.filename}`" for f in files)
        seen = f"I cannot read {names}"
    else:
        return f"Ask me something: {CAN_READ}."
    return f"{seen}; {CAN_READ}."

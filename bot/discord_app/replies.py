"""Delivering answers to Discord: split at 2000 characters, streamed by edits, never pinging anyone.

Two sinks implement the pipeline's `ReplySink`: `MessageReplySink` answers a message (a reply to it, with
a typing indicator while waiting) and `InteractionReplySink` answers a deferred slash command (edits the
original response, followups past 2000 characters). Both show the queue position, stream the answer into
one message by edits at most once per `edit_interval_s`, and always deliver the final text, even when a
streaming edit failed.

Spoilers: a sink made with `spoiler=True` (the question's image was sent as a spoiler) puts every part it shows
behind `||` tags, each streamed edit and each part of a split answer alike (`spoiler_parts`), so no part of the
answer ever shows unhidden; the stored answer is the plain text.

Rate limits: discord.py waits out an HTTP 429 (its retry-after) and sends the edit again, so a held-back edit
still lands; the sink then spaces its next edits further apart (`SLOW_EDIT_S`), so an answer that meets a
limit shows fewer edits instead of a pile of them waiting on the same bucket.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import re
import time
from typing import Any

import discord

from bot.pipeline.conversation import Reply
from model_server.types import GenerationResult

log = logging.getLogger(__name__)

NO_MENTIONS = discord.AllowedMentions.none()
"""Every message and edit of the bot carries this: model output must never ping @everyone, roles or users."""

MESSAGE_LIMIT = 2000
"""Discord's limit on a message's content, in characters."""

FENCE = "```"
_FENCE_ROOM = 40
"""Room kept free in every chunk for a closing fence and a reopened one (``` plus a language name)."""

SLOW_EDIT_S = 0.25
"""A streaming edit that took longer than this was held back by Discord (a 429's retry-after, or discord.py
waiting for an exhausted bucket): the interval between edits doubles, at least to the time it took."""
MAX_EDIT_INTERVAL_S = 3.0
"""The most the interval grows to; the final answer waits at most this long after the last edit."""


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Split `text` into chunks of at most `limit` characters, at line boundaries.

    A code block cut by a split is closed at the end of one chunk and reopened (same language) at the start
    of the next, so each message renders on its own. A single line longer than a chunk is cut at its last
    space, or hard when it has none. Chunks holding only whitespace are dropped (Discord refuses them).
    """
    if limit <= _FENCE_ROOM * 2:
        raise ValueError(f"limit must be more than {_FENCE_ROOM * 2}")
    if len(text) <= limit:
        return [text] if text.strip() else []
    chunks: list[str] = []
    current: list[str] = []
    size = 0  # len("\n".join(current))
    fence: str | None = None  # opening line of the code block open at the end of `current`

    def flush() -> None:
        body = "\n".join([*current, FENCE] if fence else current)
        if body.strip():
            chunks.append(body)

    for line in text.split("\n"):
        for piece in _cut_line(line, limit - _FENCE_ROOM):
            after = fence
            if len(piece) == len(line) and piece.lstrip().startswith(FENCE):
                opener = piece.strip()
                after = None if fence else (opener if len(opener) < _FENCE_ROOM - 5 else FENCE)
            needed = size + (1 if current else 0) + len(piece) + (len(FENCE) + 1 if after else 0)
            if current and needed > limit:
                flush()
                current = [fence] if fence else []
                size = len(fence) if fence else 0
            size += (1 if current else 0) + len(piece)
            current.append(piece)
            fence = after
    if current:
        fence = None  # the text's own (possibly unclosed) block ends as the author wrote it
        flush()
    return chunks


SPOILER = "||"
_ZERO_WIDTH_SPACE = "\u200b"


def spoiler_parts(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """`split_message`, each part hidden behind `||` tags and still within `limit` characters.

    A `||` inside the text would close the spoiler early and show the rest: every `|` followed by another gets a
    zero-width space after it (it reads the same), and so does a part's last `|`.
    """
    defused = re.sub(r"\|(?=\|)", "|" + _ZERO_WIDTH_SPACE, text)
    parts = split_message(defused, limit - 2 * len(SPOILER) - 1)
    return [SPOILER + (part + _ZERO_WIDTH_SPACE if part.endswith("|") else part) + SPOILER for part in parts]


def _cut_line(line: str, width: int) -> list[str]:
    pieces: list[str] = []
    while len(line) > width:
        cut = line.rfind(" ", width // 2, width)
        cut = cut if cut > 0 else width
        pieces.append(line[:cut])
        line = line[cut:].lstrip(" ") if cut < width else line[cut:]
    pieces.append(line)
    return pieces


def queued_text(ahead: int) -> str:
    return "⏳ queued, next in line" if ahead <= 0 else f"⏳ queued, {ahead} ahead"


class _StreamedReply(abc.ABC):
    """The common part of both sinks: one or more messages that show the answer as it grows."""

    def __init__(self, *, edit_interval_s: float = 1.0, spoiler: bool = False) -> None:
        self.edit_interval_s = edit_interval_s
        self.spoiler = spoiler
        """Every part shown behind `||` tags."""
        self._messages: list[Any] = []  # discord.Message / InteractionMessage / WebhookMessage, in order
        self._shown: list[str] = []  # what each of `_messages` shows now
        self._text = ""
        self._has_text = False  # False while the first message shows the queue position
        self._last_edit = -float("inf")
        self._streaming = True  # off after a failed streaming edit: only the final delivery is tried

    # -- what each platform does ---------------------------------------------------------------------
    @abc.abstractmethod
    async def _send_first(self, content: str) -> Any: ...

    @abc.abstractmethod
    async def _send_next(self, content: str) -> Any: ...

    async def _edit(self, index: int, content: str) -> None:
        await self._messages[index].edit(content=content, allowed_mentions=NO_MENTIONS)
        self._shown[index] = content

    async def _stop_waiting(self) -> None:  # noqa: B027 (optional hook: only messages show typing)
        """The answer starts showing (or ended): stop any waiting indicator."""

    # -- ReplySink -----------------------------------------------------------------------------------
    async def queued(self, ahead: int) -> None:
        if self._has_text:
            return
        content = queued_text(ahead)
        try:
            if not self._messages:
                await self._append(await self._send_first(content), content)
            else:
                await self._edit(0, content)
            self._last_edit = time.monotonic()
        except discord.HTTPException as exc:
            log.warning("queue position not shown: HTTP %s (code %s)", exc.status, exc.code)

    async def delta(self, text: str) -> None:
        self._text += text
        if not self._streaming or not self._text.strip():
            return
        if time.monotonic() - self._last_edit < self.edit_interval_s:
            return
        started = time.monotonic()
        try:
            await self._show(self._text, final=False)
        except discord.HTTPException as exc:
            # Streaming is a nicety: stop it, and let `finish` deliver the whole answer.
            self._streaming = False
            log.warning("streaming edit failed, final answer will still be sent: HTTP %s (code %s)",
                        exc.status, exc.code)
            return
        took = time.monotonic() - started
        if took > max(SLOW_EDIT_S, self.edit_interval_s):
            self._slow_down(took)

    def _slow_down(self, took: float) -> None:
        """Discord held an edit back: count the interval from when it landed, and lengthen it."""
        previous = self.edit_interval_s
        self.edit_interval_s = min(MAX_EDIT_INTERVAL_S, max(2 * previous, took))
        self._last_edit = time.monotonic()
        log.info("streaming edit took %.2f s (rate limited): edit interval %.2f -> %.2f s", took, previous,
                 self.edit_interval_s)

    async def finish(self, text: str, result: GenerationResult | None = None) -> Reply | None:
        # Streaming edits are spaced by `edit_interval_s`; the final one keeps the pace too.
        wait = self._last_edit + self.edit_interval_s - time.monotonic()
        if self._messages and wait > 0:
            await asyncio.sleep(wait)
        await self._show(text, final=True)
        await self._stop_waiting()
        if not self._messages:
            return None
        return Reply(platform_id=str(self._messages[0].id), text=text)

    async def failed(self, user_message: str) -> None:
        await self._stop_waiting()
        try:
            if self._messages:
                await self._edit(0, user_message)
                for index in range(1, len(self._messages)):
                    await self._delete(index)
            else:
                await self._append(await self._send_first(user_message), user_message)
        except discord.HTTPException as exc:
            log.warning("error message not delivered: HTTP %s (code %s)", exc.status, exc.code)

    # -- helpers -------------------------------------------------------------------------------------
    async def _append(self, message: Any, content: str) -> None:
        self._messages.append(message)
        self._shown.append(content)

    async def _delete(self, index: int) -> None:
        with contextlib.suppress(discord.HTTPException):
            await self._messages[index].delete()

    async def _show(self, text: str, *, final: bool) -> None:
        chunks = (spoiler_parts(text) if self.spoiler else split_message(text)) or ["…"]
        if not self._has_text:
            self._has_text = True
            await self._stop_waiting()
        self._last_edit = time.monotonic()
        if not final:
            for index, chunk in enumerate(chunks):
                if index < len(self._messages):
                    if self._shown[index] != chunk:
                        await self._edit(index, chunk)
                else:
                    await self._append(await self._send_next_or_first(chunk), chunk)
            return
        await self._deliver(chunks)

    async def _deliver(self, chunks: list[str]) -> None:
        """The final answer: edit what exists, send the rest; a message that cannot be edited is replaced."""
        delivered: list[Any] = []
        shown: list[str] = []
        stale: list[Any] = list(self._messages[len(chunks):])
        for index, chunk in enumerate(chunks):
            message = self._messages[index] if index < len(self._messages) else None
            if message is not None:
                try:
                    if self._shown[index] != chunk:
                        await message.edit(content=chunk, allowed_mentions=NO_MENTIONS)
                    delivered.append(message)
                    shown.append(chunk)
                    continue
                except discord.HTTPException as exc:
                    log.warning("final edit failed, sending the part anew: HTTP %s (code %s)",
                                exc.status, exc.code)
                    stale.append(message)
            sender = self._send_first if not delivered else self._send_next
            delivered.append(await sender(chunk))
            shown.append(chunk)
        # Messages that show a stale part (or a queue position) would confuse: remove them, best effort.
        for message in stale:
            with contextlib.suppress(discord.HTTPException):
                await message.delete()
        self._messages, self._shown = delivered, shown

    async def _send_next_or_first(self, content: str) -> Any:
        return await (self._send_next(content) if self._messages else self._send_first(content))


class MessageReplySink(_StreamedReply):
    """Answers a message in its channel: replies to it (never pinging), typing while waiting.

    Use as `async with MessageReplySink(channel, reference) as sink:` so the typing indicator stops.
    """

    def __init__(self, channel: discord.abc.Messageable, reference: discord.MessageReference | None, *,
                 edit_interval_s: float = 1.0, spoiler: bool = False) -> None:
        super().__init__(edit_interval_s=edit_interval_s, spoiler=spoiler)
        self.channel = channel
        self.reference = reference
        self._typing: asyncio.Task[None] | None = None
        self._typing_stop = asyncio.Event()

    @classmethod
    def for_message(cls, message: discord.Message, *, edit_interval_s: float = 1.0,
                    spoiler: bool = False) -> MessageReplySink:
        return cls(message.channel, message.to_reference(fail_if_not_exists=False),
                   edit_interval_s=edit_interval_s, spoiler=spoiler)

    async def __aenter__(self) -> MessageReplySink:
        self._typing = asyncio.create_task(self._keep_typing(), name="typing-indicator")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop_waiting()

    async def _keep_typing(self) -> None:
        try:
            async with self.channel.typing():
                await self._typing_stop.wait()
        except discord.HTTPException as exc:
            log.debug("typing indicator failed: HTTP %s", exc.status)

    async def _stop_waiting(self) -> None:
        self._typing_stop.set()
        task, self._typing = self._typing, None
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 5)

    async def _send_first(self, content: str) -> discord.Message:
        return await self.channel.send(content, reference=self.reference, allowed_mentions=NO_MENTIONS)  # type: ignore[arg-type]

    async def _send_next(self, content: str) -> discord.Message:
        return await self.channel.send(content, allowed_mentions=NO_MENTIONS)


class InteractionReplySink(_StreamedReply):
    """Answers a deferred interaction: the original response shows the answer, followups carry the rest."""

    def __init__(self, interaction: discord.Interaction, *, edit_interval_s: float = 1.0,
                 ephemeral: bool = False, spoiler: bool = False) -> None:
        super().__init__(edit_interval_s=edit_interval_s, spoiler=spoiler)
        self.interaction = interaction
        self.ephemeral = ephemeral

    async def _send_first(self, content: str) -> discord.InteractionMessage:
        return await self.interaction.edit_original_response(content=content, allowed_mentions=NO_MENTIONS)

    async def _send_next(self, content: str) -> discord.WebhookMessage:
        return await self.interaction.followup.send(content, allowed_mentions=NO_MENTIONS, wait=True,
                                                    ephemeral=self.ephemeral)


async def send_notice(message: discord.Message, text: str) -> discord.Message | None:
    """A short reply to `message` (a refusal, an image error); failures are logged, never raised."""
    try:
        return await message.channel.send(text, reference=message.to_reference(fail_if_not_exists=False),
                                          allowed_mentions=NO_MENTIONS)
    except discord.HTTPException as exc:
        log.warning("notice to message %s not delivered: HTTP %s (code %s)", message.id, exc.status, exc.code)
        return None

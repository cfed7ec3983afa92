"""The frame every application command runs in: defer, reply through a sink, one short message per failure.

Every command defers first (Discord's 3-second limit) and answers every failure with one short message; the
detail goes to the log, never a traceback to the user.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import discord
from discord.ext import commands

from bot.discord_app.protocol import CommandHost
from bot.discord_app.replies import NO_MENTIONS, InteractionReplySink, split_message, spoiler_parts
from bot.errors import UserInputError, user_message
from bot.pipeline.conversation import EMPTY_ANSWER, ReplySink
from model_server.errors import Busy, ModelServerError
from model_server.prompt import PromptError
from storage import StorageError

log = logging.getLogger(__name__)

BUSY_MESSAGE = "the model is busy, try again in a minute"
"""A full queue, as a command's answer says it: without the queue's length, which `Busy.user_message` gives."""


def shown_message(exc: BaseException) -> str:
    """`bot.errors.user_message`, but for a full queue the commands' own shorter line."""
    return BUSY_MESSAGE if isinstance(exc, Busy) else user_message(exc)


def context_of(interaction: discord.Interaction) -> str:
    """Ids that locate one interaction in the log (never option text)."""
    return f"interaction={interaction.id} channel={interaction.channel_id} user={interaction.user.id}"


def has_spoiler_image(interaction: discord.Interaction) -> bool:
    """Whether an attachment option of the command was sent as a spoiler: then the answer is hidden too."""
    return any(isinstance(value, discord.Attachment) and value.is_spoiler() for _, value in interaction.namespace)


def host_of(bot: commands.Bot) -> CommandHost:
    """`bot` as the cogs use it; an extension's `setup` receives it typed as a plain `commands.Bot`."""
    if not isinstance(bot, CommandHost):
        raise TypeError(f"{type(bot).__name__} lacks what the commands need (services, limiter)")
    return bot


class CommandCog(commands.Cog):
    """A cog whose commands run in the shared frame; it holds the host and its services."""

    def __init__(self, host: CommandHost) -> None:
        self.host = host
        self.services = host.services

    async def run_command(self, interaction: discord.Interaction, command: str,
                          work: Callable[[InteractionReplySink], Awaitable[None]], *, ephemeral: bool = False) -> None:
        """Defer, run `work` with a sink for this interaction, and turn every failure into one message."""
        started = time.monotonic()
        await interaction.response.defer(thinking=True, ephemeral=ephemeral)
        sink = InteractionReplySink(interaction, ephemeral=ephemeral,
                                    edit_interval_s=self.services.settings.stream_edit_interval_s,
                                    spoiler=has_spoiler_image(interaction))
        try:
            await work(sink)
        except (UserInputError, PromptError, ModelServerError, StorageError) as exc:
            # `detail` (user errors, storage) and PromptError texts hold ids and sizes, never the user's text.
            log.info("/%s not answered: %s %s: %s", command, context_of(interaction), type(exc).__name__,
                     getattr(exc, "detail", "") or exc)
            await self._fail(sink, shown_message(exc))
        except Exception as exc:
            log.exception("/%s failed: %s", command, context_of(interaction))
            await self._fail(sink, shown_message(exc))
        else:
            log.info("/%s answered: %s %.2fs", command, context_of(interaction), time.monotonic() - started)

    async def _fail(self, sink: ReplySink, message: str) -> None:
        try:
            await sink.failed(message)
        except discord.HTTPException as exc:
            # The interaction token may have expired (15 minutes); nothing more can reach the user.
            log.warning("could not deliver an error message: HTTP %s", exc.status)

    async def send_text(self, interaction: discord.Interaction, text: str, *, ephemeral: bool = False) -> None:
        """A finished, non-streamed answer: the deferred original, then followups past 2000 characters."""
        parts = (spoiler_parts(text) if has_spoiler_image(interaction) else split_message(text)) or [EMPTY_ANSWER]
        await interaction.edit_original_response(content=parts[0], allowed_mentions=NO_MENTIONS)
        for part in parts[1:]:
            await interaction.followup.send(part, allowed_mentions=NO_MENTIONS, ephemeral=ephemeral)

"""The command tree's last word: every interaction that fails outside a command's own frame gets one short answer.

The commands answer their own failures (`bot.discord_app.cogs.frame`). What fails before a command runs does not
reach them: an option value outside the command's choices, an attachment option missing from the interaction's
`resolved` data, a check, a command Discord knows but this process does not. discord.py hands those to
`CommandTree.on_error`, whose default logs a traceback and leaves the interaction unanswered ("the application
did not respond"). `IdeficsCommandTree.on_error` answers the user in one short, private message and logs one
line (ids and the error's type, never option values).

An attachment option whose id `resolved` lacks would reach a command as a bare `discord.Object` (discord.py does
not refuse it): `IdeficsCommandTree.interaction_check` refuses such an interaction before any command runs.
"""

from __future__ import annotations

import logging
from typing import Any

import discord
from discord import app_commands

from bot.errors import user_message

log = logging.getLogger(__name__)

BAD_OPTION = "one of the options has a value I cannot use; pick from the offered values and try again"
NOT_ALLOWED = "you cannot use this command here"
OUT_OF_DATE = "this command has changed; try again in a minute"


_SUBCOMMAND_TYPES = (1, 2)  # SUB_COMMAND, SUB_COMMAND_GROUP: their options hold the real ones
_ATTACHMENT_TYPE = 11
_MESSAGE_COMMAND = 3


class UnresolvedOption(app_commands.AppCommandError):
    """An option refers to an object (an attachment, a message) the interaction's `resolved` data lacks."""


def unresolved_options(data: Any) -> list[str]:
    """Names of the options of an application command's `data` whose objects `data.resolved` does not hold."""
    if not isinstance(data, dict):
        return []
    resolved = data.get("resolved") or {}
    attachments = resolved.get("attachments") or {}
    missing: list[str] = []

    def walk(options: Any) -> None:
        for option in options if isinstance(options, list) else []:
            if not isinstance(option, dict):
                continue
            if option.get("type") in _SUBCOMMAND_TYPES:
                walk(option.get("options"))
            elif option.get("type") == _ATTACHMENT_TYPE and str(option.get("value")) not in attachments:
                missing.append(str(option.get("name")))

    walk(data.get("options"))
    if data.get("type") == _MESSAGE_COMMAND and str(data.get("target_id")) not in (resolved.get("messages") or {}):
        missing.append("message")
    return missing


def message_for(error: app_commands.AppCommandError) -> str:
    """The user's line for a failed interaction: short, no internal detail."""
    if isinstance(error, app_commands.TransformerError | UnresolvedOption):
        return BAD_OPTION
    if isinstance(error, app_commands.CommandOnCooldown):
        return f"slow down: try again in {error.retry_after:.0f} s"
    if isinstance(error, app_commands.CheckFailure):
        return NOT_ALLOWED
    if isinstance(error, app_commands.CommandNotFound | app_commands.CommandSignatureMismatch):
        return OUT_OF_DATE
    if isinstance(error, app_commands.CommandInvokeError):
        return user_message(error.original)
    return user_message(error)


class IdeficsCommandTree(app_commands.CommandTree[Any]):
    async def interaction_check(self, interaction: discord.Interaction[Any], /) -> bool:
        if interaction.type is discord.InteractionType.application_command:
            missing = unresolved_options(interaction.data)
            if missing:
                raise UnresolvedOption(f"options without resolved data: {', '.join(missing)}")
        return True

    async def on_error(self, interaction: discord.Interaction[Any], error: app_commands.AppCommandError) -> None:
        command = interaction.command.qualified_name if interaction.command is not None else "?"
        cause = error.original if isinstance(error, app_commands.CommandInvokeError) else error
        log.warning("/%s failed: interaction=%s channel=%s user=%s %s", command, interaction.id,
                    interaction.channel_id, interaction.user.id, type(cause).__name__)
        text = message_for(error)
        try:
            if not interaction.response.is_done():
                await interaction.response.send_message(text, ephemeral=True,
                                                         allowed_mentions=discord.AllowedMentions.none())
            else:  # deferred ("thinking..."): the deferred response shows the message
                await interaction.edit_original_response(content=text,
                                                         allowed_mentions=discord.AllowedMentions.none())
        except discord.HTTPException as exc:
            log.warning("/%s: error message not delivered: HTTP %s", command, exc.status)

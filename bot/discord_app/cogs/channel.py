"""Channel admin and the bot itself, as application commands.

    /reset                                               clear this channel's history (Manage Channels)
    /settings [answer_mode] [record_mode] [system_prompt] [max_new_tokens] [temperature] [decoding] [clear]
                                                         no option: show; options: set, then show
                                                         (Manage Channels)
    /status                                              model, backend, queue, latency, errors, fault
    /forget-me                                           delete what the bot stored about the caller

Only /reset and /forget-me touch the conversation history; /settings reads and writes the channel's settings
through `storage`, which checks every value before anything is written.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_app.cogs.frame import CommandCog, host_of
from bot.discord_app.replies import InteractionReplySink
from bot.discord_app.triggers import DEFAULT_ANSWER_MODE, DEFAULT_RECORD_MODE
from bot.errors import UserInputError
from bot.pipeline.budget import answer_room
from storage import ChannelSettings

NEEDS_MANAGE_CHANNELS = "you need the Manage Channels permission to do that here"
SHOWN_SYSTEM_PROMPT_CHARS = 300
"""/settings shows at most this much of a system prompt: enough to recognise it, short enough to read."""
CLEAR_WORDS = frozenset({"none", "default", "clear", ""})
"""A `system_prompt` option equal to one of these (any case) removes the channel's own system prompt."""

_SETTING_NAMES = ("answer_mode", "record_mode", "system_prompt", "max_new_tokens", "temperature", "decoding")


class _NotAllowed(UserInputError):
    default_user_message = NEEDS_MANAGE_CHANNELS


class _DoesNotFit(UserInputError):
    default_user_message = "that answer length does not fit the model's context"


def _choices(*values: str) -> list[app_commands.Choice[str]]:
    return [app_commands.Choice(name=v, value=v) for v in values]


def _shown_model_name(name: str) -> str:
    # A local checkpoint folder would show the server's file layout; its last part names the model as well.
    path = PurePath(name)
    if path.is_absolute() or name.startswith("."):
        return path.name or name
    return name


class ChannelCommands(CommandCog):
    """/reset, /settings, /status and /forget-me."""

    @staticmethod
    def _may_manage(interaction: discord.Interaction) -> bool:
        # `default_permissions` is only a default that server admins can change, so it is checked again.
        # Outside a server (a DM) the channel is the user's own.
        return interaction.guild_id is None or interaction.permissions.manage_channels

    @app_commands.command(name="reset", description="Clear this channel's conversation history")
    @app_commands.default_permissions(manage_channels=True)
    async def reset(self, interaction: discord.Interaction) -> None:
        async def work(sink: InteractionReplySink) -> None:
            if not self._may_manage(interaction):
                raise _NotAllowed()
            removed = await self.services.database.store.clear_channel(str(interaction.channel_id))
            noun = "message" if removed == 1 else "messages"
            await self.send_text(interaction, f"History cleared: {removed} {noun} removed.")

        await self.run_command(interaction, "reset", work)

    @app_commands.command(name="settings",
                          description="Show this channel's settings; give options to change them")
    @app_commands.default_permissions(manage_channels=True)
    @app_commands.describe(
        answer_mode="mention: answer when mentioned or replied to; always: answer every message",
        record_mode="all: remember every message as context; addressed: only messages to and from the bot",
        system_prompt="Text given to the model before the conversation (\"none\" removes it)",
        max_new_tokens="Longest answer, in tokens (1 to 1024)",
        temperature="Randomness when decoding is sample (0.01 to 2)",
        decoding="greedy: most likely words; sample: varied; beam: careful, slower",
        clear="Put one setting (or all) back to the bot's default",
    )
    @app_commands.choices(
        answer_mode=_choices("mention", "always"),
        record_mode=_choices("all", "addressed"),
        decoding=_choices("greedy", "sample", "beam"),
        clear=_choices(*_SETTING_NAMES, "all"),
    )
    async def settings(self, interaction: discord.Interaction,
                       answer_mode: app_commands.Choice[str] | None = None,
                       record_mode: app_commands.Choice[str] | None = None,
                       system_prompt: str | None = None,
                       max_new_tokens: app_commands.Range[int, 1, 1024] | None = None,
                       temperature: app_commands.Range[float, 0.01, 2.0] | None = None,
                       decoding: app_commands.Choice[str] | None = None,
                       clear: app_commands.Choice[str] | None = None) -> None:
        async def work(sink: InteractionReplySink) -> None:
            if not self._may_manage(interaction):
                raise _NotAllowed()
            changes: dict[str, Any] = {}
            if clear is not None:
                for name in _SETTING_NAMES if clear.value == "all" else (clear.value,):
                    changes[name] = None
            for name, choice in (("answer_mode", answer_mode), ("record_mode", record_mode),
                                 ("decoding", decoding)):
                if choice is not None:
                    changes[name] = choice.value
            if system_prompt is not None:
                changes["system_prompt"] = None if system_prompt.strip().lower() in CLEAR_WORDS else system_prompt
            if max_new_tokens is not None:
                changes["max_new_tokens"] = max_new_tokens
            if temperature is not None:
                changes["temperature"] = temperature
            store = self.services.database.store
            key = str(interaction.channel_id)
            if {"max_new_tokens", "system_prompt"} & changes.keys():
                self._check_answer_room(await store.channel_settings(key), changes)
            if changes:
                # Checked by storage (`validate_setting`) before anything is written: Discord's own range
                # checks are client-side only.
                current = await store.update_channel_settings(key, **changes)
                head = f"Changed: {', '.join(sorted(changes))}."
            else:
                current = await store.channel_settings(key)
                head = "Settings of this channel:"
            await self.send_text(interaction, f"{head}\n{self.describe_settings(current)}", ephemeral=True)

        await self.run_command(interaction, "settings", work, ephemeral=True)

    def _check_answer_room(self, current: ChannelSettings, changes: dict[str, Any]) -> None:
        """Refuse settings under which no answer of `max_new_tokens` fits the model's context with the prompt."""
        defaults = self.services.settings.chat_defaults()
        system_prompt = changes["system_prompt"] if "system_prompt" in changes else current.system_prompt
        wanted = changes["max_new_tokens"] if "max_new_tokens" in changes else current.max_new_tokens
        wanted = wanted or defaults.max_new_tokens
        room = answer_room(self.services.model, defaults, system_prompt)
        if wanted > room.max_new_tokens:
            raise _DoesNotFit(
                f"max_new_tokens {wanted} does not fit: the model reads {room.max_positions} tokens in all and "
                f"this channel's prompt needs at least {room.prompt_needs}, so at most "
                f"{max(room.max_new_tokens, 0)} here",
                detail=f"max_new_tokens={wanted} room={room.max_new_tokens}")

    def describe_settings(self, current: ChannelSettings) -> str:
        """One line per setting: the channel's value, or the default it falls back to."""
        defaults = self.services.settings.chat_defaults()
        fallback: dict[str, Any] = {
            "answer_mode": DEFAULT_ANSWER_MODE, "record_mode": DEFAULT_RECORD_MODE,
            "system_prompt": defaults.system_prompt, "max_new_tokens": defaults.max_new_tokens,
            "temperature": defaults.temperature, "decoding": defaults.decoding,
        }
        lines = []
        for name in _SETTING_NAMES:
            value = getattr(current, name)
            shown_default = _show_value(fallback[name])
            if value is None:
                lines.append(f"- {name}: {shown_default} (default)")
            else:
                lines.append(f"- {name}: {_show_value(value)} (default: {shown_default})")
        return "\n".join(lines)

    # -- the bot and the user ------------------------------------------------------------------------
    @app_commands.command(name="status", description="The model, its backend, queue and latency")
    async def status(self, interaction: discord.Interaction) -> None:
        async def work(sink: InteractionReplySink) -> None:
            await self.send_text(interaction, self.describe_status())

        await self.run_command(interaction, "status", work)

    def describe_status(self) -> str:
        model = self.services.model
        lines = [
            f"model: {_shown_model_name(model.name)}",
            f"backend: {self.services.settings.generation_backend}",
            f"type: {'instruct' if model.instruct else 'base'}",
        ]
        executor = self.services.executor
        if executor is None:
            lines.append("generation: off (no model loaded)")
        else:
            stats = executor.stats()
            latency = "n/a" if stats.median_latency_s is None else f"{stats.median_latency_s:.2f} s"
            lines += [
                f"queue: {stats.queue_length} waiting, {stats.running} running",
                f"median latency: {latency}",
                f"batches run: {stats.batches}",
                f"requests: {stats.completed} done, {stats.failed} failed",
            ]
            cache = stats.vision_cache
            if cache is not None:
                looked_up = cache.hits + cache.misses
                rate = f", {100 * cache.hits / looked_up:.0f}% hits" if looked_up else ""
                lines.append(f"image cache: {cache.entries} images, {cache.bytes / 2**20:.1f} of "
                             f"{cache.capacity_bytes / 2**20:.0f} MiB{rate}")
            seen = [f"{kind} {count}" for kind, count in stats.errors.items() if count]
            if seen:
                lines.append(f"errors: {', '.join(seen)}")
            if stats.fault is not None:
                lines.append(f"fault: {stats.fault}")
        return "```\n" + "\n".join(lines) + "\n```"

    @app_commands.command(name="forget-me", description="Delete everything this bot stored about you, everywhere")
    async def forget_me(self, interaction: discord.Interaction) -> None:
        async def work(sink: InteractionReplySink) -> None:
            removed = await self.services.database.store.forget_user(str(interaction.user.id))
            noun = "message" if removed == 1 else "messages"
            await self.send_text(interaction, f"Done: {removed} {noun} of yours (and the answers to them) deleted.",
                                 ephemeral=True)

        await self.run_command(interaction, "forget-me", work, ephemeral=True)


def _show_value(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, str) and len(value) > SHOWN_SYSTEM_PROMPT_CHARS:
        return repr(value[:SHOWN_SYSTEM_PROMPT_CHARS] + "…")
    if isinstance(value, str) and " " in value:
        return repr(value)
    return str(value)


async def setup(bot: commands.Bot) -> None:
    """The extension's entry point (`load_extension("bot.discord_app.cogs.channel")`)."""
    await bot.add_cog(ChannelCommands(host_of(bot)))

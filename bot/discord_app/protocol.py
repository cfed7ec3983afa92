"""What the slash-command cogs and the restart recovery need from the Discord client, and nothing more.

They depend on these protocols rather than on `bot.discord_app.client`, so the client can import them (it
loads the cogs and runs the recovery) without an import circle. `IdeficsBot` satisfies both.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import discord
from discord import app_commands

from bot.pipeline.limits import UserLimiter
from bot.pipeline.services import Services
from storage import StoredMessage


@runtime_checkable
class CommandHost(Protocol):
    """The client as the cogs see it: the shared services, the per-user limiter, the command tree."""

    services: Services
    limiter: UserLimiter

    @property
    def tree(self) -> app_commands.CommandTree[Any]: ...


class RecoveryHost(Protocol):
    """The client as the restart recovery sees it: services, shards, channel look-ups, the answering path."""

    services: Services

    @property
    def draining(self) -> bool: ...

    @property
    def shard_scope(self) -> tuple[int, frozenset[int]] | None: ...

    def runs_shard_of(self, guild_id: int | None) -> bool: ...

    def answer_recovered(self, message: discord.Message, stored: StoredMessage) -> None: ...

    def get_channel(
        self, id: int, /
    ) -> discord.abc.GuildChannel | discord.Thread | discord.abc.PrivateChannel | None: ...

    async def fetch_channel(
        self, channel_id: int, /
    ) -> discord.abc.GuildChannel | discord.abc.PrivateChannel | discord.Thread: ...

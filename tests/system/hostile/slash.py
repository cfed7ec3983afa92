"""Running one interaction through the real bot and reading back what the user saw."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.bot.discord_app.conftest import RunningBot
from tests.fakes.discord_api import InteractionRecord


async def run_interaction(running: RunningBot, payload: dict[str, Any], wait_s: float = 30.0) -> InteractionRecord:
    """Dispatch an INTERACTION_CREATE and wait until the bot's handler finished: discord.py's completion
    event, or its error event (a handler that raised, or options it refused to convert)."""
    interaction_id = int(payload["id"])
    bot = running.bot
    done = asyncio.ensure_future(bot.wait_for(
        "app_command_completion", check=lambda interaction, _command: interaction.id == interaction_id))
    await asyncio.sleep(0)  # the waiter is registered before the event can arrive
    await running.fake.dispatch("INTERACTION_CREATE", payload)
    record = running.fake.interaction_responses(interaction_id)

    def answered() -> bool:
        # A command whose options discord.py refused never completes: then the final answer is what counts.
        original = record.original
        return done.done() or (original is not None and bool(original.edits) and not original.loading
                               and not original.content.startswith("⏳") and bot.tasks_running == 0)

    try:
        await running.fake.wait_for(answered, wait_s, f"interaction {interaction_id} answered")
    finally:
        done.cancel()
    return record

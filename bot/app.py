"""`idefics-bot run`: open the services, connect to Discord, serve until SIGTERM/SIGINT, close cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import discord

from bot.client import IdeficsBot
from bot.runtime import open_services
from bot.settings import Settings

log = logging.getLogger(__name__)

NO_TOKEN = (
    "DISCORD_TOKEN is not set: create an application at https://discord.com/developers/applications, "
    "then Bot → Reset Token, and put the token in DISCORD_TOKEN (environment or .env)"
)
BAD_TOKEN = (
    "Discord refused DISCORD_TOKEN: copy it again from the Developer Portal (your application → Bot → Reset Token)"
)
NO_INTENTS = (
    "Discord refused the privileged intents: in the Developer Portal (your application → Bot) enable "
    "Message Content Intent and Server Members Intent"
)


async def serve(settings: Settings) -> int:
    """Run the bot until it is stopped; the exit status (0, or 2 for a configuration problem)."""
    token = settings.discord_token.get_secret_value().strip() if settings.discord_token else ""
    if not token:
        print(NO_TOKEN, file=sys.stderr)
        return 2
    async with open_services(settings, progress=lambda line: log.info("%s", line)) as services:
        bot = IdeficsBot(services)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        handled: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows / not main thread
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
        runner = asyncio.create_task(bot.start(token), name="discord-client")
        stopper = asyncio.create_task(stop.wait(), name="wait-for-signal")
        try:
            await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
            stopper.cancel()
            log.info("shutting down")
            await bot.close()
            await asyncio.wait({runner}, timeout=10)
            if not runner.done():
                runner.cancel()
        if runner.done() and not runner.cancelled() and runner.exception() is not None:
            exc = runner.exception()
            if isinstance(exc, discord.LoginFailure):
                print(BAD_TOKEN, file=sys.stderr)
                return 2
            if isinstance(exc, discord.PrivilegedIntentsRequired):
                print(NO_INTENTS, file=sys.stderr)
                return 2
            raise exc  # type: ignore[misc]
    return 0

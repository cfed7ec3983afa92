"""`idefics-bot run`: open the services, connect to Discord, serve until SIGTERM/SIGINT, close cleanly.

Shutdown: the first SIGTERM/SIGINT stops new answers from starting (messages are still stored, "pending"),
gives running ones `SHUTDOWN_GRACE_S` to finish, cancels the rest with a short notice (their requests stay
"pending" for the next start), then closes the connection, the executor and the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator

import discord
import discord.gateway
import discord.http
import yarl

from bot.discord_app.client import create_bot
from bot.ops.logging_setup import install_log_redaction
from bot.ops.metrics import MetricsServerError, start_metrics_server
from bot.pipeline.services import Services, open_services
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


@contextlib.contextmanager
def discord_endpoints(settings: Settings) -> Iterator[None]:
    """Point discord.py at `DISCORD_API_BASE` / `DISCORD_GATEWAY_URL` when set (tests, self-hosted API proxies).

    discord.py reads both from class attributes; they are put back on exit.
    """
    old_base, old_gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    if settings.discord_api_base:
        discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
        log.info("Discord REST API at %s", discord.http.Route.BASE)
    if settings.discord_gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)
        log.info("Discord gateway at %s", settings.discord_gateway_url)
    try:
        yield
    finally:
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old_base, old_gateway


async def serve(settings: Settings) -> int:
    """Run the bot until it is stopped; the exit status.

    0: stopped by SIGTERM/SIGINT (running answers had `SHUTDOWN_GRACE_S` to finish); 1: the model failed beyond
    recovery (a supervisor should restart the process); 2: a configuration problem. A second signal during the
    grace period cancels the running answers at once.
    """
    token = settings.discord_token.get_secret_value().strip() if settings.discord_token else ""
    if not token:
        print(NO_TOKEN, file=sys.stderr)
        return 2
    # From here on no log record carries the token or, at DEBUG, the payloads discord.py logs.
    install_log_redaction([token])
    with discord_endpoints(settings):
        async with open_services(settings, progress=lambda line: log.info("%s", line)) as services:
            return await _serve(settings, services, token)


async def _serve(settings: Settings, services: Services, token: str) -> int:
    bot = create_bot(services)  # `ShardedIdeficsBot` with DISCORD_SHARDS
    try:
        metrics = await start_metrics_server(settings, services.executor, bot)  # None without METRICS_PORT
    except MetricsServerError as exc:
        print(exc, file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()  # shut down, giving running answers the grace period
    hurry = asyncio.Event()  # cancel running answers now (a second signal, or the model is gone)
    status = 0

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.info("%s again: cancelling running answers now", sig.name)
            hurry.set()
        else:
            log.info("%s received", sig.name)
        stop.set()

    def on_model_fault(reason: str) -> None:  # on the event loop
        nonlocal status
        log.error("the model failed beyond recovery (%s): exiting with status 1 for a restart", reason)
        status = 1
        hurry.set()
        stop.set()

    def report_model_fault(reason: str) -> None:  # on any thread (the executor's watchdog): hop onto the loop
        loop.call_soon_threadsafe(on_model_fault, reason)

    executor = services.executor
    if executor is not None:
        executor.on_fatal = report_model_fault
    handled: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows / not main thread
            loop.add_signal_handler(sig, on_signal, sig)
            handled.append(sig)
    runner = asyncio.create_task(bot.start(token), name="discord-client")
    stopper = asyncio.create_task(stop.wait(), name="wait-for-signal")
    try:
        await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set() and not runner.done():
            await bot.drain(settings.shutdown_grace_s, hurry=hurry)
    finally:
        stopper.cancel()
        log.info("shutting down")
        await bot.close()
        await asyncio.wait({runner}, timeout=10)
        if not runner.done():
            runner.cancel()
        for sig in handled:
            loop.remove_signal_handler(sig)
        if executor is not None:
            executor.on_fatal = None
        if metrics is not None:
            await metrics.stop()
    failure = runner.exception() if runner.done() and not runner.cancelled() else None
    if failure is not None:
        if isinstance(failure, discord.LoginFailure):
            print(BAD_TOKEN, file=sys.stderr)
            return 2
        if isinstance(failure, discord.PrivilegedIntentsRequired):
            print(NO_INTENTS, file=sys.stderr)
            return 2
        raise failure
    log.info("stopped (exit status %d)", status)
    return status

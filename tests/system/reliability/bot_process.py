"""`idefics-bot run` as a child process (the real console script) against the fake Discord of the test process.

The child reads only its environment: the fake's endpoints (`DISCORD_API_BASE`, `DISCORD_GATEWAY_URL`) and
token, the tiny model on the CPU and a temp SQLite file. Its log goes to a file the tests read (readiness,
recovery) and print when something times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.settings import Settings
from storage import StoredMessage, open_database
from tests.fakes.discord_api import FakeDiscord, MessageRecord

BOT_SCRIPT = Path(sys.executable).with_name("idefics-bot")
START_TIMEOUT_S = 120.0
"""Import torch and transformers, load the tiny model, log in: seconds, more on a busy machine."""


def bot_env(fake: FakeDiscord, model_path: Path, database_url: str, **overrides: Any) -> dict[str, str]:
    """The child's environment: ours without any of the bot's settings, then the test's."""
    names = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in names}
    env.update(
        DISCORD_TOKEN=fake.token,
        DISCORD_API_BASE=fake.api_base,
        DISCORD_GATEWAY_URL=fake.gateway_url,
        IDEFICS_MODEL=str(model_path),
        IDEFICS_DEVICE="cpu",
        DATABASE_URL=database_url,
        MAX_NEW_TOKENS="48",
        STREAM_EDIT_INTERVAL_S="0.05",
        BATCH_WINDOW_MS="5",
        LOG_LEVEL="INFO",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    env.update({k.upper(): str(v) for k, v in overrides.items()})
    return env


@dataclass
class BotProcess:
    proc: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_for_log(self, text: str, within: float = START_TIMEOUT_S, *, count: int = 1) -> None:
        """Until the child has logged `text` `count` times; fails early if it exits."""
        async with asyncio.timeout(within):
            while self.log().count(text) < count:
                if self.proc.returncode is not None:
                    raise AssertionError(f"bot exited ({self.proc.returncode}) before logging {text!r}:\n"
                                         f"{self.log()[-4000:]}")
                await asyncio.sleep(0.05)

    async def wait_ready(self) -> None:
        """Logged in, ready, and the start-up recovery of pending requests is over."""
        try:
            await self.wait_for_log("recovery done:")
        except TimeoutError:
            raise AssertionError(f"bot not ready:\n{self.log()[-4000:]}") from None

    async def stop(self, sig: signal.Signals = signal.SIGTERM, within: float = 30.0) -> int:
        """Send `sig` and return the exit status (fails if it takes longer than `within`)."""
        os.kill(self.pid, sig)
        return await self.wait_exit(within)

    async def wait_exit(self, within: float) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            raise AssertionError(f"bot did not exit within {within}s:\n{self.log()[-4000:]}") from None

    async def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        await self.proc.wait()


@contextlib.asynccontextmanager
async def bot_process(env: dict[str, str], workdir: Path, name: str) -> AsyncIterator[BotProcess]:
    """Start `idefics-bot run` in `workdir` (no `.env` there); killed on exit if still running."""
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(str(BOT_SCRIPT), "run", cwd=workdir, env=env,
                                                    stdin=asyncio.subprocess.DEVNULL, stdout=log_file,
                                                    stderr=asyncio.subprocess.STDOUT)
    running = BotProcess(proc, log_path)
    try:
        yield running
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def replies_to(fake: FakeDiscord, asked: MessageRecord) -> list[MessageRecord]:
    """The bot's messages (not deleted) that reply to `asked`."""
    return [m for m in fake.sent_messages() if is_reply_to(m, asked)]


def is_reply_to(message: MessageRecord, asked: MessageRecord) -> bool:
    return bool(message.message_reference) and int(message.message_reference["message_id"]) == asked.id


def final_answer(asked: MessageRecord) -> Callable[[MessageRecord], bool]:
    """Matches the bot's reply to `asked` once it shows text (not the queue position)."""
    return lambda m: is_reply_to(m, asked) and not m.content.startswith("⏳")


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'bot.sqlite3'}"


async def stored(database_url: str, platform_id: str) -> StoredMessage | None:
    async with open_database(database_url) as db:
        return await db.store.get_message(platform_id)


async def wait_for_state(database_url: str, asked: MessageRecord | str, state: str | None,
                         within: float = 60.0) -> StoredMessage:
    """Until the stored request `asked` is in `state` (read from the database the child writes)."""
    platform_id = asked if isinstance(asked, str) else str(asked.id)
    last: StoredMessage | None = None
    try:
        async with asyncio.timeout(within), open_database(database_url) as db:
            while True:
                last = await db.store.get_message(platform_id)
                if last is not None and last.request_state == state:
                    return last
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"request {platform_id} not {state} after {within}s: "
                             f"{last.request_state if last else 'not stored'}") from None

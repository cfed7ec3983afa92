"""Secrets and message text never reach the logs, even with every logger at DEBUG.

The bot runs with a distinctive token against the fake Discord, with the root logger and discord.py's
loggers at DEBUG and every record captured; it answers a mention and a slash command. No record (its
formatted message, its arguments, its traceback) may hold the token or the text users wrote. The redaction
is what `idefics-bot run` installs (`bot.ops.logging_setup.install_log_redaction`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from bot.ops.logging_setup import install_log_redaction, uninstall_log_redaction
from bot.settings import Settings
from tests.bot.discord_app.conftest import add_image_attachment, answer_to, run_bot, settle
from tests.fakes.discord_api import FakeDiscord
from tests.system.hostile.slash import run_interaction

TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.Gh7xQz.s3cr3t-T0KEN-that-must-never-be-logged_xyz"
MENTION_TEXT = "purple elephant number 7731 sings"
QUESTION_TEXT = "what does the violet giraffe 4412 think"


class Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def debug_logs() -> Iterator[Everything]:
    handler = Everything()
    root = logging.getLogger()
    loggers = [root, *(logging.getLogger(n) for n in ("discord", "discord.gateway", "discord.http",
                                                         "discord.client", "discord.state", "discord.webhook"))]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def texts_of(record: logging.LogRecord) -> list[str]:
    try:
        message = record.getMessage()
    except Exception:
        message = str(record.msg)
    parts = [message, str(record.msg), repr(record.args)]
    if record.exc_info:
        parts.append(logging.Formatter().formatException(record.exc_info))
    if record.exc_text:
        parts.append(record.exc_text)
    return parts


async def test_token_and_message_text_never_logged(debug_logs: Everything, bot_settings, services_factory) -> None:
    settings = Settings(**{**bot_settings.model_dump(), "discord_token": TOKEN}, _env_file=None)
    install_log_redaction([settings.discord_token.get_secret_value()])  # as `idefics-bot run` does
    try:
        async with FakeDiscord(token=TOKEN) as fake:
            world = fake.build_default_world()
            with fake.patch_discord():
                async with services_factory(settings) as services, run_bot(fake, services) as running:
                    asked = await fake.send_message_as(world.member, world.general, MENTION_TEXT,
                                                       mentions_bot=True)
                    await answer_to(running, world.general, asked)
                    payload = fake.slash_command_payload(
                        "ask", {"image": add_image_attachment(fake, seed=3), "question": QUESTION_TEXT},
                        channel=world.images, member=world.member)
                    await run_interaction(running, payload)
                    await settle(running)
    finally:
        uninstall_log_redaction()
    # The fake Discord's own logs are Discord's side, not the bot's.
    records = [r for r in debug_logs.records if not r.name.startswith("tests.")]
    assert any(r.name.startswith("discord.gateway") and r.levelno == logging.DEBUG for r in records), \
        "discord.py's debug logs were not captured"
    for secret in (TOKEN, MENTION_TEXT, QUESTION_TEXT):
        leaks = [(r.name, r.msg) for r in records if any(secret in t for t in texts_of(r))]
        assert not leaks, f"{secret[:12]}... logged by {leaks[:3]}"

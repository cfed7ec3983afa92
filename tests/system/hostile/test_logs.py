"""Secrets and message text never reach the logs, even with every logger at DEBUG.

The bot runs with a distinctive token against the fake Discord, with the root logger and discord.py's
loggers at DEBUG and every record captured; it answers a mention and a slash command. No record (its
formatted message, its arguments, its traceback) may hold the token or the text users wrote. The redaction
is what `idefics-bot run` installs (`bot.ops.logging_setup.install_log_redaction`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

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


async def test_no_token_the_fake_discord_issued_is_logged(debug_logs: Everything, bot_settings,
                                                          services_factory) -> None:
    """Interaction tokens travel in URL paths (`/interactions/{id}/{token}/callback`, `/webhooks/{app}/{token}/...`)
    that discord.py's HTTP and webhook loggers write at DEBUG: none may reach a log line, formatted or not."""
    settings = Settings(**{**bot_settings.model_dump(), "discord_token": TOKEN, "max_new_tokens": 40},
                        _env_file=None)
    install_log_redaction([settings.discord_token.get_secret_value()])  # as `idefics-bot run` does
    try:
        async with FakeDiscord(token=TOKEN) as fake:
            world = fake.build_default_world()
            with fake.patch_discord():
                async with services_factory(settings) as services, run_bot(fake, services) as running:
                    asked = await fake.send_message_as(world.member, world.general, "hi", mentions_bot=True)
                    await answer_to(running, world.general, asked)
                    image = add_image_attachment(fake, seed=3)
                    completed: list[int] = []

                    async def on_app_command_completion(interaction: Any, _command: Any) -> None:
                        completed.append(interaction.id)

                    running.bot.add_listener(on_app_command_completion)
                    for name, options, member in (
                        ("ask", {"image": image, "question": "what is it?"}, world.member),  # streamed edits
                        ("settings", {}, world.moderator),  # ephemeral
                        ("settings", {"max_new_tokens": 5}, world.member),  # refused
                        ("caption", {"image": image}, world.member),
                    ):
                        payload = fake.slash_command_payload(name, options, channel=world.images, member=member)
                        await run_interaction(running, payload)
                    # Streamed answers go on after their first edit: every command ends before the bot stops.
                    await fake.wait_for(lambda: len(completed) == 4, 30, "every command to complete")
                    await settle(running)
                    issued = [TOKEN, *(record.token for record in fake.interactions.values())]
    finally:
        uninstall_log_redaction()
    assert len(issued) == 5
    records = [r for r in debug_logs.records if not r.name.startswith("tests.")]
    assert any(r.name.startswith("discord.webhook") for r in records), "discord.py's webhook logs were not captured"
    assert any("/interactions/" in r.getMessage() for r in records), "no interaction URL was logged at all"
    lines = [logging.Formatter("%(name)s %(message)s").format(r) for r in records]
    for secret in issued:
        leaks = [line[:80] for line, r in zip(lines, records, strict=True)
                 if secret in line or any(secret in t for t in texts_of(r))]
        assert not leaks, f"token {secret[:20]}... logged: {leaks[:3]}"

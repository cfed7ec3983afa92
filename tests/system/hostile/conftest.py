"""The Discord fixtures of tests/bot/discord_app, for the hostile-input tests."""

from tests.bot.discord_app.conftest import (  # noqa: F401
    bot_settings,
    database_url,
    running_bot,
    services,
    services_factory,
)
from tests.fakes.discord_api.fixtures import fake_discord  # noqa: F401

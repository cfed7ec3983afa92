"""The Discord fixtures (fake Discord, settings, services, running bot) for the reliability tests."""

from tests.discord_bot.conftest import (  # noqa: F401
    bot_settings,
    database_url,
    running_bot,
    services,
    services_factory,
)
from tests.fake_discord.fixtures import fake_discord  # noqa: F401

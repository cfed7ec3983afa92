from tests.fakes.discord_api.fixtures import fake_discord  # noqa: F401

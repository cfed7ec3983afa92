"""Loopback fake of Discord's REST API and gateway for running the real discord.py client in tests."""

from .models import (
    EPHEMERAL,
    LOADING,
    MANAGE_CHANNELS,
    MANAGE_MESSAGES,
    FakeChannel,
    FakeGuild,
    FakeMember,
    FakeRole,
    FakeUser,
    InteractionRecord,
    MessageRecord,
    RecordedRequest,
    UploadedFile,
)
from .server import ApiError, DefaultWorld, FakeDiscord

__all__ = [
    "EPHEMERAL",
    "LOADING",
    "MANAGE_CHANNELS",
    "MANAGE_MESSAGES",
    "ApiError",
    "DefaultWorld",
    "FakeChannel",
    "FakeDiscord",
    "FakeGuild",
    "FakeMember",
    "FakeRole",
    "FakeUser",
    "InteractionRecord",
    "MessageRecord",
    "RecordedRequest",
    "UploadedFile",
]

"""Conversation storage: channels, messages, images and per-channel settings (SQLAlchemy 2 async).

    async with open_database(url) as db:
        stored = await db.store.append_message(NewMessage(...))
        window = await db.store.recent_window(channel_key, limit=20)

Imports nothing from discord, torch or transformers: callers convert their objects into the records below.
"""

from storage.database import Database, open_database
from storage.errors import (
    DatabaseBusy,
    DatabaseUnavailable,
    ImageTooLarge,
    InvalidMessage,
    InvalidSetting,
    StorageError,
)
from storage.records import (
    AnswerMode,
    ChannelSettings,
    Decoding,
    ImageBlob,
    NewMessage,
    RecordMode,
    RequestState,
    Role,
    StoredImage,
    StoredMessage,
)
from storage.store import Store

__all__ = [
    "AnswerMode",
    "ChannelSettings",
    "Database",
    "DatabaseBusy",
    "DatabaseUnavailable",
    "Decoding",
    "ImageBlob",
    "ImageTooLarge",
    "InvalidMessage",
    "InvalidSetting",
    "NewMessage",
    "RecordMode",
    "RequestState",
    "Role",
    "StorageError",
    "Store",
    "StoredImage",
    "StoredMessage",
    "open_database",
]

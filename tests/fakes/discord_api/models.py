"""State objects and records of the fake Discord server.

Field names of every ``*_payload`` follow Discord's API documentation and discord.py's ``discord/types``.
"""

from __future__ import annotations

import datetime as dt
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

DISCORD_EPOCH_MS = 1420070400000

# Permission bits (https://discord.com/developers/docs/topics/permissions)
CREATE_INSTANT_INVITE = 1 << 0
ADMINISTRATOR = 1 << 3
MANAGE_CHANNELS = 1 << 4
ADD_REACTIONS = 1 << 6
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
MANAGE_MESSAGES = 1 << 13
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_MESSAGE_HISTORY = 1 << 16
MENTION_EVERYONE = 1 << 17
USE_APPLICATION_COMMANDS = 1 << 31
CREATE_PUBLIC_THREADS = 1 << 35
SEND_MESSAGES_IN_THREADS = 1 << 38
ALL_PERMISSIONS = (1 << 53) - 1
DEFAULT_EVERYONE_PERMISSIONS = (
    CREATE_INSTANT_INVITE
    | ADD_REACTIONS
    | VIEW_CHANNEL
    | SEND_MESSAGES
    | EMBED_LINKS
    | ATTACH_FILES
    | READ_MESSAGE_HISTORY
    | USE_APPLICATION_COMMANDS
    | CREATE_PUBLIC_THREADS
    | SEND_MESSAGES_IN_THREADS
)

# Channel types
GUILD_TEXT = 0
GUILD_FORUM = 15
DM = 1
PUBLIC_THREAD = 11
PRIVATE_THREAD = 12

# Message flags (docs/resources/message.mdx, "Message Flags")
EPHEMERAL = 1 << 6
LOADING = 1 << 7
HAS_SNAPSHOT = 1 << 14
"""This message is a forward: its content is in `message_snapshots`."""

# Attachment flags (docs/resources/message.mdx, "Attachment Flags")
ATTACHMENT_IS_SPOILER = 1 << 3
"""This attachment was marked as a spoiler and is blurred until clicked."""


class SnowflakeGenerator:
    """Strictly increasing snowflakes whose timestamp part is the current time."""

    def __init__(self) -> None:
        self._last = 0
        self._counter = itertools.count()

    def __call__(self) -> int:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        value = (ms << 22) | (1 << 17) | (next(self._counter) & 0xFFF)
        if value <= self._last:
            value = self._last + 1
        self._last = value
        return value


def snowflake_time(snowflake: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(((snowflake >> 22) + DISCORD_EPOCH_MS) / 1000, tz=dt.UTC)


def iso(moment: dt.datetime | None = None) -> str:
    return (moment or dt.datetime.now(dt.UTC)).isoformat()


@dataclass(eq=False)
class FakeUser:
    id: int
    name: str
    bot: bool = False
    global_name: str | None = None

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"

    def to_payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.name,
            "discriminator": "0",
            "global_name": self.global_name,
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
            "flags": 0,
            "banner": None,
            "accent_color": None,
            "avatar_decoration_data": None,
        }


@dataclass(eq=False)
class FakeRole:
    id: int
    guild_id: int
    name: str
    permissions: int = 0
    position: int = 0

    @property
    def mention(self) -> str:
        return f"<@&{self.id}>"

    def to_payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "position": self.position,
            "permissions": str(self.permissions),
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }


@dataclass(eq=False)
class FakeGuild:
    id: int
    name: str
    owner_id: int
    roles: list[FakeRole] = field(default_factory=list)
    channels: list[FakeChannel] = field(default_factory=list)  # text channels
    threads: list[FakeChannel] = field(default_factory=list)
    members: dict[int, FakeMember] = field(default_factory=dict)
    joined_at: str = field(default_factory=iso)

    @property
    def default_role(self) -> FakeRole:
        return self.roles[0]

    def role(self, name: str) -> FakeRole:
        return next(r for r in self.roles if r.name == name)

    def channel(self, name: str) -> FakeChannel:
        return next(c for c in [*self.channels, *self.threads] if c.name == name)


@dataclass(eq=False)
class FakeMember:
    user: FakeUser
    guild: FakeGuild
    roles: list[FakeRole] = field(default_factory=list)
    nick: str | None = None
    joined_at: str = field(default_factory=iso)

    @property
    def id(self) -> int:
        return self.user.id

    @property
    def name(self) -> str:
        return self.user.name

    @property
    def mention(self) -> str:
        return self.user.mention

    @property
    def permissions(self) -> int:
        if self.user.id == self.guild.owner_id:
            return ALL_PERMISSIONS
        value = self.guild.default_role.permissions
        for role in self.roles:
            value |= role.permissions
        return ALL_PERMISSIONS if value & ADMINISTRATOR else value

    def to_payload(self, *, with_user: bool = True, with_permissions: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "nick": self.nick,
            "avatar": None,
            "banner": None,
            "roles": [str(r.id) for r in self.roles],
            "joined_at": self.joined_at,
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "communication_disabled_until": None,
        }
        if with_user:
            data["user"] = self.user.to_payload()
        if with_permissions:
            data["permissions"] = str(self.permissions)
        return data


@dataclass(eq=False)
class FakeChannel:
    id: int
    type: int
    name: str | None = None
    guild: FakeGuild | None = None
    parent_id: int | None = None  # threads: the text channel
    position: int = 0
    topic: str | None = None
    recipients: list[FakeUser] = field(default_factory=list)  # DMs
    owner_id: int | None = None  # threads
    last_message_id: int | None = None
    message_count: int = 0
    archived: bool = False
    created_at: str = field(default_factory=iso)

    @property
    def guild_id(self) -> int | None:
        return self.guild.id if self.guild else None

    @property
    def is_thread(self) -> bool:
        return self.type in (PUBLIC_THREAD, PRIVATE_THREAD)

    @property
    def is_dm(self) -> bool:
        return self.type == DM

    @property
    def mention(self) -> str:
        return f"<#{self.id}>"

    def to_payload(self, *, with_guild_id: bool = True) -> dict[str, Any]:
        last = str(self.last_message_id) if self.last_message_id else None
        if self.type == DM:
            return {
                "id": str(self.id),
                "type": DM,
                "last_message_id": last,
                "recipients": [u.to_payload() for u in self.recipients],
                "flags": 0,
            }
        if self.is_thread:
            data: dict[str, Any] = {
                "id": str(self.id),
                "type": self.type,
                "name": self.name,
                "parent_id": str(self.parent_id),
                "owner_id": str(self.owner_id),
                "last_message_id": last,
                "rate_limit_per_user": 0,
                "message_count": self.message_count,
                "member_count": 1,
                "total_message_sent": self.message_count,
                "flags": 0,
                "applied_tags": [],
                "thread_metadata": {
                    "archived": self.archived,
                    "auto_archive_duration": 1440,
                    "archive_timestamp": self.created_at,
                    "locked": False,
                    "invitable": True,
                    "create_timestamp": self.created_at,
                },
            }
        else:
            data = {
                "id": str(self.id),
                "type": self.type,
                "name": self.name,
                "position": self.position,
                "parent_id": None,
                "topic": self.topic,
                "nsfw": False,
                "last_message_id": last,
                "rate_limit_per_user": 0,
                "permission_overwrites": [],
                "default_auto_archive_duration": 1440,
                "flags": 0,
            }
            if self.type == GUILD_FORUM:  # docs/resources/channel.mdx, "Channel Object": forum-only fields
                data.update({"available_tags": [], "default_reaction_emoji": None, "default_sort_order": None,
                             "default_forum_layout": 0, "default_thread_rate_limit_per_user": 0})
        if with_guild_id and self.guild is not None:
            data["guild_id"] = str(self.guild.id)
        return data


@dataclass
class UploadedFile:
    field: str
    filename: str
    content_type: str | None
    data: bytes


@dataclass
class RecordedRequest:
    method: str
    path: str  # without the /api/vN prefix, e.g. "/channels/1/messages"
    query: dict[str, str]
    json: Any
    files: list[UploadedFile]
    headers: dict[str, str]
    time: float
    status: int = 0

    def __repr__(self) -> str:  # no headers: they carry the token
        return f"<RecordedRequest {self.method} {self.path} -> {self.status}>"


@dataclass(eq=False)
class MessageRecord:
    """A message the fake stores. ``payload`` is its current Discord message object."""

    payload: dict[str, Any]
    kind: str = "channel"  # channel | user | interaction_original | followup | starter
    allowed_mentions: dict[str, Any] | None = None
    message_reference: dict[str, Any] | None = None
    files: list[UploadedFile] = field(default_factory=list)
    edits: list[dict[str, Any]] = field(default_factory=list)  # request bodies of each edit
    deleted: bool = False
    interaction_id: int | None = None
    created: float = field(default_factory=time.monotonic)

    @property
    def id(self) -> int:
        return int(self.payload["id"])

    @property
    def channel_id(self) -> int:
        return int(self.payload["channel_id"])

    @property
    def author_id(self) -> int:
        return int(self.payload["author"]["id"])

    @property
    def content(self) -> str:
        return self.payload.get("content", "")

    @property
    def embeds(self) -> list[dict[str, Any]]:
        return self.payload.get("embeds", [])

    @property
    def attachments(self) -> list[dict[str, Any]]:
        return self.payload.get("attachments", [])

    @property
    def flags(self) -> int:
        return self.payload.get("flags", 0)

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & EPHEMERAL)

    @property
    def loading(self) -> bool:
        return bool(self.flags & LOADING)

    @property
    def mentions(self) -> list[int]:
        """Ids of the users this message actually pinged (after allowed_mentions)."""
        return [int(u["id"]) for u in self.payload.get("mentions", [])]

    @property
    def mention_roles(self) -> list[int]:
        return [int(r) for r in self.payload.get("mention_roles", [])]

    @property
    def mention_everyone(self) -> bool:
        return bool(self.payload.get("mention_everyone"))

    def __repr__(self) -> str:
        return (
            f"<MessageRecord id={self.id} channel={self.channel_id} author={self.author_id} kind={self.kind} "
            f"len={len(self.content)} edits={len(self.edits)} deleted={self.deleted}>"
        )


@dataclass(eq=False)
class InteractionRecord:
    """One interaction sent to the bot, and everything it answered."""

    payload: dict[str, Any]
    callbacks: list[dict[str, Any]] = field(default_factory=list)  # bodies of POST .../callback
    original: MessageRecord | None = None
    followups: list[MessageRecord] = field(default_factory=list)
    original_edits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def id(self) -> int:
        return int(self.payload["id"])

    @property
    def token(self) -> str:
        return self.payload["token"]

    @property
    def responded(self) -> bool:
        return bool(self.callbacks)

    @property
    def response_type(self) -> int | None:
        return self.callbacks[0]["type"] if self.callbacks else None

    @property
    def deferred(self) -> bool:
        return self.response_type in (5, 6)

    @property
    def ephemeral(self) -> bool:
        return self.original is not None and self.original.ephemeral

    def __repr__(self) -> str:
        return (
            f"<InteractionRecord id={self.id} response_type={self.response_type} "
            f"original={self.original!r} followups={len(self.followups)}>"
        )

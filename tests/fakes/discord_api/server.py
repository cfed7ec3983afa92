"""A loopback fake of Discord's REST API and gateway for running the real discord.py client in tests."""

# The wait_* helpers take a ``timeout`` on purpose: tests read better that way.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import mimetypes
import re
import secrets
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from .models import (
    ATTACHMENT_IS_SPOILER,
    DEFAULT_EVERYONE_PERMISSIONS,
    DM,
    EPHEMERAL,
    GUILD_FORUM,
    GUILD_TEXT,
    HAS_SNAPSHOT,
    LOADING,
    MANAGE_CHANNELS,
    MANAGE_MESSAGES,
    PUBLIC_THREAD,
    FakeChannel,
    FakeGuild,
    FakeMember,
    FakeRole,
    FakeUser,
    InteractionRecord,
    MessageRecord,
    RecordedRequest,
    SnowflakeGenerator,
    UploadedFile,
    iso,
    snowflake_time,
)

log = logging.getLogger("tests.fakes.discord_api")

JSON_HEADERS = {"Content-Type": "application/json"}
NON_RESUMABLE_CLOSE_CODES = (4007, 4009)  # invalid seq, session timed out
MAX_CONTENT = 2000
MAX_EMBEDS = 10
MAX_FILES = 10


class ApiError(Exception):
    """Raised inside a route handler to answer with Discord's JSON error shape."""

    def __init__(self, status: int, code: int, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status, self.code, self.message, self.errors = status, code, message, errors

    def response(self) -> web.Response:
        body: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors:
            body["errors"] = self.errors
        return _json(body, self.status)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # Exactly "application/json": discord.py compares the header verbatim (no charset).
    return web.Response(body=json.dumps(data).encode(), status=status, headers={**JSON_HEADERS, **(headers or {})})


def _no_content() -> web.Response:
    return web.Response(status=204)


def _form_error(field_name: str, code: str, message: str) -> ApiError:
    return ApiError(400, 50035, "Invalid Form Body", {field_name: {"_errors": [{"code": code, "message": message}]}})


def _compile_pattern(pattern: str) -> re.Pattern[str]:
    """Route-style template ("/channels/{channel_id}/messages/*") or a regex starting with "^"."""
    if pattern.startswith("^"):
        return re.compile(pattern)
    out = []
    for part in re.split(r"(\{[^}]*\}|\*)", pattern):
        if part == "*":
            out.append(".*")
        elif part.startswith("{") and part.endswith("}"):
            out.append("[^/]+")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))


@dataclass
class _Fault:
    method: str | None
    pattern: re.Pattern[str]
    count: int
    status: int | None  # None: only delay, then answer normally
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and bool(self.pattern.fullmatch(path))


@dataclass
class _Request:
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    json: Any
    files: list[UploadedFile]
    record: RecordedRequest


class _Connection:
    def __init__(self, ws: web.WebSocketResponse, compress: bool) -> None:
        self.ws = ws
        self._zlib = zlib.compressobj() if compress else None
        self.session: _Session | None = None
        self.lock = asyncio.Lock()

    async def send(self, frame: dict[str, Any]) -> bool:
        if self.ws.closed:
            return False
        text = json.dumps(frame)
        try:
            async with self.lock:
                if self._zlib is not None:
                    data = self._zlib.compress(text.encode()) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
                    await self.ws.send_bytes(data)
                else:
                    await self.ws.send_str(text)
        except (ConnectionError, RuntimeError) as exc:
            log.debug("fake gateway: send failed: %r", exc)
            return False
        return True


class _Session:
    def __init__(self, session_id: str, shard: tuple[int, int]) -> None:
        self.id = session_id
        self.shard = shard
        self.seq = 0
        self.buffer: list[dict[str, Any]] = []
        self.conn: _Connection | None = None
        self.lock = asyncio.Lock()
        self.valid = True

    async def emit(self, event: str, data: Any) -> None:
        async with self.lock:
            self.seq += 1
            frame = {"op": 0, "t": event, "s": self.seq, "d": data}
            self.buffer.append(frame)
            if self.conn is not None:
                await self.conn.send(frame)


class FakeDiscord:
    """Loopback fake of Discord (REST under ``/api/v10`` and a gateway websocket) on 127.0.0.1.

    Use as ``async with FakeDiscord() as fake, fake.patch_discord(): ...``.
    """

    def __init__(
        self,
        *,
        bot_name: str = "idefics-test-bot",
        token: str = "fake-discord-token",
        heartbeat_interval_ms: int = 41250,
        attachment_size_limit: int = 10 * 1024 * 1024,
        shards: int = 1,
        honour_compression: bool = True,
    ) -> None:
        self.snowflake = SnowflakeGenerator()
        self.token = token
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.attachment_size_limit = attachment_size_limit
        self.shard_count = shards
        self.honour_compression = honour_compression
        self.bot = FakeUser(self.snowflake(), bot_name, bot=True)
        self.application_id = self.bot.id  # as for every application created since 2020
        self.owner = FakeUser(self.snowflake(), "app-owner")
        self.users: dict[int, FakeUser] = {self.bot.id: self.bot, self.owner.id: self.owner}
        self.guilds: dict[int, FakeGuild] = {}
        self.channels: dict[int, FakeChannel] = {}
        self.messages: dict[int, MessageRecord] = {}
        self.interactions: dict[int, InteractionRecord] = {}
        self.global_commands: list[dict[str, Any]] = []
        self.guild_commands: dict[int, list[dict[str, Any]]] = {}
        self.requests: list[RecordedRequest] = []
        self.gateway_frames: list[dict[str, Any]] = []  # frames received from clients (tokens redacted)
        self.identify_count = 0
        self.resume_count = 0
        self.unknown_routes: list[str] = []
        self.world: Any = None  # set by build_default_world()
        self._attachment_data: dict[int, UploadedFile] = {}
        self._faults: list[_Fault] = []
        self._sessions: dict[str, _Session] = {}
        self._connections: set[_Connection] = set()
        self._cond = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._routes = self._build_routes()

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_get("/gateway-ws", self._ws_handler)
        app.router.add_get("/gateway-ws/", self._ws_handler)
        app.router.add_route("*", "/{tail:.*}", self._http_handler)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info("fake discord listening on %s", self.base_url)

    async def stop(self) -> None:
        for conn in list(self._connections):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.ws.close(code=1001, message=b"fake discord stopping"), 2)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway-ws"

    @contextlib.contextmanager
    def patch_discord(self) -> Iterator[FakeDiscord]:
        """Point discord.py's REST base and gateway at this fake; undone on exit."""
        import yarl
        from discord.gateway import DiscordWebSocket
        from discord.http import Route

        old_base, old_gateway = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
        Route.BASE = self.api_base
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url + "/")
        try:
            yield self
        finally:
            Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = old_base, old_gateway

    @contextlib.asynccontextmanager
    async def running(self, client: Any, *, ready_timeout: float = 10.0) -> AsyncIterator[Any]:
        """Start ``client`` (login + gateway) against this fake, wait for on_ready, close it on exit."""
        task = asyncio.create_task(client.start(self.token), name="fake-discord-client")
        ready = asyncio.create_task(client.wait_until_ready())
        done, _ = await asyncio.wait({task, ready}, timeout=ready_timeout, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            with contextlib.suppress(Exception):
                await client.close()
            if task in done:
                task.result()  # raises the client's error
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise AssertionError(f"client not ready after {ready_timeout}s; requests: {self.requests[-10:]}")
        try:
            yield client
        finally:
            await client.close()
            try:
                await asyncio.wait_for(task, 5)
            except asyncio.CancelledError:
                pass

    # ------------------------------------------------------------------ state building
    def add_user(self, name: str, *, bot: bool = False) -> FakeUser:
        user = FakeUser(self.snowflake(), name, bot=bot)
        self.users[user.id] = user
        return user

    def add_guild(self, name: str = "Test Guild", *, owner: FakeUser | None = None) -> FakeGuild:
        guild = FakeGuild(self.snowflake(), name, owner_id=(owner or self.owner).id)
        guild.roles.append(FakeRole(guild.id, guild.id, "@everyone", DEFAULT_EVERYONE_PERMISSIONS, 0))
        self.guilds[guild.id] = guild
        guild.members[self.bot.id] = FakeMember(self.bot, guild)
        owner_user = owner or self.owner
        guild.members[owner_user.id] = FakeMember(owner_user, guild)
        return guild

    def add_role(self, guild: FakeGuild, name: str, permissions: int = 0) -> FakeRole:
        role = FakeRole(self.snowflake(), guild.id, name, permissions, position=len(guild.roles))
        guild.roles.append(role)
        return role

    def add_member(
        self,
        guild: FakeGuild,
        name_or_user: str | FakeUser,
        *,
        roles: Iterable[FakeRole] = (),
        nick: str | None = None,
    ) -> FakeMember:
        user = name_or_user if isinstance(name_or_user, FakeUser) else self.add_user(name_or_user)
        self.users[user.id] = user
        member = FakeMember(user, guild, list(roles), nick)
        guild.members[user.id] = member
        return member

    def add_text_channel(self, guild: FakeGuild, name: str, *, topic: str | None = None) -> FakeChannel:
        channel = FakeChannel(self.snowflake(), GUILD_TEXT, name, guild, position=len(guild.channels), topic=topic)
        guild.channels.append(channel)
        self.channels[channel.id] = channel
        return channel

    def add_thread(
        self,
        parent: FakeChannel,
        name: str,
        *,
        owner: FakeUser | FakeMember | None = None,
        starter_content: str | None = "thread starter",
    ) -> FakeChannel:
        """A public thread under ``parent``; with ``starter_content`` it starts from a stored message whose id
        is the thread's id, as Discord does."""
        assert parent.guild is not None and parent.type == GUILD_TEXT
        owner_user = _user_of(owner) if owner is not None else self.bot
        thread_id = self.snowflake()
        if starter_content is not None:
            payload = self.message_payload(parent, owner_user, starter_content, message_id=thread_id)
            self._store(MessageRecord(payload, kind="starter"))
        thread = FakeChannel(thread_id, PUBLIC_THREAD, name, parent.guild, parent_id=parent.id, owner_id=owner_user.id)
        if starter_content is not None:
            self.messages[thread_id].payload["thread"] = thread.to_payload()
        parent.guild.threads.append(thread)
        self.channels[thread.id] = thread
        return thread

    def add_forum_channel(self, guild: FakeGuild, name: str, *, topic: str | None = None) -> FakeChannel:
        """A GUILD_FORUM channel (type 15, docs/resources/channel.mdx "Channel Types"): it holds only threads,
        its posts."""
        channel = FakeChannel(self.snowflake(), GUILD_FORUM, name, guild, position=len(guild.channels), topic=topic)
        guild.channels.append(channel)
        self.channels[channel.id] = channel
        return channel

    async def post_in_forum(
        self,
        author: FakeUser | FakeMember,
        forum: FakeChannel,
        title: str,
        content: str = "",
        *,
        attachments: Iterable[dict[str, Any]] = (),
        mentions_bot: bool = False,
        dispatch: bool = True,
    ) -> tuple[FakeChannel, MessageRecord]:
        """A user's forum post, as Discord makes one (docs/resources/channel.mdx, "Start Thread in Forum or Media
        Channel": "a message is created that has the same ID as the thread"): a public thread under ``forum``
        whose first message lives in the thread itself, with the thread's id. Dispatches THREAD_CREATE, then that
        message's MESSAGE_CREATE (docs/events/gateway-events.mdx, "Thread Create", "Message Create"); with
        ``dispatch=False`` neither (a post made while the bot was away)."""
        assert forum.type == GUILD_FORUM and forum.guild is not None
        user = _user_of(author)
        thread_id = self.snowflake()
        thread = FakeChannel(thread_id, PUBLIC_THREAD, title, forum.guild, parent_id=forum.id, owner_id=user.id)
        forum.guild.threads.append(thread)
        self.channels[thread_id] = thread
        forum.last_message_id = thread_id  # a forum's last_message_id is its newest post's (thread's) id
        payload = self.message_payload(thread, author, content, attachments, mentions_bot, message_id=thread_id)
        record = self._store(MessageRecord(payload, kind="user"))
        if dispatch:
            await self.dispatch_thread_create(thread)
            await self.dispatch("MESSAGE_CREATE", payload)
        return thread, record

    def add_dm(self, user: FakeUser | FakeMember) -> FakeChannel:
        user = _user_of(user)
        for channel in self.channels.values():
            if channel.type == DM and channel.recipients and channel.recipients[0].id == user.id:
                return channel
        channel = FakeChannel(self.snowflake(), DM, None, recipients=[user])
        self.channels[channel.id] = channel
        return channel

    def add_attachment(
        self,
        data: bytes,
        filename: str,
        content_type: str | None = None,
        *,
        width: int | None = None,
        height: int | None = None,
        description: str | None = None,
        spoiler: bool = False,
    ) -> dict[str, Any]:
        """Register bytes served at ``/attachments/{id}/{filename}``; returns the attachment payload.

        ``spoiler`` sets the IS_SPOILER attachment flag (docs/resources/message.mdx, "Attachment Flags":
        ``1 << 3``, "this attachment was marked as a spoiler and is blurred until clicked"); a file uploaded
        with a ``SPOILER_`` name prefix is a spoiler too, whatever its flags."""
        content_type = content_type or mimetypes.guess_type(filename)[0]
        att_id = self.snowflake()
        self._attachment_data[att_id] = UploadedFile("attachment", filename, content_type, data)
        url = f"{self.base_url}/attachments/{att_id}/{filename}"
        payload: dict[str, Any] = {
            "id": str(att_id),
            "filename": filename,
            "size": len(data),
            "url": url,
            "proxy_url": url + "?proxy=1",
            "content_type": content_type,
            "width": width,
            "height": height,
            "ephemeral": False,
            "flags": ATTACHMENT_IS_SPOILER if spoiler else 0,
        }
        if description is not None:
            payload["description"] = description
        return payload

    def attachment_bytes(self, attachment: dict[str, Any] | int) -> bytes:
        att_id = int(attachment["id"]) if isinstance(attachment, dict) else attachment
        return self._attachment_data[att_id].data

    def build_default_world(self) -> DefaultWorld:
        guild = self.add_guild("Test Guild")
        mod_role = self.add_role(guild, "Moderator", MANAGE_CHANNELS | MANAGE_MESSAGES)
        member_role = self.add_role(guild, "Member", 0)
        general = self.add_text_channel(guild, "general", topic="general chat")
        images = self.add_text_channel(guild, "images")
        moderator = self.add_member(guild, "mod-alice", roles=[mod_role])
        member = self.add_member(guild, "bob", roles=[member_role])
        thread = self.add_thread(general, "a thread", owner=member, starter_content="let's talk in a thread")
        dm = self.add_dm(member)
        self.world = DefaultWorld(guild, general, images, thread, moderator, member, dm, mod_role, member_role)
        return self.world

    # ------------------------------------------------------------------ payload builders
    def member_payload(self, member: FakeMember, *, with_permissions: bool = False) -> dict[str, Any]:
        return member.to_payload(with_permissions=with_permissions)

    def channel_payload(self, channel: FakeChannel) -> dict[str, Any]:
        return channel.to_payload()

    thread_payload = channel_payload
    dm_channel_payload = channel_payload

    def guild_payload(self, guild: FakeGuild) -> dict[str, Any]:
        """The full GUILD_CREATE object."""
        members = list(guild.members.values())
        return {
            "id": str(guild.id),
            "name": guild.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(guild.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "premium_progress_bar_enabled": False,
            "preferred_locale": "en-US",
            "system_channel_id": str(guild.channels[0].id) if guild.channels else None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "safety_alerts_channel_id": None,
            "vanity_url_code": None,
            "application_id": None,
            "features": [],
            "roles": [r.to_payload() for r in guild.roles],
            "emojis": [],
            "stickers": [],
            "joined_at": guild.joined_at,
            "large": False,
            "unavailable": False,
            "lazy": True,
            "member_count": len(members),
            "members": [m.to_payload() for m in members],
            "channels": [c.to_payload(with_guild_id=False) for c in guild.channels],
            "threads": [t.to_payload() for t in guild.threads if not t.archived],
            "presences": [],
            "voice_states": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "max_members": 500000,
            "max_video_channel_users": 25,
        }

    def message_payload(
        self,
        channel: FakeChannel,
        author: FakeUser | FakeMember,
        content: str = "",
        attachments: Iterable[dict[str, Any]] = (),
        mentions_bot: bool = False,
        reference: MessageRecord | dict[str, Any] | int | None = None,
        embeds: Iterable[dict[str, Any]] = (),
        *,
        message_id: int | None = None,
        allowed_mentions: dict[str, Any] | None = None,
        message_type: int | None = None,
        flags: int = 0,
    ) -> dict[str, Any]:
        """A realistic MESSAGE_CREATE payload (not stored, not dispatched)."""
        user = _user_of(author)
        if mentions_bot and self.bot.mention not in content and f"<@!{self.bot.id}>" not in content:
            content = f"{self.bot.mention} {content}".rstrip()
        msg_id = message_id or self.snowflake()
        payload: dict[str, Any] = {
            "id": str(msg_id),
            "channel_id": str(channel.id),
            "author": user.to_payload(),
            "content": content,
            "timestamp": iso(snowflake_time(msg_id)),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [dict(a) for a in attachments],
            "embeds": [dict(e) for e in embeds],
            "pinned": False,
            "type": 0,
            "flags": flags,
            "components": [],
        }
        if channel.guild is not None:
            payload["guild_id"] = str(channel.guild.id)
            member = channel.guild.members.get(user.id)
            if member is not None:
                payload["member"] = member.to_payload(with_user=False)
        if reference is not None:
            ref = self._resolve_reference(channel, reference)
            payload["message_reference"] = ref[0]
            payload["referenced_message"] = ref[1]
            payload["type"] = 19
        self._apply_mentions(payload, channel, allowed_mentions)
        if message_type is not None:
            payload["type"] = message_type
        return payload

    def slash_command_payload(
        self,
        name: str,
        options: dict[str, Any] | list[dict[str, Any]] | None = None,
        *,
        channel: FakeChannel,
        member: FakeMember | FakeUser,
        attachments: Iterable[dict[str, Any]] = (),
    ) -> dict[str, Any]:
        """INTERACTION_CREATE for a chat-input command. ``options`` maps option names to values (an
        attachment payload, a FakeUser/FakeMember/FakeRole/FakeChannel, or str/int/float/bool), or is a list
        of raw option dicts. ``attachments`` adds extra entries to ``data.resolved.attachments``."""
        command = self._find_command(name, 1, channel.guild_id)
        declared = {o["name"]: o for o in (command or {}).get("options", [])}
        resolved: dict[str, dict[str, Any]] = {}
        for att in attachments:
            resolved.setdefault("attachments", {})[str(att["id"])] = att
        raw_options: list[dict[str, Any]] = []
        if isinstance(options, list):
            raw_options = options
        elif options:
            for opt_name, value in options.items():
                raw_options.append(
                    self._option(opt_name, value, declared.get(opt_name, {}).get("type"), channel, resolved)
                )
        data: dict[str, Any] = {
            "id": str(command["id"]) if command else str(self.snowflake()),
            "name": name,
            "type": 1,
        }
        if raw_options:
            data["options"] = raw_options
        if resolved:
            data["resolved"] = resolved
        if command and command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        return self._interaction_payload(2, data, channel, member)

    def context_menu_payload(
        self,
        name: str,
        target: MessageRecord | dict[str, Any] | FakeUser | FakeMember,
        *,
        channel: FakeChannel,
        member: FakeMember | FakeUser,
    ) -> dict[str, Any]:
        """INTERACTION_CREATE for a message (type 3) or user (type 2) context-menu command."""
        resolved: dict[str, Any] = {}
        if isinstance(target, FakeUser | FakeMember):
            cmd_type = 2
            target_id = target.id
            self._resolve_user(target, resolved)
        else:
            cmd_type = 3
            msg = target.payload if isinstance(target, MessageRecord) else target
            target_id = int(msg["id"])
            resolved["messages"] = {str(target_id): copy.deepcopy(msg)}
        command = self._find_command(name, cmd_type, channel.guild_id)
        data: dict[str, Any] = {
            "id": str(command["id"]) if command else str(self.snowflake()),
            "name": name,
            "type": cmd_type,
            "target_id": str(target_id),
            "resolved": resolved,
        }
        if command and command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        return self._interaction_payload(2, data, channel, member)

    # ------------------------------------------------------------------ dispatch API
    async def dispatch(self, event: str, data: dict[str, Any], *, guild_id: int | None = None) -> int:
        """Send a DISPATCH (op 0) event to every live session (buffered for RESUME while disconnected).
        Returns how many sessions got it."""
        if event == "INTERACTION_CREATE":
            self._register_interaction(data)
        if guild_id is None and isinstance(data, dict) and data.get("guild_id"):
            guild_id = int(data["guild_id"])
        sent = 0
        for session in list(self._sessions.values()):
            if not session.valid:
                continue
            shard_id, count = session.shard
            target_shard = (guild_id >> 22) % count if guild_id else 0
            if target_shard != shard_id:
                continue
            await session.emit(event, copy.deepcopy(data))
            sent += 1
        if sent == 0:
            log.warning("fake gateway: %s dispatched with no connected session", event)
        await self._notify()
        return sent

    async def send_message_as(
        self,
        user: FakeUser | FakeMember,
        channel: FakeChannel,
        content: str = "",
        *,
        attachments: Iterable[dict[str, Any]] = (),
        mentions_bot: bool = False,
        reference: MessageRecord | dict[str, Any] | int | None = None,
        embeds: Iterable[dict[str, Any]] = (),
    ) -> MessageRecord:
        """Store a message from ``user`` and dispatch MESSAGE_CREATE for it."""
        payload = self.message_payload(channel, user, content, attachments, mentions_bot, reference, embeds)
        record = self._store(MessageRecord(payload, kind="user"))
        await self.dispatch("MESSAGE_CREATE", payload)
        return record

    async def forward_message(
        self,
        user: FakeUser | FakeMember,
        original: MessageRecord,
        channel: FakeChannel,
    ) -> MessageRecord:
        """``user`` forwards ``original`` into ``channel``, as Discord sends a forward (docs/resources/message.mdx,
        "Message Reference Types", "Forwards", "Message Snapshot Object"): a DEFAULT-type message with empty
        content and no attachments of its own, flag HAS_SNAPSHOT, a ``message_reference`` of type 1 (FORWARD)
        pointing at the original (no ``referenced_message``: that field goes with replies), and one
        ``message_snapshots`` entry holding a copy of the original's ``type``, ``content``, ``embeds``,
        ``attachments``, ``timestamp``, ``edited_timestamp``, ``flags``, ``mentions`` and ``mention_roles``
        (never its author). Stored and dispatched as MESSAGE_CREATE."""
        payload = self.message_payload(channel, user, "", flags=HAS_SNAPSHOT)
        source = original.payload
        reference = {"type": 1, "message_id": source["id"], "channel_id": source["channel_id"]}
        if source.get("guild_id"):
            reference["guild_id"] = source["guild_id"]
        payload["message_reference"] = reference
        fields = ("type", "content", "embeds", "attachments", "timestamp", "edited_timestamp", "flags", "mentions",
                  "mention_roles")
        payload["message_snapshots"] = [{"message": {k: copy.deepcopy(source.get(k)) for k in fields}}]
        snapshot = payload["message_snapshots"][0]["message"]
        snapshot["flags"] = snapshot["flags"] or 0
        snapshot["mentions"] = snapshot["mentions"] or []
        snapshot["mention_roles"] = snapshot["mention_roles"] or []
        record = self._store(MessageRecord(payload, kind="user"))
        await self.dispatch("MESSAGE_CREATE", payload)
        return record

    async def dispatch_message_update(self, message: MessageRecord | int, **changes: Any) -> MessageRecord:
        record = self.messages[message if isinstance(message, int) else message.id]
        record.payload.update(changes)
        record.payload["edited_timestamp"] = iso()
        await self.dispatch("MESSAGE_UPDATE", record.payload)
        return record

    async def dispatch_partial_message_update(self, message: MessageRecord | int) -> dict[str, Any]:
        """MESSAGE_UPDATE carrying only ``id`` and ``channel_id``, as older gateway versions sent it when Discord
        only added an embed (docs/events/gateway-events.mdx, "Message Update": "unlike creates, message updates
        may contain only a subset of the full message object payload"). Returns the payload sent."""
        record = self.messages[message if isinstance(message, int) else message.id]
        data = {"id": str(record.id), "channel_id": str(record.channel_id)}
        await self.dispatch("MESSAGE_UPDATE", data, guild_id=record.payload.get("guild_id") and
                            int(record.payload["guild_id"]))
        return data

    async def dispatch_message_delete(self, message: MessageRecord | int) -> None:
        record = self.messages[message if isinstance(message, int) else message.id]
        record.deleted = True
        data = {"id": str(record.id), "channel_id": str(record.channel_id)}
        if record.payload.get("guild_id"):
            data["guild_id"] = record.payload["guild_id"]
        await self.dispatch("MESSAGE_DELETE", data)

    async def dispatch_message_delete_bulk(self, messages: Iterable[MessageRecord | int]) -> None:
        records = [self.messages[m if isinstance(m, int) else m.id] for m in messages]
        for record in records:
            record.deleted = True
        first = records[0]
        data = {"ids": [str(r.id) for r in records], "channel_id": str(first.channel_id)}
        if first.payload.get("guild_id"):
            data["guild_id"] = first.payload["guild_id"]
        await self.dispatch("MESSAGE_DELETE_BULK", data)

    async def dispatch_thread_create(self, thread: FakeChannel, *, newly_created: bool = True) -> None:
        await self.dispatch("THREAD_CREATE", {**thread.to_payload(), "newly_created": newly_created})

    async def create_thread(
        self,
        parent: FakeChannel,
        name: str,
        *,
        owner: FakeUser | FakeMember | None = None,
        starter_content: str | None = None,
    ) -> FakeChannel:
        """Add a thread and dispatch THREAD_CREATE."""
        thread = self.add_thread(parent, name, owner=owner, starter_content=starter_content)
        await self.dispatch_thread_create(thread)
        return thread

    async def invoke_slash(
        self,
        name: str,
        options: dict[str, Any] | list[dict[str, Any]] | None = None,
        *,
        channel: FakeChannel,
        member: FakeMember | FakeUser,
        attachments: Iterable[dict[str, Any]] = (),
    ) -> InteractionRecord:
        payload = self.slash_command_payload(name, options, channel=channel, member=member, attachments=attachments)
        await self.dispatch("INTERACTION_CREATE", payload)
        return self.interactions[int(payload["id"])]

    async def invoke_context_menu(
        self,
        name: str,
        target: MessageRecord | dict[str, Any] | FakeUser | FakeMember,
        *,
        channel: FakeChannel,
        member: FakeMember | FakeUser,
    ) -> InteractionRecord:
        payload = self.context_menu_payload(name, target, channel=channel, member=member)
        await self.dispatch("INTERACTION_CREATE", payload)
        return self.interactions[int(payload["id"])]

    def interaction_responses(self, interaction: InteractionRecord | int) -> InteractionRecord:
        return self.interactions[interaction if isinstance(interaction, int) else interaction.id]

    # ------------------------------------------------------------------ fault injection
    def inject_fault(
        self,
        method: str | None,
        path_pattern: str,
        *,
        status: int | None = 500,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        count: int = 1,
        delay: float = 0.0,
    ) -> None:
        """Answer the next ``count`` matching requests with ``status`` (after ``delay`` s).
        ``path_pattern`` is matched against the path without ``/api/v10``: a template
        ("/channels/{id}/messages", "*" allowed) or a regex starting with "^". ``status=None`` only delays."""
        if json_body is None and status is not None:
            json_body = {"message": f"{status}: injected fault", "code": 0}
        self._faults.append(
            _Fault(method, _compile_pattern(path_pattern), count, status, json_body, headers or {}, delay)
        )

    def delay_next(self, method: str | None, path_pattern: str, seconds: float, count: int = 1) -> None:
        self.inject_fault(method, path_pattern, status=None, delay=seconds, count=count)

    def rate_limit_next(
        self,
        method: str | None,
        path_pattern: str,
        retry_after: float,
        count: int = 1,
        *,
        is_global: bool = False,
    ) -> None:
        headers = {
            "Retry-After": str(max(1, int(retry_after + 0.999))),
            "X-RateLimit-Limit": "5",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": f"{time.time() + retry_after:.3f}",
            "X-RateLimit-Reset-After": f"{retry_after:.3f}",
            "X-RateLimit-Bucket": "fake" + secrets.token_hex(8),
            "X-RateLimit-Scope": "global" if is_global else "user",
            "Via": "1.1 google",  # discord.py treats a 429 without Via as a Cloudflare ban
        }
        if is_global:
            headers["X-RateLimit-Global"] = "true"
        body = {"message": "You are being rate limited.", "retry_after": retry_after, "global": is_global}
        self.inject_fault(method, path_pattern, status=429, json_body=body, headers=headers, count=count)

    async def close_gateway(self, code: int = 4000) -> None:
        """Drop every gateway connection with ``code``. discord.py then RESUMEs (codes 4007/4009 invalidate
        the session so the resume is refused and it identifies again)."""
        for conn in list(self._connections):
            if conn.session is not None:
                if code in NON_RESUMABLE_CLOSE_CODES:
                    conn.session.valid = False
                conn.session.conn = None
            await conn.ws.close(code=code, message=b"closed by fake")

    async def invalidate_session(self, resumable: bool = False) -> None:
        """Send op 9 INVALID_SESSION to every connection."""
        for conn in list(self._connections):
            if conn.session is not None and not resumable:
                conn.session.valid = False
            await conn.send({"op": 9, "d": resumable, "s": None, "t": None})

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT: the client closes and resumes."""
        for conn in list(self._connections):
            await conn.send({"op": 7, "d": None, "s": None, "t": None})

    # ------------------------------------------------------------------ accessors and waiting
    def sent_messages(
        self, channel_id: int | FakeChannel | None = None, *, include_deleted: bool = False
    ) -> list[MessageRecord]:
        """Messages authored by the bot (channel sends, interaction responses, followups), final state."""
        cid = channel_id.id if isinstance(channel_id, FakeChannel) else channel_id
        return [
            m
            for m in self.messages.values()
            if m.author_id == self.bot.id
            and m.kind != "starter"
            and (cid is None or m.channel_id == cid)
            and (include_deleted or not m.deleted)
        ]

    def edits_of(self, message_id: int | MessageRecord) -> list[dict[str, Any]]:
        mid = message_id.id if isinstance(message_id, MessageRecord) else message_id
        return self.messages[mid].edits

    def requests_to(self, method: str | None, path_pattern: str) -> list[RecordedRequest]:
        pattern = _compile_pattern(path_pattern)
        return [r for r in self.requests if (method is None or r.method == method) and pattern.fullmatch(r.path)]

    def commands(self, guild_id: int | FakeGuild | None = None) -> list[dict[str, Any]]:
        if guild_id is None:
            return self.global_commands
        return self.guild_commands.get(guild_id.id if isinstance(guild_id, FakeGuild) else guild_id, [])

    async def wait_for(self, condition: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
        """Wait (on an asyncio.Condition, no polling) until ``condition()`` is truthy; return its value."""
        result: Any = None

        def check() -> bool:
            nonlocal result
            result = condition()
            return bool(result)

        try:
            async with asyncio.timeout(timeout), self._cond:
                while not check():
                    # Woken by every change the fake sees; the short cap re-checks conditions on state the
                    # fake cannot see (e.g. the client's own caches or a test's lists).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._cond.wait(), 0.05)
        except TimeoutError:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}; last requests: {self.requests[-8:]}"
            ) from None
        return result

    async def wait_for_request(
        self, predicate: Callable[[RecordedRequest], bool], timeout: float = 5.0, *, start: int = 0
    ) -> RecordedRequest:
        """First recorded request (from index ``start``) that matches and has been answered."""

        def find() -> RecordedRequest | None:
            return next((r for r in self.requests[start:] if r.status and predicate(r)), None)

        return await self.wait_for(find, timeout, "request")

    async def wait_for_message(
        self,
        channel_id: int | FakeChannel | None,
        predicate: Callable[[MessageRecord], bool] | None = None,
        timeout: float = 5.0,
        *,
        from_bot: bool = True,
    ) -> MessageRecord:
        """First stored message in the channel (by the bot unless ``from_bot=False``) matching ``predicate``;
        edits wake the waiter too."""
        cid = channel_id.id if isinstance(channel_id, FakeChannel) else channel_id

        def find() -> MessageRecord | None:
            for m in self.messages.values():
                if (
                    (cid is None or m.channel_id == cid)
                    and (not from_bot or m.author_id == self.bot.id)
                    and m.kind != "starter"
                    and not m.deleted
                    and (predicate is None or predicate(m))
                ):
                    return m
            return None

        return await self.wait_for(find, timeout, f"message in channel {cid}")

    async def wait_for_gateway_op(self, op: int, timeout: float = 5.0, *, start: int = 0) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            return next((f for f in self.gateway_frames[start:] if f.get("op") == op), None)

        return await self.wait_for(find, timeout, f"gateway op {op}")

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ internals: state helpers
    def _store(self, record: MessageRecord) -> MessageRecord:
        self.messages[record.id] = record
        channel = self.channels.get(record.channel_id)
        if channel is not None:
            channel.last_message_id = record.id
            channel.message_count += 1
        return record

    def _resolve_reference(
        self, channel: FakeChannel, reference: MessageRecord | dict[str, Any] | int
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        if isinstance(reference, MessageRecord):
            mid, cid = reference.id, reference.channel_id
        elif isinstance(reference, dict):
            mid = int(reference["message_id"]) if reference.get("message_id") else int(reference["id"])
            cid = int(reference.get("channel_id") or channel.id)
        else:
            mid, cid = int(reference), channel.id
        target = self.messages.get(mid)
        ref = {"type": 0, "message_id": str(mid), "channel_id": str(cid)}
        if channel.guild is not None:
            ref["guild_id"] = str(channel.guild.id)
        resolved = None
        if target is not None and not target.deleted:
            resolved = copy.deepcopy(target.payload)
            resolved.pop("referenced_message", None)
        return ref, resolved

    def _apply_mentions(self, payload: dict[str, Any], channel: FakeChannel, allowed: dict[str, Any] | None) -> None:
        """Fill mentions/mention_roles/mention_everyone honouring allowed_mentions, as Discord does."""
        content = payload.get("content") or ""
        parse = allowed.get("parse", []) if allowed is not None else ["users", "roles", "everyone"]
        allowed_users = {str(u) for u in (allowed or {}).get("users", [])}
        allowed_roles = {str(r) for r in (allowed or {}).get("roles", [])}
        user_ids: list[str] = []
        for uid in re.findall(r"<@!?(\d+)>", content):
            if ("users" in parse or uid in allowed_users) and uid not in user_ids:
                user_ids.append(uid)
        ref = payload.get("referenced_message")
        if ref and (allowed is None or allowed.get("replied_user", False)):
            ruid = ref["author"]["id"]
            if ruid not in user_ids:
                user_ids.append(ruid)
        mentions = []
        for uid in user_ids:
            user = self.users.get(int(uid))
            if user is None:
                continue
            entry = user.to_payload()
            if channel.guild is not None and int(uid) in channel.guild.members:
                entry["member"] = channel.guild.members[int(uid)].to_payload(with_user=False)
            mentions.append(entry)
        roles = []
        for rid in re.findall(r"<@&(\d+)>", content):
            if ("roles" in parse or rid in allowed_roles) and rid not in roles:
                roles.append(rid)
        payload["mentions"] = mentions
        payload["mention_roles"] = roles
        payload["mention_everyone"] = "everyone" in parse and ("@everyone" in content or "@here" in content)

    def _find_command(self, name: str, cmd_type: int, guild_id: int | None) -> dict[str, Any] | None:
        scopes = [self.guild_commands.get(guild_id, [])] if guild_id else []
        scopes.append(self.global_commands)
        for scope in scopes:
            for cmd in scope:
                if cmd["name"] == name and cmd.get("type", 1) == cmd_type:
                    return cmd
        return None

    def _resolve_user(self, value: FakeUser | FakeMember, resolved: dict[str, Any]) -> None:
        user = _user_of(value)
        resolved.setdefault("users", {})[str(user.id)] = user.to_payload()
        member = value if isinstance(value, FakeMember) else None
        if member is not None:
            resolved.setdefault("members", {})[str(user.id)] = member.to_payload(with_user=False, with_permissions=True)

    def _option(
        self, name: str, value: Any, declared_type: int | None, channel: FakeChannel, resolved: dict[str, Any]
    ) -> dict[str, Any]:
        if isinstance(value, dict) and "filename" in value:
            resolved.setdefault("attachments", {})[str(value["id"])] = value
            return {"name": name, "type": 11, "value": str(value["id"])}
        if isinstance(value, FakeUser | FakeMember):
            if isinstance(value, FakeUser) and channel.guild and value.id in channel.guild.members:
                value = channel.guild.members[value.id]
            self._resolve_user(value, resolved)
            return {"name": name, "type": 6, "value": str(value.id)}
        if isinstance(value, FakeRole):
            resolved.setdefault("roles", {})[str(value.id)] = value.to_payload()
            return {"name": name, "type": 8, "value": str(value.id)}
        if isinstance(value, FakeChannel):
            resolved.setdefault("channels", {})[str(value.id)] = {
                **value.to_payload(),
                "permissions": str(_ALL_TEXT_PERMS),
            }
            return {"name": name, "type": 7, "value": str(value.id)}
        if isinstance(value, bool):
            kind = 5
        elif isinstance(value, int):
            kind = declared_type if declared_type in (4, 10) else 4
        elif isinstance(value, float):
            kind = 10
        else:
            kind = declared_type if declared_type in (3, 4, 10) else 3
        return {"name": name, "type": kind, "value": value}

    def _interaction_payload(
        self, kind: int, data: dict[str, Any], channel: FakeChannel, who: FakeMember | FakeUser
    ) -> dict[str, Any]:
        interaction_id = self.snowflake()
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": kind,
            "data": data,
            "channel_id": str(channel.id),
            "token": "fake-interaction-" + secrets.token_urlsafe(24),
            "version": 1,
            "locale": "en-US",
            "entitlements": [],
            "attachment_size_limit": self.attachment_size_limit,
        }
        if channel.guild is not None:
            guild = channel.guild
            member = who if isinstance(who, FakeMember) else guild.members[who.id]
            bot_member = guild.members[self.bot.id]
            payload.update(
                guild_id=str(guild.id),
                guild={"id": str(guild.id), "locale": "en-US", "features": []},
                guild_locale="en-US",
                member=member.to_payload(with_permissions=True),
                app_permissions=str(bot_member.permissions),
                authorizing_integration_owners={"0": str(guild.id)},
                context=0,
                channel={**channel.to_payload(), "permissions": str(member.permissions)},
            )
        else:
            user = _user_of(who)
            payload.update(
                user=user.to_payload(),
                app_permissions=str(_ALL_TEXT_PERMS),
                authorizing_integration_owners={"0": "0"},
                context=1,
                channel=channel.to_payload(),
            )
        return payload

    def _register_interaction(self, payload: dict[str, Any]) -> InteractionRecord:
        iid = int(payload["id"])
        if iid not in self.interactions:
            self.interactions[iid] = InteractionRecord(payload)
        return self.interactions[iid]

    def _interaction_by_token(self, app_id: str, token: str) -> InteractionRecord:
        if str(app_id) != str(self.application_id):
            raise ApiError(404, 10015, "Unknown Webhook")
        for record in self.interactions.values():
            if record.token == token:
                return record
        raise ApiError(404, 10015, "Unknown Webhook")

    def _channel(self, channel_id: str | int) -> FakeChannel:
        try:
            return self.channels[int(channel_id)]
        except (KeyError, ValueError):
            raise ApiError(404, 10003, "Unknown Channel") from None

    def _message(self, channel: FakeChannel, message_id: str | int) -> MessageRecord:
        try:
            record = self.messages[int(message_id)]
        except (KeyError, ValueError):
            raise ApiError(404, 10008, "Unknown Message") from None
        if record.deleted or record.channel_id != channel.id:
            raise ApiError(404, 10008, "Unknown Message")
        return record

    # ------------------------------------------------------------------ internals: message create / edit
    def _attachments_from_upload(
        self, body: dict[str, Any], files: list[UploadedFile]
    ) -> tuple[list[dict[str, Any]], list[UploadedFile]]:
        if len(files) > MAX_FILES:
            raise _form_error("files", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_FILES} or fewer in length.")
        if sum(len(f.data) for f in files) > self.attachment_size_limit:
            raise ApiError(413, 40005, "Request entity too large")
        meta = {str(a.get("id")): a for a in body.get("attachments") or [] if isinstance(a, dict)}
        out = []
        for f in files:
            m = re.fullmatch(r"files\[(\d+)\]", f.field)
            index = m.group(1) if m else f.field
            info = meta.get(index, {})
            filename = info.get("filename") or f.filename
            payload = self.add_attachment(f.data, filename, f.content_type, description=info.get("description"))
            out.append(payload)
        return out, files

    def _validate_body(self, body: dict[str, Any], files: list[UploadedFile], *, creating: bool) -> None:
        content = body.get("content")
        if content is not None and len(content) > MAX_CONTENT:
            raise _form_error("content", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_CONTENT} or fewer in length.")
        embeds = body.get("embeds") or []
        if len(embeds) > MAX_EMBEDS:
            raise _form_error("embeds", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_EMBEDS} or fewer in length.")
        if creating and not (
            content or embeds or files or body.get("sticker_ids") or body.get("poll") or body.get("components")
        ):
            raise ApiError(400, 50006, "Cannot send an empty message")

    def _create_bot_message(
        self,
        channel: FakeChannel,
        body: dict[str, Any],
        files: list[UploadedFile],
        *,
        kind: str,
        interaction: InteractionRecord | None = None,
        allow_empty: bool = False,
        extra_flags: int = 0,
    ) -> MessageRecord:
        self._validate_body(body, files, creating=not allow_empty)
        attachments, files = self._attachments_from_upload(body, files)
        reference = body.get("message_reference")
        ref_payload = ref_resolved = None
        if reference:
            ref_payload, ref_resolved = self._resolve_reference(channel, reference)
            if ref_resolved is None and reference.get("fail_if_not_exists", True):
                raise _form_error("message_reference", "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message")
        flags = (int(body.get("flags") or 0) & (EPHEMERAL | (1 << 2) | (1 << 12))) | extra_flags
        if interaction is None:
            flags &= ~EPHEMERAL
        payload = self.message_payload(
            channel,
            self.bot,
            body.get("content") or "",
            attachments,
            embeds=body.get("embeds") or [],
            allowed_mentions=None,
            flags=flags,
        )
        payload["tts"] = bool(body.get("tts", False))
        payload["components"] = body.get("components") or []
        if body.get("nonce") is not None:
            payload["nonce"] = body["nonce"]
        if ref_payload is not None:
            payload["message_reference"] = ref_payload
            payload["referenced_message"] = ref_resolved
            payload["type"] = 19
        if interaction is not None:
            payload["webhook_id"] = str(self.application_id)
            payload["application_id"] = str(self.application_id)
            ip = interaction.payload
            cmd_type = ip["data"].get("type", 1)
            payload["type"] = 23 if cmd_type in (2, 3) else 20
            user = ip["member"]["user"] if "member" in ip else ip["user"]
            payload["interaction_metadata"] = {
                "id": ip["id"],
                "type": ip["type"],
                "name": ip["data"].get("name"),
                "command_type": cmd_type,
                "user": user,
                "authorizing_integration_owners": ip.get("authorizing_integration_owners", {}),
            }
            if kind == "followup" and interaction.original is not None:
                payload["interaction_metadata"]["original_response_message_id"] = str(interaction.original.id)
            if cmd_type == 3:
                payload["interaction_metadata"]["target_message_id"] = ip["data"]["target_id"]
        allowed = body.get("allowed_mentions")
        self._apply_mentions(payload, channel, allowed)
        record = MessageRecord(
            payload,
            kind=kind,
            allowed_mentions=allowed,
            message_reference=reference,
            files=files,
            interaction_id=interaction.id if interaction else None,
        )
        return self._store(record)

    def _edit_message(self, record: MessageRecord, body: dict[str, Any], files: list[UploadedFile]) -> None:
        if record.author_id != self.bot.id and set(body) - {"flags"}:
            raise ApiError(403, 50005, "Cannot edit a message authored by another user")
        self._validate_body(body, files, creating=False)
        payload = record.payload
        for key in ("content", "embeds", "components"):
            if key in body:
                payload[key] = body[key] if body[key] is not None else ([] if key != "content" else "")
        if "attachments" in body or files:
            keep_ids = {str(a.get("id")) for a in body.get("attachments") or []}
            kept = [a for a in payload["attachments"] if "attachments" not in body or a["id"] in keep_ids]
            new, _ = self._attachments_from_upload(body, files)
            payload["attachments"] = kept + new
            record.files.extend(files)
        if "flags" in body and body["flags"] is not None:
            payload["flags"] = (payload.get("flags", 0) & EPHEMERAL) | (int(body["flags"]) & (1 << 2))
        payload["flags"] = payload.get("flags", 0) & ~LOADING
        if "allowed_mentions" in body:
            record.allowed_mentions = body["allowed_mentions"]
        channel = self.channels.get(record.channel_id)
        if channel is not None and ("content" in body or "allowed_mentions" in body):
            self._apply_mentions(payload, channel, record.allowed_mentions)
        payload["edited_timestamp"] = iso()
        record.edits.append({**body, **({"files": [f.filename for f in files]} if files else {})})

    async def _dispatch_message(self, event: str, record: MessageRecord) -> None:
        if record.ephemeral:
            return  # Discord never sends ephemeral messages over the gateway
        await self.dispatch(event, record.payload)

    # ------------------------------------------------------------------ HTTP plumbing
    async def _http_handler(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.path
        m = re.fullmatch(r"/api/v\d+(/.*)", raw_path)
        path = m.group(1) if m else raw_path
        body: Any = None
        files: list[UploadedFile] = []
        ctype = request.content_type
        if request.can_read_body:
            if ctype == "application/json":
                raw = await request.read()
                body = json.loads(raw) if raw else None
            elif ctype.startswith("multipart/"):
                reader = await request.multipart()
                async for part in reader:
                    if part.name == "payload_json":
                        body = json.loads(await part.text())
                    else:
                        data = await part.read()
                        files.append(
                            UploadedFile(
                                part.name or "",
                                part.filename or "file",
                                part.headers.get("Content-Type"),
                                bytes(data),
                            )
                        )
            else:
                await request.read()
        record = RecordedRequest(
            request.method, path, dict(request.query), body, files, dict(request.headers), time.time()
        )
        self.requests.append(record)
        try:
            response = await self._route(request, path, record)
        except ApiError as exc:
            response = exc.response()
        except Exception:
            log.exception("fake discord: handler crashed for %s %s", request.method, path)
            response = _json({"message": "500: fake discord crashed", "code": 0}, 500)
        record.status = response.status
        await self._notify()
        return response

    async def _route(self, request: web.Request, path: str, record: RecordedRequest) -> web.StreamResponse:
        method = request.method
        for fault in self._faults:
            if fault.count > 0 and fault.matches(method, path):
                fault.count -= 1
                if fault.delay:
                    await asyncio.sleep(fault.delay)
                if fault.status is not None:
                    log.info("fake discord: injected %s for %s %s", fault.status, method, path)
                    return _json(fault.body, fault.status, fault.headers)
                break
        self._faults = [f for f in self._faults if f.count > 0]

        if path.startswith("/attachments/"):
            return self._serve_attachment(path)
        if not request.path.startswith("/api/"):
            return self._unknown(method, request.path)
        if not (path.startswith("/webhooks/") or path.startswith("/interactions/")):
            if request.headers.get("Authorization") != f"Bot {self.token}":
                return _json({"message": "401: Unauthorized", "code": 0}, 401)
        for route_method, pattern, handler in self._routes:
            if route_method != method:
                continue
            match = pattern.fullmatch(path)
            if match:
                req = _Request(method, path, match.groupdict(), dict(request.query), record.json, record.files, record)
                return await handler(req)
        return self._unknown(method, path)

    def _unknown(self, method: str, path: str) -> web.Response:
        log.warning("fake discord: NO ROUTE for %s %s (add it to tests/fakes/discord_api/server.py)", method, path)
        self.unknown_routes.append(f"{method} {path}")
        return _json({"message": f"404: Not Found (fake discord has no route for {method} {path})", "code": 0}, 404)

    def _serve_attachment(self, path: str) -> web.Response:
        m = re.fullmatch(r"/attachments/(\d+)/[^/]+", path)
        stored = self._attachment_data.get(int(m.group(1))) if m else None
        if stored is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(
            body=stored.data, headers={"Content-Type": stored.content_type or "application/octet-stream"}
        )

    def _build_routes(
        self,
    ) -> list[tuple[str, re.Pattern[str], Callable[[_Request], Awaitable[web.Response]]]]:
        table: list[tuple[str, str, Callable[[_Request], Awaitable[web.Response]]]] = [
            ("GET", "/gateway", self._r_gateway),
            ("GET", "/gateway/bot", self._r_gateway_bot),
            ("GET", "/users/@me", self._r_me),
            ("GET", "/oauth2/applications/@me", self._r_application),
            ("GET", "/applications/@me", self._r_application),
            ("GET", "/users/{user_id}", self._r_user),
            ("POST", "/users/@me/channels", self._r_open_dm),
            ("GET", "/guilds/{guild_id}", self._r_guild),
            ("GET", "/guilds/{guild_id}/channels", self._r_guild_channels),
            ("GET", "/guilds/{guild_id}/members/{user_id}", self._r_guild_member),
            ("GET", "/guilds/{guild_id}/roles", self._r_guild_roles),
            ("GET", "/channels/{channel_id}", self._r_channel),
            ("GET", "/channels/{channel_id}/messages", self._r_history),
            ("POST", "/channels/{channel_id}/messages", self._r_create_message),
            ("GET", "/channels/{channel_id}/messages/{message_id}", self._r_get_message),
            ("PATCH", "/channels/{channel_id}/messages/{message_id}", self._r_edit_message),
            ("DELETE", "/channels/{channel_id}/messages/{message_id}", self._r_delete_message),
            ("POST", "/channels/{channel_id}/messages/bulk-delete", self._r_bulk_delete),
            ("POST", "/channels/{channel_id}/typing", self._r_typing),
            (
                "PUT",
                "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/{user}",
                self._r_reaction,
            ),
            (
                "DELETE",
                "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/{user}",
                self._r_reaction,
            ),
            ("POST", "/channels/{channel_id}/messages/{message_id}/threads", self._r_thread_from_message),
            ("POST", "/channels/{channel_id}/threads", self._r_thread_without_message),
            ("GET", "/applications/{app_id}/commands", self._r_get_commands),
            ("PUT", "/applications/{app_id}/commands", self._r_put_commands),
            ("POST", "/applications/{app_id}/commands", self._r_post_command),
            ("GET", "/applications/{app_id}/guilds/{guild_id}/commands", self._r_get_commands),
            ("PUT", "/applications/{app_id}/guilds/{guild_id}/commands", self._r_put_commands),
            ("POST", "/applications/{app_id}/guilds/{guild_id}/commands", self._r_post_command),
            ("DELETE", "/applications/{app_id}/commands/{command_id}", self._r_delete_command),
            (
                "DELETE",
                "/applications/{app_id}/guilds/{guild_id}/commands/{command_id}",
                self._r_delete_command,
            ),
            ("POST", "/interactions/{interaction_id}/{token}/callback", self._r_callback),
            ("GET", "/webhooks/{app_id}/{token}/messages/{message_id}", self._r_webhook_get),
            ("PATCH", "/webhooks/{app_id}/{token}/messages/{message_id}", self._r_webhook_edit),
            ("DELETE", "/webhooks/{app_id}/{token}/messages/{message_id}", self._r_webhook_delete),
            ("POST", "/webhooks/{app_id}/{token}", self._r_followup),
        ]
        compiled = []
        for method, template, handler in table:
            regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
            compiled.append((method, re.compile(regex), handler))
        return compiled

    # ------------------------------------------------------------------ REST routes
    async def _r_gateway(self, req: _Request) -> web.Response:
        return _json({"url": self.gateway_url})

    async def _r_gateway_bot(self, req: _Request) -> web.Response:
        return _json(
            {
                "url": self.gateway_url,
                "shards": self.shard_count,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 14400000,
                    "max_concurrency": 1,
                },
            }
        )

    async def _r_me(self, req: _Request) -> web.Response:
        return _json(
            {
                **self.bot.to_payload(),
                "verified": True,
                "mfa_enabled": False,
                "locale": "en-US",
                "email": None,
                "premium_type": 0,
            }
        )

    async def _r_application(self, req: _Request) -> web.Response:
        return _json(
            {
                "id": str(self.application_id),
                "name": self.bot.name,
                "icon": None,
                "description": "fake application",
                "rpc_origins": [],
                "bot_public": True,
                "bot_require_code_grant": False,
                "bot": self.bot.to_payload(),
                "owner": self.owner.to_payload(),
                "team": None,
                "verify_key": "0" * 64,
                "flags": (1 << 19) | (1 << 15),  # GATEWAY_MESSAGE_CONTENT_LIMITED, GATEWAY_GUILD_MEMBERS_LIMITED
                "summary": "",
                "tags": [],
                "redirect_uris": [],
                "interactions_endpoint_url": None,
                "approximate_guild_count": len(self.guilds),
            }
        )

    async def _r_user(self, req: _Request) -> web.Response:
        user = self.users.get(int(req.params["user_id"])) if req.params["user_id"].isdigit() else None
        if user is None:
            raise ApiError(404, 10013, "Unknown User")
        return _json(user.to_payload())

    async def _r_open_dm(self, req: _Request) -> web.Response:
        user = self.users.get(int((req.json or {}).get("recipient_id", 0)))
        if user is None:
            raise ApiError(404, 10013, "Unknown User")
        return _json(self.add_dm(user).to_payload())

    def _guild(self, guild_id: str) -> FakeGuild:
        guild = self.guilds.get(int(guild_id)) if guild_id.isdigit() else None
        if guild is None:
            raise ApiError(404, 10004, "Unknown Guild")
        return guild

    async def _r_guild(self, req: _Request) -> web.Response:
        data = self.guild_payload(self._guild(req.params["guild_id"]))
        for key in (
            "members",
            "channels",
            "threads",
            "presences",
            "voice_states",
            "joined_at",
            "large",
            "member_count",
        ):
            data.pop(key, None)
        return _json(data)

    async def _r_guild_channels(self, req: _Request) -> web.Response:
        guild = self._guild(req.params["guild_id"])
        return _json([c.to_payload() for c in guild.channels])

    async def _r_guild_roles(self, req: _Request) -> web.Response:
        return _json([r.to_payload() for r in self._guild(req.params["guild_id"]).roles])

    async def _r_guild_member(self, req: _Request) -> web.Response:
        guild = self._guild(req.params["guild_id"])
        member = guild.members.get(int(req.params["user_id"])) if req.params["user_id"].isdigit() else None
        if member is None:
            raise ApiError(404, 10007, "Unknown Member")
        return _json(member.to_payload())

    async def _r_channel(self, req: _Request) -> web.Response:
        return _json(self._channel(req.params["channel_id"]).to_payload())

    async def _r_history(self, req: _Request) -> web.Response:
        channel = self._channel(req.params["channel_id"])
        limit = min(int(req.query.get("limit", 50)), 100)
        msgs = sorted(
            (m for m in self.messages.values() if m.channel_id == channel.id and not m.deleted and not m.ephemeral),
            key=lambda m: m.id,
            reverse=True,
        )
        if "before" in req.query:
            msgs = [m for m in msgs if m.id < int(req.query["before"])]
        if "after" in req.query:
            msgs = [m for m in msgs if m.id > int(req.query["after"])]
            msgs = list(reversed(list(reversed(msgs))[:limit]))  # oldest first slice, newest-first order
        if "around" in req.query:
            around = int(req.query["around"])
            older = [m for m in msgs if m.id <= around][: (limit + 1) // 2]
            newer = [m for m in msgs if m.id > around][-(limit // 2) :] if limit // 2 else []
            msgs = newer + older
        return _json([m.payload for m in msgs[:limit]])

    async def _r_create_message(self, req: _Request) -> web.Response:
        channel = self._channel(req.params["channel_id"])
        record = self._create_bot_message(channel, req.json or {}, req.files, kind="channel")
        await self._dispatch_message("MESSAGE_CREATE", record)
        return _json(record.payload)

    async def _r_get_message(self, req: _Request) -> web.Response:
        channel = self._channel(req.params["channel_id"])
        return _json(self._message(channel, req.params["message_id"]).payload)

    async def _r_edit_message(self, req: _Request) -> web.Response:
        channel = self._channel(req.params["channel_id"])
        record = self._message(channel, req.params["message_id"])
        self._edit_message(record, req.json or {}, req.files)
        await self._dispatch_message("MESSAGE_UPDATE", record)
        return _json(record.payload)

    async def _r_delete_message(self, req: _Request) -> web.Response:
        channel = self._channel(req.params["channel_id"])
        record = self._message(channel, req.params["message_id"])
        await self.dispatch_message_delete(record)
        return _no_content()

    async def _r_bulk_delete(self, req: _Request) -> web.Response:
        channel = self._channel(req.params["channel_id"])
        records = [self._message(channel, mid) for mid in (req.json or {}).get("messages", [])]
        if records:
            await self.dispatch_message_delete_bulk(records)
        return _no_content()

    async def _r_typing(self, req: _Request) -> web.Response:
        self._channel(req.params["channel_id"])
        return _no_content()

    async def _r_reaction(self, req: _Request) -> web.Response:
        channel = self._channel(req.params["channel_id"])
        self._message(channel, req.params["message_id"])
        return _no_content()

    async def _r_thread_from_message(self, req: _Request) -> web.Response:
        channel = self._channel(req.params["channel_id"])
        record = self._message(channel, req.params["message_id"])
        thread = FakeChannel(
            record.id,
            PUBLIC_THREAD,
            (req.json or {}).get("name", "thread"),
            channel.guild,
            parent_id=channel.id,
            owner_id=self.bot.id,
        )
        assert channel.guild is not None
        channel.guild.threads.append(thread)
        self.channels[thread.id] = thread
        record.payload["thread"] = thread.to_payload()
        await self.dispatch_thread_create(thread)
        return _json(thread.to_payload())

    async def _r_thread_without_message(self, req: _Request) -> web.Response:
        channel = self._channel(req.params["channel_id"])
        body = req.json or {}
        thread = FakeChannel(
            self.snowflake(),
            int(body.get("type", PUBLIC_THREAD)),
            body.get("name", "thread"),
            channel.guild,
            parent_id=channel.id,
            owner_id=self.bot.id,
        )
        assert channel.guild is not None
        channel.guild.threads.append(thread)
        self.channels[thread.id] = thread
        await self.dispatch_thread_create(thread)
        return _json(thread.to_payload())

    # application commands
    def _command_scope(self, req: _Request) -> tuple[list[dict[str, Any]], int | None]:
        if req.params["app_id"] != str(self.application_id):
            raise ApiError(403, 50001, "Missing Access")
        if "guild_id" in req.params:
            gid = int(self._guild(req.params["guild_id"]).id)
            return self.guild_commands.setdefault(gid, []), gid
        return self.global_commands, None

    def _command_payload(self, body: dict[str, Any], existing: list[dict[str, Any]], gid: int | None) -> dict[str, Any]:
        if not isinstance(body, dict) or not body.get("name"):
            raise _form_error("name", "BASE_TYPE_REQUIRED", "This field is required")
        kind = int(body.get("type", 1))
        old = next((c for c in existing if c["name"] == body["name"] and c["type"] == kind), None)
        cmd = {
            "id": old["id"] if old else str(self.snowflake()),
            "application_id": str(self.application_id),
            "version": str(self.snowflake()),
            "type": kind,
            "name": body["name"],
            "name_localizations": body.get("name_localizations"),
            "description": body.get("description", "") if kind == 1 else "",
            "description_localizations": body.get("description_localizations"),
            "options": body.get("options", []),
            "default_member_permissions": body.get("default_member_permissions"),
            "dm_permission": body.get("dm_permission", True),
            "contexts": body.get("contexts"),
            "integration_types": body.get("integration_types", [0]),
            "nsfw": body.get("nsfw", False),
        }
        if gid is not None:
            cmd["guild_id"] = str(gid)
        return cmd

    async def _r_get_commands(self, req: _Request) -> web.Response:
        scope, _ = self._command_scope(req)
        return _json(scope)

    async def _r_put_commands(self, req: _Request) -> web.Response:
        scope, gid = self._command_scope(req)
        body = req.json or []
        seen: set[tuple[str, int]] = set()
        new = []
        for item in body:
            cmd = self._command_payload(item, scope, gid)
            key = (cmd["name"], cmd["type"])
            if key in seen:
                raise _form_error(
                    "_errors",
                    "APPLICATION_COMMANDS_DUPLICATE_NAME",
                    f"Application command names must be unique: {cmd['name']}",
                )
            seen.add(key)
            new.append(cmd)
        scope[:] = new
        return _json(new)

    async def _r_post_command(self, req: _Request) -> web.Response:
        scope, gid = self._command_scope(req)
        cmd = self._command_payload(req.json or {}, scope, gid)
        scope[:] = [c for c in scope if c["id"] != cmd["id"]] + [cmd]
        return _json(cmd, 201)

    async def _r_delete_command(self, req: _Request) -> web.Response:
        scope, _ = self._command_scope(req)
        before = len(scope)
        scope[:] = [c for c in scope if c["id"] != req.params["command_id"]]
        if len(scope) == before:
            raise ApiError(404, 10063, "Unknown application command")
        return _no_content()

    # interactions
    async def _r_callback(self, req: _Request) -> web.Response:
        try:
            record = self.interactions[int(req.params["interaction_id"])]
        except (KeyError, ValueError):
            raise ApiError(404, 10062, "Unknown interaction") from None
        if record.token != req.params["token"]:
            raise ApiError(401, 50027, "Invalid Webhook Token")
        if record.responded:
            raise ApiError(400, 40060, "Interaction has already been acknowledged.")
        body = req.json or {}
        kind = int(body.get("type", 0))
        data = body.get("data") or {}
        channel = self._channel(record.payload["channel_id"])
        message: MessageRecord | None = None
        if kind == 4:
            message = self._create_bot_message(
                channel, data, req.files, kind="interaction_original", interaction=record
            )
        elif kind == 5:
            message = self._create_bot_message(
                channel,
                {"flags": data.get("flags", 0)},
                [],
                kind="interaction_original",
                interaction=record,
                allow_empty=True,
                extra_flags=LOADING,
            )
        elif kind == 7:
            target = record.payload.get("message")
            if target is None:
                raise ApiError(400, 40060, "Interaction has no message to update")
            message = self.messages.get(int(target["id"]))
            if message is not None:
                self._edit_message(message, data, req.files)
        elif kind not in (1, 6, 8, 9, 10, 12):
            raise _form_error("type", "BASE_TYPE_CHOICES", f"Value must be one of ... (got {kind})")
        record.callbacks.append(body)
        if kind in (4, 5):
            record.original = message
        if message is not None:
            await self._dispatch_message("MESSAGE_CREATE" if kind in (4, 5) else "MESSAGE_UPDATE", message)
        if req.query.get("with_response", "").lower() not in ("1", "true"):
            return _no_content()
        answer: dict[str, Any] = {
            "interaction": {
                "id": str(record.id),
                "type": record.payload["type"],
                "response_message_loading": kind == 5,
                "response_message_ephemeral": bool(message and message.ephemeral),
            },
            "resource": {"type": kind},
        }
        if message is not None:
            answer["interaction"]["response_message_id"] = str(message.id)
            answer["resource"]["message"] = message.payload
        return _json(answer)

    def _webhook_message(self, req: _Request) -> tuple[InteractionRecord, MessageRecord]:
        record = self._interaction_by_token(req.params["app_id"], req.params["token"])
        mid = req.params["message_id"]
        if mid == "@original":
            if record.original is None or record.original.deleted:
                raise ApiError(404, 10008, "Unknown Message")
            return record, record.original
        for message in record.followups:
            if str(message.id) == mid and not message.deleted:
                return record, message
        raise ApiError(404, 10008, "Unknown Message")

    async def _r_webhook_get(self, req: _Request) -> web.Response:
        _, message = self._webhook_message(req)
        return _json(message.payload)

    async def _r_webhook_edit(self, req: _Request) -> web.Response:
        record, message = self._webhook_message(req)
        was_loading = message.loading
        self._edit_message(message, req.json or {}, req.files)
        if message is record.original:
            record.original_edits.append(req.json or {})
        if was_loading:
            message.payload["edited_timestamp"] = None  # Discord treats finishing a defer as the first post
        await self._dispatch_message("MESSAGE_UPDATE", message)
        return _json(message.payload)

    async def _r_webhook_delete(self, req: _Request) -> web.Response:
        _, message = self._webhook_message(req)
        if message.ephemeral:
            message.deleted = True
        else:
            await self.dispatch_message_delete(message)
        return _no_content()

    async def _r_followup(self, req: _Request) -> web.Response:
        record = self._interaction_by_token(req.params["app_id"], req.params["token"])
        if not record.responded:
            raise ApiError(404, 10015, "Unknown Webhook")
        channel = self._channel(record.payload["channel_id"])
        message = self._create_bot_message(channel, req.json or {}, req.files, kind="followup", interaction=record)
        record.followups.append(message)
        await self._dispatch_message("MESSAGE_CREATE", message)
        if req.query.get("wait", "").lower() in ("1", "true"):
            return _json(message.payload)
        return _no_content()

    # ------------------------------------------------------------------ gateway
    async def _ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(timeout=2.0, max_msg_size=0)
        await ws.prepare(request)
        compress = self.honour_compression and request.query.get("compress") == "zlib-stream"
        conn = _Connection(ws, compress)
        self._connections.add(conn)
        log.debug("fake gateway: connection (query=%s)", dict(request.query))
        await conn.send({"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}, "s": None, "t": None})
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await self._on_frame(conn, json.loads(msg.data))
        finally:
            self._connections.discard(conn)
            session = conn.session
            if session is not None and session.conn is conn:
                session.conn = None
                if ws.close_code in (1000, 1001) and session.valid:
                    # the client closed on purpose: Discord ends the session
                    session.valid = False
                    self._sessions.pop(session.id, None)
            await self._notify()
        return ws

    async def _on_frame(self, conn: _Connection, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        data = frame.get("d")
        redacted = copy.deepcopy(frame)
        if isinstance(redacted.get("d"), dict) and "token" in redacted["d"]:
            redacted["d"]["token"] = "<redacted>"
        self.gateway_frames.append(redacted)
        if op == 1:
            await conn.send({"op": 11, "d": None, "s": None, "t": None})
        elif op == 2:
            await self._identify(conn, data or {})
        elif op == 6:
            await self._resume(conn, data or {})
        elif op == 8:
            await self._request_members(conn, data or {})
        await self._notify()

    async def _identify(self, conn: _Connection, data: dict[str, Any]) -> None:
        if data.get("token") != self.token and data.get("token") != f"Bot {self.token}":
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        shard_id, shard_count = (data.get("shard") or [0, 1])[:2]
        session = _Session(uuid.uuid4().hex, (int(shard_id), int(shard_count)))
        self._sessions[session.id] = session
        session.conn = conn
        conn.session = session
        self.identify_count += 1
        guilds = [g for g in self.guilds.values() if (g.id >> 22) % shard_count == shard_id]
        await session.emit(
            "READY",
            {
                "v": 10,
                "user": {**self.bot.to_payload(), "verified": True, "mfa_enabled": False},
                "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
                "session_id": session.id,
                "session_type": "normal",
                "resume_gateway_url": self.gateway_url,
                "shard": [shard_id, shard_count],
                "application": {"id": str(self.application_id), "flags": (1 << 19) | (1 << 15)},
                "private_channels": [],
                "relationships": [],
                "presences": [],
                "guild_join_requests": [],
                "geo_ordered_rtc_regions": ["fake"],
                "user_settings": {},
            },
        )
        for guild in guilds:
            await session.emit("GUILD_CREATE", self.guild_payload(guild))

    async def _resume(self, conn: _Connection, data: dict[str, Any]) -> None:
        session = self._sessions.get(data.get("session_id", ""))
        if session is None or not session.valid or data.get("token") != self.token:
            await conn.send({"op": 9, "d": False, "s": None, "t": None})
            return
        seq = int(data.get("seq") or 0)
        self.resume_count += 1
        async with session.lock:
            old = session.conn
            session.conn = conn
            conn.session = session
            if old is not None and old is not conn:
                old.session = None
                await old.ws.close(code=4000)
            for frame in session.buffer:
                if frame["s"] > seq:
                    await conn.send(frame)
        await session.emit("RESUMED", {"_trace": ["fake-discord"]})

    async def _request_members(self, conn: _Connection, data: dict[str, Any]) -> None:
        guild = self.guilds.get(int(data.get("guild_id", 0)))
        if guild is None or conn.session is None:
            return
        members = list(guild.members.values())
        if data.get("user_ids"):
            wanted = {int(u) for u in data["user_ids"]}
            members = [m for m in members if m.id in wanted]
        elif data.get("query"):
            members = [m for m in members if m.name.lower().startswith(str(data["query"]).lower())]
        limit = int(data.get("limit") or 0)
        if limit:
            members = members[:limit]
        chunk: dict[str, Any] = {
            "guild_id": str(guild.id),
            "members": [m.to_payload() for m in members],
            "chunk_index": 0,
            "chunk_count": 1,
        }
        if data.get("nonce"):
            chunk["nonce"] = data["nonce"]
        await conn.session.emit("GUILD_MEMBERS_CHUNK", chunk)


_ALL_TEXT_PERMS = DEFAULT_EVERYONE_PERMISSIONS


def _user_of(who: FakeUser | FakeMember) -> FakeUser:
    return who.user if isinstance(who, FakeMember) else who


@dataclass
class DefaultWorld:
    guild: FakeGuild
    general: FakeChannel
    images: FakeChannel
    thread: FakeChannel
    moderator: FakeMember
    member: FakeMember
    dm: FakeChannel
    mod_role: FakeRole
    member_role: FakeRole

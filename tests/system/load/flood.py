"""Driving a flood of mentions at the real bot through the fake Discord, and reading back what came of it.

Shared by `tests/system/load/test_flood.py` (200 mentions, seconds) and `bench/load.py` (larger, minutes). Each
channel has one sender that posts its messages one after the other (so the channel's order is the order
the messages were sent, as in Discord); the channels send concurrently.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tests.fakes.discord_api import FakeDiscord
from tests.fakes.discord_api.models import FakeChannel, FakeGuild, FakeMember, MessageRecord, snowflake_time

BUSY_PREFIX = "the model is busy"
"""The executor's queue-full message (`model_server.errors.Busy`, its `user_message`) starts so."""
QUEUED_PREFIX = "⏳"
"""A queue-position note: shown while waiting, never a final answer."""

_MESSAGE_EDIT = re.compile(r"/channels/\d+/messages/(\d+)")

QUESTIONS = ("what do you think about this?", "tell me something nice", "how are you today?",
             "describe a sunset", "what is two plus two?", "name a colour")


@dataclass
class FloodWorld:
    guild: FakeGuild
    channels: list[FakeChannel]
    users: list[FakeMember]


def build_flood_world(fake: FakeDiscord, channels: int, users: int) -> FloodWorld:
    """A guild with `channels` text channels and `users` members (add before the bot connects)."""
    guild = fake.add_guild("Load Guild")
    return FloodWorld(
        guild=guild,
        channels=[fake.add_text_channel(guild, f"load-{n}") for n in range(channels)],
        users=[fake.add_member(guild, f"user-{n}") for n in range(users)],
    )


async def send_flood(fake: FakeDiscord, world: FloodWorld, count: int, *, rate_per_s: float | None = None,
                     tag: str = "") -> list[MessageRecord]:
    """Send `count` mentions round-robin over the channels (and users), at `rate_per_s` overall (None: as
    fast as the fake takes them). Returns them in sending order."""
    channels = world.channels
    sent: list[MessageRecord | None] = [None] * count
    started = time.monotonic()

    async def sender(c: int) -> None:
        for i in range(c, count, len(channels)):
            if rate_per_s:
                await asyncio.sleep(max(0.0, started + i / rate_per_s - time.monotonic()))
            user = world.users[i % len(world.users)]
            sent[i] = await fake.send_message_as(user, channels[c], f"{QUESTIONS[i % len(QUESTIONS)]} {tag}#{i}",
                                                 mentions_bot=True)

    await asyncio.gather(*(sender(c) for c in range(len(channels))))
    return [m for m in sent if m is not None]


def replies_to(fake: FakeDiscord, asked: Sequence[MessageRecord]) -> dict[int, list[MessageRecord]]:
    """For each asked message id, the bot's (not deleted) messages that reply to it."""
    wanted = {m.id: [] for m in asked}  # type: dict[int, list[MessageRecord]]
    for message in fake.sent_messages():
        ref = message.message_reference
        if ref and int(ref["message_id"]) in wanted:
            wanted[int(ref["message_id"])].append(message)
    return wanted


def all_final(fake: FakeDiscord, asked: Sequence[MessageRecord]) -> bool:
    """Every asked message has a reply that is no longer a queue note."""
    return all(any(not r.content.startswith(QUEUED_PREFIX) for r in rs) for rs in replies_to(fake, asked).values())


@dataclass
class FloodOutcome:
    answered: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    other: dict[int, str] = field(default_factory=dict)
    """Replied, but neither an answer nor the busy message: the text of each."""
    lost: list[int] = field(default_factory=list)
    duplicated: list[int] = field(default_factory=list)
    out_of_order: list[int] = field(default_factory=list)
    """Channels whose replies were not created in the order their messages were sent."""
    latencies_s: list[float] = field(default_factory=list)
    """Answered messages: mention sent -> the reply's final content arrived at Discord."""


def judge(fake: FakeDiscord, asked: Sequence[MessageRecord], *, other_texts: Sequence[str] = ()) -> FloodOutcome:
    """Classify every asked message by the bot's reply to it; `other_texts` are known short failure messages
    (counted in `other`, as every reply that is neither an answer nor the busy message)."""
    outcome = FloodOutcome()
    replies = replies_to(fake, asked)
    last_edit: dict[int, float] = {}
    for request in fake.requests:
        edited = _MESSAGE_EDIT.fullmatch(request.path) if request.method == "PATCH" else None
        if edited:
            last_edit[int(edited[1])] = request.time
    for message in asked:
        got = replies[message.id]
        if not got:
            outcome.lost.append(message.id)
            continue
        if len(got) > 1:
            outcome.duplicated.append(message.id)
        reply = got[0]
        text = reply.content
        if text.startswith(BUSY_PREFIX):
            outcome.refused.append(message.id)
        elif text.startswith(QUEUED_PREFIX) or text in other_texts:
            outcome.other[message.id] = text
        else:
            outcome.answered.append(message.id)
            done = max(snowflake_time(reply.id).timestamp(), last_edit.get(reply.id, 0.0))
            outcome.latencies_s.append(done - snowflake_time(message.id).timestamp())
    by_channel: dict[int, list[MessageRecord]] = {}
    for message in asked:
        by_channel.setdefault(message.channel_id, []).append(message)
    answered = set(outcome.answered)
    for channel_id, messages in by_channel.items():
        # Snowflakes grow with creation: sorting the replies by id gives the order they were posted in. Only
        # answers count: a refusal is sent at once, ahead of the answers still in the channel's line.
        posted = sorted((r for m in messages if m.id in answered for r in replies[m.id]), key=lambda r: r.id)
        order = [int(r.message_reference["message_id"]) for r in posted]
        if order != sorted(order):
            outcome.out_of_order.append(channel_id)
    return outcome


class QueueSampler:
    """Samples `executor.stats().queue_length` from a thread of its own (so a busy event loop cannot make it
    miss a peak) every `interval_s`; `peak` is the longest queue seen."""

    def __init__(self, executor, interval_s: float = 0.001) -> None:
        self.executor = executor
        self.interval_s = interval_s
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-sampler", daemon=True)

    def __enter__(self) -> QueueSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.executor.stats().queue_length)
            self.samples += 1
            self._stop.wait(self.interval_s)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q` quantile (0..1) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))
    return ordered[index]

"""A flood of mentions at the real bot (fake Discord, tiny model, SQLite): nothing lost, nothing left behind.

200 mentions over 20 channels, sent as fast as the fake Discord takes them, to a bot whose executor queue
holds only 8 waiting requests: every message gets exactly one reply, an answer or the busy message; each
channel's replies come in the order its messages were sent; the queue never passes its bound; a second
flood leaves the objects (and, coarsely, the memory) where the first left them; closing the bot leaves no task behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
from collections import Counter
from pathlib import Path
from typing import Any

from bot.discord_app.client import IdeficsBot
from bot.settings import Settings
from tests.bot.discord_app.conftest import eventually, open_test_services
from tests.fakes.discord_api import FakeDiscord
from tests.system.load.flood import QueueSampler, all_final, build_flood_world, judge, send_flood

CHANNELS = 20
MESSAGES = 200
MAX_QUEUE = 4
"""With one request per channel in the executor at a time (the channel lock), 20 channels against 4 running
and 4 waiting must overflow: some requests are refused, which is what this test is about."""
MAX_BATCH = 4

MESSAGE_CACHE = 100
"""discord.py's message cache (a bounded deque; 1000 by default) sized so that the first flood fills it."""

RSS_GROWTH_BOUND = 128 * 1024 * 1024
"""Bytes of resident memory the second flood may add. Coarse on purpose: glibc keeps freed arenas of the
model, SQLite and aiohttp threads, and the fake Discord in this process keeps every message and request
(a few MB a flood), so a few tens of MB move from run to run. A leak of what a request holds on the model
side (tensors, a prompt's images) would pass it; the object census below is the precise check."""

TRACKED_MODULES = ("bot.", "model_server.", "storage.", "asyncio.", "discord.", "sqlalchemy.orm.")
"""Objects of these modules are counted after each flood: requests, jobs, handles, sinks, tasks, futures,
locks, queues, discord.py messages, ORM objects. After the first flood has warmed every bounded cache
(discord.py's messages, SQLAlchemy's statements, the executor's last 200 latencies and 1000 batch records),
their numbers must not grow with another 200 requests."""
CENSUS_SLACK = 50
"""Objects per type the second flood may add: bounded caches that the first flood did not quite fill."""


def flood_settings(tmp_path: Path, model: str) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        discord_token="fake-discord-token",
        idefics_model=model,
        idefics_device="cpu",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'flood.sqlite3'}",
        max_new_tokens=4,
        stream_edit_interval_s=0.2,
        batch_window_ms=5,
        # High enough that the per-user limiter never refuses: the executor's queue is what is tested.
        user_max_inflight=MESSAGES,
        user_max_per_minute=MESSAGES * 4,
    )


async def flood_once(fake: FakeDiscord, bot: IdeficsBot, world: Any, tag: str) -> Any:
    asked = await send_flood(fake, world, MESSAGES, tag=tag)
    # Polled, not `fake.wait_for`: that re-checks on every request the fake serves, and scanning every
    # message that often would load the event loop more than the bot does.
    await eventually(lambda: bot.tasks_running == 0 and all_final(fake, asked), 90, f"flood {tag} answered")
    return asked


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def census() -> Counter[str]:
    """Live objects per type, for the types of `TRACKED_MODULES`."""
    gc.collect()
    counts: Counter[str] = Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        module = getattr(kind, "__module__", None)
        if not isinstance(module, str):
            continue
        if not module.startswith(TRACKED_MODULES):
            continue
        # asyncio keeps a cancelled timer in its heap until its deadline passes (or cancelled ones are the
        # majority): how many linger depends on timing, not on anything a request leaves behind.
        if isinstance(obj, asyncio.TimerHandle) and obj.cancelled():
            continue
        counts[f"{module}.{kind.__qualname__}"] += 1
    return counts


async def test_flood_of_mentions(tmp_path: Path, engine: Any, model_config: Any, loaded_model: Any) -> None:
    settings = flood_settings(tmp_path, model_config.model)
    config = dataclasses.replace(model_config, max_queue=MAX_QUEUE, max_batch_size=MAX_BATCH)
    async with FakeDiscord() as fake:
        world = build_flood_world(fake, CHANNELS, users=CHANNELS)
        with fake.patch_discord():
            async with open_test_services(settings, engine, config, loaded_model) as services:
                store = services.conversation.store
                bot = IdeficsBot(services, guild_ready_timeout=0.01, max_messages=MESSAGE_CACHE)
                async with fake.running(bot):
                    with QueueSampler(services.executor) as sampler:
                        first = await flood_once(fake, bot, world, "a")
                        objects_before, rss_before = census(), rss_bytes()
                        second = await flood_once(fake, bot, world, "b")
                        objects_after, rss_after = census(), rss_bytes()
                    for asked in (first, second):
                        outcome = judge(fake, asked)
                        assert not outcome.lost and not outcome.duplicated and not outcome.other, outcome
                        assert len(outcome.answered) + len(outcome.refused) == MESSAGES
                        assert outcome.answered and outcome.refused, "the flood should overflow the queue"
                        assert not outcome.out_of_order
                    assert sampler.samples > 100 and 0 < sampler.peak <= MAX_QUEUE
                    # The executor keeps its last batch records (for /status) in a ring of fixed size:
                    # they may grow until the ring is full, never past it.
                    ring = services.executor.batches
                    bounded = {"model_server.backend.BatchRecord": ring.maxlen or 0}
                    grown = {kind: objects_after[kind] - objects_before[kind] for kind in objects_after
                             if objects_after[kind] - objects_before[kind] > CENSUS_SLACK
                             and objects_after[kind] > bounded.get(kind, -1)}
                    assert not grown, f"objects that grow with every request: {grown}"
                    assert rss_after - rss_before < RSS_GROWTH_BOUND, f"RSS grew {rss_after - rss_before} bytes"
                    # Nothing lost on the storage side either: every message stored, each request closed.
                    for asked in (first, second):
                        for message in asked:
                            stored = await store.get_message(str(message.id))
                            assert stored is not None and stored.request_state in ("answered", "failed")
                    assert services.executor.stats().queue_length == 0
                assert bot.tasks_running == 0
                assert not bot._ingest_tail
                assert not services.conversation._locks
                assert not bot.limiter._inflight
    # The bot, its services and the fake are closed: only this test's task is left.
    await asyncio.sleep(0)
    assert asyncio.all_tasks() == {asyncio.current_task()}

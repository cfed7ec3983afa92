"""Per-user fairness: how many requests one user may have running, and how many they may start a minute.

One person must not be able to fill the model's queue for everyone else. The limits are kept in memory:
they protect a running bot from bursts, and a restart forgetting them is harmless.

They are per process. With the shards split over several processes (`DISCORD_SHARD_IDS`), a user counts
separately in each process that receives their messages: one process serves DMs (shard 0) and each guild
lives on one shard, so someone active in guilds on k processes may have k times the limits. Each process
still protects its own queue; a limit shared by all would need the database on every message.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Iterator

from bot.errors import RateLimited

WINDOW_S = 60.0
"""Length of the sliding window `per_minute` counts over."""


class UserLimiter:
    """`with limiter.acquire(user_id): ...` around one request; raises `RateLimited` when over a limit."""

    def __init__(self, max_inflight: int, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_inflight < 1 or per_minute < 1:
            raise ValueError("limits must be at least 1")
        self.max_inflight = max_inflight
        self.per_minute = per_minute
        self._clock = clock
        self._inflight: dict[str, int] = {}
        self._started: dict[str, deque[float]] = {}

    def acquire(self, user_id: str) -> contextlib.AbstractContextManager[None]:
        """Take a slot now (raising `RateLimited` if there is none); the returned context gives it back.

        The check happens at the call, not at `__enter__`, so a refused request never holds a slot.
        """
        now = self._clock()
        running = self._inflight.get(user_id, 0)
        if running >= self.max_inflight:
            noun = "request" if running == 1 else "requests"
            raise RateLimited(f"you have {running} {noun} running; wait for them to finish",
                              detail=f"user {user_id}: {running} in flight")
        started = self._started.setdefault(user_id, deque())
        while started and started[0] <= now - WINDOW_S:
            started.popleft()
        if len(started) >= self.per_minute:
            wait = max(1, math.ceil(started[0] + WINDOW_S - now))
            raise RateLimited(f"you sent too many requests; try again in {wait} s", retry_after_s=wait,
                              detail=f"user {user_id}: {len(started)} in the last minute")
        started.append(now)
        self._inflight[user_id] = running + 1
        return self._release_on_exit(user_id)

    def inflight(self, user_id: str) -> int:
        return self._inflight.get(user_id, 0)

    @contextlib.contextmanager
    def _release_on_exit(self, user_id: str) -> Iterator[None]:
        try:
            yield
        finally:
            left = self._inflight.get(user_id, 1) - 1
            if left > 0:
                self._inflight[user_id] = left
            else:
                # Dropped rather than kept at 0: the map must not grow with every user ever seen.
                self._inflight.pop(user_id, None)
                started = self._started.get(user_id)
                if started is not None and (not started or started[-1] <= self._clock() - WINDOW_S):
                    del self._started[user_id]

"""The model thread's watchdog: declares it stuck when a running batch makes no progress for too long.

Each batch start, decode step and finished row counts as progress (`beat`). A running batch silent for
`limit_s` is declared stuck: `declare_stuck` (called with the executor's lock held) hands back every running
and waiting request, which then fail at once (`fail_stuck`), and `stuck_since` says so until the model thread
comes back (`recovered`). Still silent at twice the limit, `on_fatal` is called once, so the process can exit
and be restarted. An idle executor is never stuck.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Watchdog(Generic[T]):
    """Watches one model thread; `start()` runs the check on its own daemon thread."""

    def __init__(self, limit_s: float, lock: threading.Condition, *, busy: Callable[[], bool],
                 declare_stuck: Callable[[], Sequence[T]], fail_stuck: Callable[[Sequence[T], float], None],
                 on_fatal: Callable[[str], None]) -> None:
        self.limit_s = limit_s
        self._lock = lock
        self._busy = busy
        self._declare_stuck = declare_stuck
        self._fail_stuck = fail_stuck
        self._on_fatal = on_fatal
        self.progress_at = time.monotonic()
        """Last sign of life of the model thread (batch start, decode step, finished row)."""
        self.stuck_since: float | None = None
        """`progress_at` when the model thread was declared stuck; None when healthy."""
        self._fatal_called = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self.progress_at = time.monotonic()

    def start(self) -> None:
        if self.limit_s > 0:
            self._thread = threading.Thread(target=self._watch, name="model-watchdog", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def fault(self) -> str | None:
        """"model thread stuck for 130 s" while declared stuck, else None."""
        stuck = self.stuck_since
        return None if stuck is None else f"model thread stuck for {time.monotonic() - stuck:.0f} s"

    def recovered(self) -> float | None:
        """With the lock held, when the model thread came back: clear the fault; how long it was stuck (or None)."""
        stuck, self.stuck_since = self.stuck_since, None
        return None if stuck is None else time.monotonic() - stuck

    def _watch(self) -> None:
        interval = min(1.0, max(0.01, self.limit_s / 10))
        while not self._stop.wait(interval):
            try:
                self.check(time.monotonic())
            except Exception:  # the watchdog must outlive its own bugs
                log.exception("watchdog check failed")

    def check(self, now: float) -> None:
        """Declare the model thread stuck, or past the second deadline call `on_fatal`; idle is never stuck."""
        limit = self.limit_s
        victims: Sequence[T] = ()
        fatal = False
        with self._lock:
            silent = now - self.progress_at
            if not self._busy() or silent <= limit:
                return
            if self.stuck_since is None:
                self.stuck_since = self.progress_at
                victims = self._declare_stuck()
            elif silent > 2 * limit and not self._fatal_called:
                self._fatal_called = fatal = True
        if victims:
            self._fail_stuck(victims, silent)
        if fatal:
            self._on_fatal(f"model thread stuck for {silent:.0f} s (watchdog {limit:g} s)")

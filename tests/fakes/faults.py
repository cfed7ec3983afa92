"""Faults injected at the model call, shared by the executor, watchdog, replica and metrics tests."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def stuck_forward(engine: Any, *, longest_s: float = 30.0) -> Iterator[threading.Event]:
    """Every model call of `engine` blocks until the returned event is set (at the latest when the block ends)."""
    gate = threading.Event()
    original = engine.forward

    def blocked(**kwargs: Any) -> Any:
        gate.wait(longest_s)
        return original(**kwargs)

    engine.forward = blocked
    try:
        yield gate
    finally:
        gate.set()
        engine.forward = original

"""Retrying a write transaction that met a locked database (SQLite's "database is locked").

SQLite has one writer at a time. A connection that wants to write waits for the lock up to its busy
timeout (`open_database(busy_timeout_ms=...)`), then fails with `OperationalError: database is locked`.
A few more attempts with a growing pause ride out a long writer (a backup, a migration, another
process); past them the caller gets `DatabaseBusy`, whose user message is short. Only lock errors are
retried: any other error is a bug or a broken database, and retrying would only hide it.

PostgreSQL restarts (connection lost mid-run) are not handled here yet: see the PostgreSQL issue.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, Protocol, TypeVar

from sqlalchemy.exc import OperationalError

from storage.errors import DatabaseBusy

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_LOCK_WORDS = ("database is locked", "database table is locked", "database schema is locked", "busy")


def is_lock_error(exc: BaseException) -> bool:
    """True for a driver's "the database is locked / busy" error, the only kind worth retrying."""
    if not isinstance(exc, OperationalError):
        return False
    text = str(exc.orig if exc.orig is not None else exc).lower()
    return any(word in text for word in _LOCK_WORDS)


class LockRetryPolicy(Protocol):
    lock_retries: int
    """Attempts after the first one."""
    lock_backoff_s: float
    """Pause before the first retry; doubled before each next one."""


def retry_when_locked(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Run `method` (a whole transaction of a `Store`) again when the database was locked.

    Each attempt opens its own session, so a failed one has rolled back before the next starts. Logs
    carry the method's name and the id it was called with (a platform id, channel key or author id),
    never message text.
    """

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        policy: LockRetryPolicy = args[0]  # type: ignore[assignment]
        attempt = 0
        while True:
            try:
                return await method(*args, **kwargs)
            except OperationalError as exc:
                if not is_lock_error(exc):
                    raise
                what = f"{method.__name__}({_ident(args[1:])})"
                if attempt >= policy.lock_retries:
                    log.error("%s: database still locked after %d attempts, giving up", what, attempt + 1)
                    raise DatabaseBusy(f"{what}: database locked after {attempt + 1} attempts") from exc
                pause = policy.lock_backoff_s * 2**attempt
                attempt += 1
                log.warning("%s: database locked (attempt %d of %d), retrying in %.2f s", what, attempt,
                            policy.lock_retries + 1, pause)
                await asyncio.sleep(pause)

    return wrapper


def _ident(args: tuple[Any, ...]) -> str:
    if not args:
        return ""
    first = args[0]
    if hasattr(first, "platform_id"):
        return f"platform_id={first.platform_id}"
    if isinstance(first, str):
        return first
    if isinstance(first, list | tuple):
        return f"{len(first)} ids"
    return type(first).__name__

"""Retrying a transaction that met a locked database (SQLite) or lost its connection (a PostgreSQL restart).

Locked (`retry_when_locked`). SQLite has one writer at a time. A connection that wants to write waits for
the lock up to its busy timeout (`open_database(busy_timeout_ms=...)`), then fails with
`OperationalError: database is locked`. A few more attempts with a growing pause ride out a long writer
(a backup, a migration, another process); past them the caller gets `DatabaseBusy`, whose user message
is short. Only lock errors are retried: any other error is a bug or a broken database, and retrying would
only hide it.

Disconnected (`retry_when_disconnected`). A database server that stops or restarts ends every open
connection; while it is down, new ones are refused, and while it starts they are told "the database
system is starting up". The engine's `pool_pre_ping` replaces dead pooled connections once the server is
back; what is left to handle is the transaction that was running at that moment, or that started while the
server was down. Those connection errors (`is_connection_error`) become `DatabaseUnavailable` with a
short user message, after a short bounded retry (a restart takes a second or two):

- a read is run once more;
- a write is run again only when it certainly did not commit: the connection was lost before the COMMIT
  was sent (PostgreSQL commits nothing before it). Lost during the COMMIT (`CommitInDoubt`), it may or
  may not have committed; it is run again only if re-running it changes nothing and returns the same
  (`kind="idempotent"`: an append is keyed by its platform id with `ON CONFLICT DO NOTHING`, an UPDATE
  that sets fixed values). Otherwise (a compare-and-set, a count of deleted rows) the caller is told.

Every attempt opens its own session, so a failed one has rolled back (or died with its connection)
before the next starts.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal, ParamSpec, Protocol, TypeVar

from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError

from storage.errors import UNREACHABLE_MESSAGE, DatabaseBusy, DatabaseUnavailable

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_LOCK_WORDS = ("database is locked", "database table is locked", "database schema is locked", "busy")

# SQLSTATEs of a lost or refused connection: class 08 (connection exception), and the server shutting
# down (57P01 admin, 57P02 crash) or not yet accepting connections (57P03 "starting up").
_CONNECTION_SQLSTATE_CLASS = "08"
_SHUTDOWN_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})


def is_lock_error(exc: BaseException) -> bool:
    """True for a driver's "the database is locked / busy" error, the only kind worth retrying."""
    if not isinstance(exc, OperationalError):
        return False
    text = str(exc.orig if exc.orig is not None else exc).lower()
    return any(word in text for word in _LOCK_WORDS)


def is_connection_error(exc: BaseException) -> bool:
    """True when the connection to the database server was lost or refused, not when a statement failed.

    - `OSError` (refused, reset, timed out): the driver could not even connect; SQLAlchemy passes the
      socket error through as it is.
    - a DBAPI error that SQLAlchemy judged a disconnect (`connection_invalidated`), e.g. asyncpg's
      `ConnectionDoesNotExistError` or "the underlying connection is closed";
    - a DBAPI error whose SQLSTATE says connection failure or server shutdown/start-up, e.g. asyncpg's
      `CannotConnectNowError` raised while connecting (there is no connection to invalidate yet).
    """
    if isinstance(exc, CommitInDoubt):
        return True
    if isinstance(exc, OSError | DisconnectionError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    sqlstate = _sqlstate(exc)
    return sqlstate is not None and (sqlstate.startswith(_CONNECTION_SQLSTATE_CLASS) or sqlstate in _SHUTDOWN_SQLSTATES)


def _sqlstate(exc: DBAPIError) -> str | None:
    # SQLAlchemy's asyncpg adapter copies the server's code onto the DBAPI error it raises (`orig`).
    code = getattr(exc.orig, "sqlstate", None)
    return code if isinstance(code, str) else None


class CommitInDoubt(Exception):
    """The connection was lost while the COMMIT was in flight: the transaction may or may not have committed.

    Raised by `commit()` (from the driver's error), seen only by `retry_when_disconnected`, which turns it
    into a retry or a `DatabaseUnavailable`.
    """


async def commit(session: Any) -> None:
    """`session.commit()`, telling a connection lost during the COMMIT (`CommitInDoubt`) from one lost before."""
    try:
        await session.commit()
    except Exception as exc:
        if is_connection_error(exc):
            raise CommitInDoubt(f"connection lost during COMMIT: {type(exc).__name__}") from exc
        raise


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
                    raise DatabaseBusy(detail=f"{what}: database locked after {attempt + 1} attempts") from exc
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


class ReconnectPolicy(Protocol):
    reconnect_retries: int
    """Attempts after the first for a write whose connection was lost (a read gets one at most)."""
    reconnect_backoff_s: float
    """Pause before the first retry; doubled before each next one."""


TransactionKind = Literal["read", "write", "idempotent"]


def retry_when_disconnected(kind: TransactionKind) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Run `method` (a whole transaction of a `Store`) again when its connection was lost; then `DatabaseUnavailable`.

    `kind`: "read" is run once more at most; "write" `reconnect_retries` more times, but only while it
    certainly did not commit; "idempotent" (a write that may safely run twice and returns the same) also
    after a connection lost during its COMMIT. Logs carry the method's name, the id it was called with and
    the error's type, never the error's text (SQLAlchemy's names the statement's parameters: message text).
    """

    def decorate(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(method)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            policy: ReconnectPolicy = args[0]  # type: ignore[assignment]
            retries = min(1, policy.reconnect_retries) if kind == "read" else policy.reconnect_retries
            attempt = 0
            while True:
                try:
                    return await method(*args, **kwargs)
                except Exception as exc:
                    if not is_connection_error(exc):
                        raise
                    what = f"{method.__name__}({_ident(args[1:])})"
                    cause = exc.__cause__ if isinstance(exc, CommitInDoubt) else exc
                    reason = type(cause).__name__
                    in_doubt = isinstance(exc, CommitInDoubt) and kind != "idempotent"
                    if in_doubt or attempt >= retries:
                        why = "its commit is in doubt" if in_doubt else f"after {attempt + 1} attempts"
                        log.error("%s: database connection lost (%s), giving up: %s", what, reason, why)
                        raise DatabaseUnavailable(UNREACHABLE_MESSAGE,
                                                  detail=f"{what}: database connection lost ({reason}), {why}") from exc
                    pause = policy.reconnect_backoff_s * 2**attempt
                    attempt += 1
                    log.warning("%s: database connection lost (%s; attempt %d of %d), retrying in %.2f s", what,
                                reason, attempt, retries + 1, pause)
                    await asyncio.sleep(pause)

        return wrapper

    return decorate

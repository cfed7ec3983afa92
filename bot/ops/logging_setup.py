"""Keeping secrets and message text out of the logs, whatever the level.

Our own code logs ids, sizes and timings. discord.py, at DEBUG, logs whole payloads: every gateway event
(message contents, interaction options) and every REST body it sends (our answers). `install_log_redaction`
installs a log record factory, so it sees every record of every logger before any handler does, that

- replaces the bot token (and any other secret given) wherever it appears, with `[redacted]`;
- turns the payload-carrying debug records of discord.py (gateway events, REST bodies) and aiosqlite (SQL
  parameters) into summaries: the event's op, type and sequence, a body's size, the called function's name.

`idefics-bot run` installs it once the token is read: `install_log_redaction([token])`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

REDACTED = "[redacted]"

_GATEWAY_EVENT = "For Shard ID %s: WebSocket Event: %s"
_HTTP_SENT = "%s %s with %s has returned %s"
_HTTP_RECEIVED = "%s %s has received %s"
_SQLITE_CALLS = frozenset({"executing %s", "operation %s completed"})
"""aiosqlite, at DEBUG, logs each call with its arguments: SQL parameters, which hold message text."""

_installed: tuple[Callable[..., logging.LogRecord], Callable[..., logging.LogRecord]] | None = None
"""(the factory we replaced, ours), while installed."""


def _size(value: Any) -> str:
    if value is None:
        return "no body"
    try:
        return f"<{len(value)} {'chars' if isinstance(value, str) else 'items'}>"
    except TypeError:
        return f"<{type(value).__name__}>"


def _event_summary(event: Any) -> str:
    if isinstance(event, dict):
        return f"<op={event.get('op')} t={event.get('t')} s={event.get('s')}>"
    return _size(event)


def summarise_payloads(record: logging.LogRecord) -> None:
    """Replace the payload argument of discord.py's and aiosqlite's payload-carrying debug records by a summary."""
    args = record.args
    if not isinstance(args, tuple):
        return
    if record.name == "aiosqlite" and record.msg in _SQLITE_CALLS and len(args) == 1:
        function = getattr(args[0], "func", args[0])  # a functools.partial around the cursor call
        record.args = (f"<{getattr(function, '__qualname__', type(function).__name__)}>",)
        return
    if not record.name.startswith("discord."):
        return
    if record.msg == _GATEWAY_EVENT and len(args) == 2:
        record.args = (args[0], _event_summary(args[1]))
    elif record.msg == _HTTP_SENT and len(args) == 4:
        record.args = (args[0], args[1], _size(args[2]), args[3])
    elif record.msg == _HTTP_RECEIVED and len(args) == 3:
        record.args = (args[0], args[1], _size(args[2]))


def redact_secrets(record: logging.LogRecord, secrets: Iterable[str]) -> None:
    """If a secret appears in the record's message, arguments or traceback text, format and redact it."""
    secrets = [s for s in secrets if s]
    if not secrets:
        return
    try:
        message = record.getMessage()
    except Exception:  # a record whose arguments do not fit its format: keep it, without the arguments
        message = f"{record.msg!s} (arguments not shown)"
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    exc_text = record.exc_text or ""
    if not any(s in message or s in exc_text or s in str(record.msg) for s in secrets):
        return
    for secret in secrets:
        message = message.replace(secret, REDACTED)
        exc_text = exc_text.replace(secret, REDACTED)
    record.msg, record.args = message, None
    if record.exc_text:
        record.exc_text = exc_text


def install_log_redaction(secrets: Iterable[str]) -> None:
    """Install (or re-install with new secrets) the record factory described above; idempotent."""
    global _installed
    kept = tuple(s for s in secrets if s)
    previous = _installed[0] if _installed is not None else logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        summarise_payloads(record)
        redact_secrets(record, kept)
        return record

    logging.setLogRecordFactory(factory)
    _installed = (previous, factory)


def uninstall_log_redaction() -> None:
    """Put back the record factory that was there before (tests)."""
    global _installed
    if _installed is not None and logging.getLogRecordFactory() is _installed[1]:
        logging.setLogRecordFactory(_installed[0])
    _installed = None

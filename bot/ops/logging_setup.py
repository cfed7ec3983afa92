"""Keeping secrets and message text out of the logs, whatever the level.

Our own code logs ids, sizes and timings. discord.py, at DEBUG, logs whole payloads: every gateway event
(message contents, interaction options) and every REST body it sends (our answers). `install_log_redaction`
installs a log record factory, so it sees every record of every logger before any handler does, that

- replaces the bot token (and any other secret given) wherever it appears, with `[redacted]`;
- replaces every token that is a segment of a URL path, whoever logs it and at whatever level: interaction
  tokens (`/interactions/{id}/{token}/callback`) and webhook tokens (`/webhooks/{id}/{token}/...`, which is how
  followups and edits of an interaction's messages travel). discord.py's webhook and HTTP loggers write those
  URLs at DEBUG, and such a token lets anyone answer as the bot for 15 minutes;
- turns the payload-carrying debug records of discord.py (gateway events, REST bodies) and aiosqlite (SQL
  parameters) into summaries: the event's op, type and sequence, a body's size, the called function's name.

`idefics-bot run` installs it once the token is read: `install_log_redaction([token])`. A record factory rather
than a handler's filter or formatter: it is in place for every logger and every handler, also those added later.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

REDACTED = "[redacted]"

_GATEWAY_EVENT = "For Shard ID %s: WebSocket Event: %s"
_HTTP_SENT = "%s %s with %s has returned %s"
_HTTP_RECEIVED = "%s %s has received %s"
_SQLITE_CALLS = frozenset({"executing %s", "operation %s completed"})
"""aiosqlite, at DEBUG, logs each call with its arguments: SQL parameters, which hold message text."""

_URL_TOKEN = re.compile(r"(/(?:interactions|webhooks)/\d+/)(?!\[redacted\])[^/?#\s'\"]+")
"""The token segment of an interaction callback or webhook URL (the number before it is an id, not a secret)."""
_URL_MARKS = ("/interactions/", "/webhooks/")

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


def redact_url_tokens(text: str) -> str:
    """`text` with the token segment of every interaction or webhook URL path replaced by `[redacted]`."""
    return _URL_TOKEN.sub(r"\1" + REDACTED, text) if any(m in text for m in _URL_MARKS) else text


def _may_hold_url(record: logging.LogRecord) -> bool:
    """Whether the record's message, arguments or exception mention an interaction or webhook URL."""
    args = record.args if isinstance(record.args, tuple) else (record.args,) if record.args else ()
    try:
        pieces = [str(record.msg), *(str(a) for a in args)]
        if record.exc_info:
            pieces.append(str(record.exc_info[1]))
    except Exception:  # an argument that cannot be shown: the handler's own formatting reports it
        return False
    pieces.append(record.exc_text or "")
    return any(m in p for p in pieces for m in _URL_MARKS)


def redact_secrets(record: logging.LogRecord, secrets: Iterable[str]) -> None:
    """If a secret or a URL token appears in the record's message, arguments or traceback text, format and
    redact it."""
    secrets = [s for s in secrets if s]
    urls = _may_hold_url(record)
    if not secrets and not urls:
        return
    try:
        message = record.getMessage()
    except Exception:  # a record whose arguments do not fit its format: keep it, without the arguments
        message = f"{record.msg!s} (arguments not shown)"
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    exc_text = record.exc_text or ""
    if not urls and not any(s in message or s in exc_text or s in str(record.msg) for s in secrets):
        return
    for secret in secrets:
        message = message.replace(secret, REDACTED)
        exc_text = exc_text.replace(secret, REDACTED)
    message, exc_text = redact_url_tokens(message), redact_url_tokens(exc_text)
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

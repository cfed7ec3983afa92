"""`LOG_FORMAT`: the log line format, `text` (the default, for people) or `json` (one object per line, for collectors).

A JSON line holds `time` (UTC, ISO 8601), `level`, `logger`, `message`, `exception` (the traceback, when there is
one) and the record's extra fields (`log.info(..., extra={"request": 12})`). Redaction (`bot.ops.logging_setup`)
still applies: the message and traceback are redacted when the record is made, and the extra fields, which
`logging` attaches after that, are redacted here through the same record factory, so a secret never reaches a
JSON line either.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]

_STANDARD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
"""Attributes every record has: whatever else a record carries came from `extra=`."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD_FIELDS and not k.startswith("_")}
        if extra:
            line.update({k: v for k, v in extra.items() if k not in line})
            return _redacted(json.dumps(line, ensure_ascii=False, default=str))
        return json.dumps(line, ensure_ascii=False, default=str)


def _redacted(text: str) -> str:
    """`text` with the secrets the installed record factory knows replaced (see `bot.ops.logging_setup`)."""
    # A secret inside a JSON string becomes "[redacted]" there: the line stays valid JSON.
    return logging.getLogRecordFactory()(__name__, logging.INFO, __file__, 0, text, None, None).getMessage()


def use_log_format(log_format: LogFormat) -> None:
    """With `json`, give every handler of the root logger the JSON format (after `logging.basicConfig`, which
    set the text one)."""
    if log_format != "json":
        return
    formatter = JsonFormatter()
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
    # Plain lines between the JSON ones would break a collector's parsing: Python warnings become log records,
    # and the progress bars of the hub and transformers (model loading) are turned off. That variable is read
    # when huggingface_hub is imported, which the model's loading does later.
    logging.captureWarnings(True)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

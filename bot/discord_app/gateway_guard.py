"""One malformed gateway event costs that event, never the connection.

discord.py turns each gateway DISPATCH into objects in a parser of its `ConnectionState` (`parse_message_update`
...), called straight from `DiscordWebSocket.received_message`: an exception there (a payload missing a field
the parser expects, such as the partial MESSAGE_UPDATE older gateway versions sent for embed-only updates, with
only `id` and `channel_id`) escapes `Client.connect`, ends `Client.start` and with it the process.

`guard_parsers` wraps every parser of a client's connection state, in place (the websocket reads the same
dict), so such an event is logged in one line (event name, sequence-free ids, the error's type) and dropped.
Nothing else changes: a parser that works runs exactly as before.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import discord

log = logging.getLogger(__name__)

_GUARDED = "__idefics_guarded__"


def _ids(data: Any) -> str:
    """The ids of an event's payload that locate it (never its content)."""
    if not isinstance(data, dict):
        return f"<{type(data).__name__}>"
    shown = [f"{k}={data[k]}" for k in ("id", "channel_id", "guild_id") if isinstance(data.get(k), str | int)]
    return " ".join(shown) or "no ids"


def _guarded(event: str, parser: Callable[[Any], None]) -> Callable[[Any], None]:
    @functools.wraps(parser)
    def parse(data: Any) -> None:
        try:
            parser(data)
        except Exception as exc:  # one event's fault; the connection and every other event go on
            log.warning("gateway event %s dropped, its payload could not be read (%s): %s", event,
                        type(exc).__name__, _ids(data))

    setattr(parse, _GUARDED, True)
    return parse


def guard_parsers(client: discord.Client) -> None:
    """Wrap each of `client`'s gateway event parsers so that one failing event is logged and dropped."""
    parsers: dict[str, Callable[[Any], None]] = client._connection.parsers
    for event, parser in list(parsers.items()):
        if not getattr(parser, _GUARDED, False):
            parsers[event] = _guarded(event, parser)

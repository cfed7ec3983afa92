"""What a store keeps in memory per channel: channel row ids and recently read settings.

`ChannelCache` holds both, bounded at `CHANNEL_CACHE_ENTRIES` channels each (past it a cache is emptied and
refills from the database). Settings are trusted for `SETTINGS_CACHE_S` after a read; a change through the store
replaces them at once, and a read that raced with a change is not kept (`version`). Times are passed in by the
caller (the store's clock), so tests move them on. No I/O.
"""

from __future__ import annotations

from typing import TypeVar

from storage.records import ChannelSettings

T = TypeVar("T")

CHANNEL_CACHE_ENTRIES = 100_000
"""Most channels whose id, and whose settings, a store keeps in memory (a few MB at most); past it a cache is
emptied and refills from the database."""

SETTINGS_CACHE_S = 5.0
"""How long a store trusts a channel's settings it read. Its own changes apply at once; a change made by another
process sharing the database (each Discord channel belongs to one shard, so to one process) within this time."""


def put_bounded(entries: dict[str, T], channel_key: str, value: T) -> None:
    """Set a per-channel cache entry; a cache at `CHANNEL_CACHE_ENTRIES` is emptied first (it refills)."""
    if channel_key not in entries and len(entries) >= CHANNEL_CACHE_ENTRIES:
        entries.clear()
    entries[channel_key] = value


class ChannelCache:
    """Channel row ids and recently read settings, by channel key."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        """Channel key -> row id, for channel rows known to be committed. Channel rows are never deleted
        (clearing a channel deletes its messages, not its row) and ids never change, so a cached id stays
        right for every process sharing the database; it saves an append two statements."""
        self._settings: dict[str, tuple[float, ChannelSettings]] = {}
        """Channel key -> (time read, settings): read for every message twice (whether to answer, then the
        prompt), changed rarely and only through `Store.update_channel_settings`."""
        self.version = 0
        """Bumped by every settings change, so a read that raced with one does not cache what it read."""

    def remember_id(self, channel_key: str, channel_id: int) -> None:
        put_bounded(self.ids, channel_key, channel_id)

    def settings(self, channel_key: str, now: float) -> ChannelSettings | None:
        """The settings read less than `SETTINGS_CACHE_S` before `now`, or None."""
        cached = self._settings.get(channel_key)
        if cached is not None and now - cached[0] < SETTINGS_CACHE_S:
            return cached[1]
        return None

    def keep_read(self, channel_key: str, read_at: float, settings: ChannelSettings, version: int) -> None:
        """Keep settings read at `read_at`, unless a change (past `version`) happened meanwhile."""
        if version == self.version:
            put_bounded(self._settings, channel_key, (read_at, settings))

    def changing(self, channel_key: str) -> None:
        """A change of the channel's settings begins: forget them, and let no read in flight keep its copy."""
        self.version += 1
        self._settings.pop(channel_key, None)

    def changed(self, channel_key: str, now: float, settings: ChannelSettings) -> None:
        """The change is committed: `settings` are the channel's, from `now`."""
        self.version += 1
        put_bounded(self._settings, channel_key, (now, settings))

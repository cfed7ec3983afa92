"""Per-channel settings: defaults, roundtrip, reset, and refusal of bad values."""

from __future__ import annotations

import math

import pytest

from storage import ChannelSettings, InvalidSetting, Store


async def test_unknown_channel_has_all_defaults(store: Store) -> None:
    assert await store.channel_settings("never-seen") == ChannelSettings()


async def test_roundtrip_and_reset(store: Store) -> None:
    chosen = dict(
        answer_mode="always",
        record_mode="addressed",
        system_prompt="  Be brief.  ",
        max_new_tokens=128,
        temperature=1,
        decoding="sample",
    )
    updated = await store.update_channel_settings("100", **chosen)

    expected = ChannelSettings(
        answer_mode="always",
        record_mode="addressed",
        system_prompt="Be brief.",
        max_new_tokens=128,
        temperature=1.0,
        decoding="sample",
    )
    assert updated == expected
    assert await store.channel_settings("100") == expected
    assert await store.channel_settings("200") == ChannelSettings()

    after = await store.update_channel_settings("100", temperature=None, system_prompt="")
    assert after.temperature is None and after.system_prompt is None
    assert after.decoding == "sample"  # untouched settings stay
    assert await store.channel_settings("100") == after


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("answer_mode", "sometimes"),
        ("record_mode", 1),
        ("decoding", "GREEDY"),
        ("max_new_tokens", 0),
        ("max_new_tokens", 5000),
        ("max_new_tokens", 12.5),
        ("max_new_tokens", True),
        ("temperature", 0),
        ("temperature", 3.0),
        ("temperature", math.nan),
        ("temperature", "hot"),
        ("system_prompt", "x" * 5000),
        ("system_prompt", 42),
        ("colour", "blue"),
    ],
)
async def test_bad_values_change_nothing(store: Store, name: str, value: object) -> None:
    await store.update_channel_settings("100", decoding="beam")

    # A valid change next to the bad one: it must not be written either.
    changes: dict[str, object] = {"answer_mode": "mention", "max_new_tokens": 64, name: value}
    with pytest.raises(InvalidSetting) as caught:
        await store.update_channel_settings("100", **changes)

    assert caught.value.user_message
    assert await store.channel_settings("100") == ChannelSettings(decoding="beam")


async def test_settings_are_read_once_and_own_changes_apply_at_once(store: Store, database_url: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Read for every message, so kept a few seconds; a change through this store is seen at once, one made by
    another process sharing the database once the kept copy is older than `SETTINGS_CACHE_S`."""
    import storage.settings_cache as store_module
    from storage import open_database

    assert (await store.channel_settings("300")).decoding is None
    await store.update_channel_settings("300", decoding="sample")
    assert (await store.channel_settings("300")).decoding == "sample"

    clock = [1000.0]
    monkeypatch.setattr(store, "clock", lambda: clock[0])
    await store.update_channel_settings("300", decoding="beam")  # kept as read at the fake time
    async with open_database(database_url) as other_process:
        await other_process.store.update_channel_settings("300", decoding="greedy")
    assert (await store.channel_settings("300")).decoding == "beam"
    clock[0] += store_module.SETTINGS_CACHE_S + 0.1
    assert (await store.channel_settings("300")).decoding == "greedy"

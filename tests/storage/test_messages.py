"""History: append, window, edit, delete, clear, forget, request states."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from storage import Database, ImageTooLarge, InvalidMessage, Store
from storage.models import Image
from tests.storage.conftest import MAX_IMAGE_BYTES, message, png, reply

RED, GREEN, BLUE = png((255, 0, 0)), png((0, 255, 0)), png((0, 0, 255))


async def image_count(database: Database) -> int:
    async with database.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(Image)) or 0)


async def test_append_then_window_oldest_first(store: Store) -> None:
    for i in range(5):
        await store.append_message(message(str(i)))
    await store.append_message(message("other", channel="200"))

    window = await store.recent_window("100", 3)

    assert [m.platform_id for m in window] == ["2", "3", "4"]
    assert [m.id for m in window] == sorted(m.id for m in window)
    assert await store.count_messages("100") == 5
    assert await store.recent_window("unknown", 3) == []
    assert await store.recent_window("100", 0) == []


async def test_stored_fields_roundtrip(store: Store) -> None:
    at = datetime(2024, 5, 1, 12, 30, tzinfo=timezone(timedelta(hours=2)))
    appended = await store.append_message(
        message("1", author="42", author_name="Ada", text="hello", created_at=at, request_state="pending")
    )
    answer = await store.append_message(reply("2", to="1", text="hi Ada"))
    assert appended is not None and answer is not None

    stored = await store.get_message("1")

    assert stored == appended
    assert stored.created_at == at and stored.created_at.tzinfo == UTC
    assert (stored.author_id, stored.author_name, stored.text) == ("42", "Ada", "hello")
    assert stored.request_state == "pending" and stored.reply_to is None
    assert (await store.get_message("2")) == answer
    assert answer.role == "assistant" and answer.reply_to == "1"
    assert answer.created_at.tzinfo == UTC  # default time: now, UTC
    assert await store.get_message("nope") is None


async def test_duplicate_platform_id_stores_once(database: Database, store: Store) -> None:
    first = await store.append_message(message("1", text="first", images=(RED,)))
    again = await store.append_message(message("1", channel="new-channel", text="again", images=(GREEN,)))

    assert first is not None and again is None
    assert await store.count_messages("100") == 1
    assert await store.count_messages("new-channel") == 0
    assert (await store.get_message("1")).text == "first"  # type: ignore[union-attr]
    assert await image_count(database) == 1  # the duplicate's image was not kept either


async def test_concurrent_duplicates_store_once(store: Store) -> None:
    results = await asyncio.gather(*(store.append_message(message("dup", images=(RED,))) for _ in range(8)))

    assert sum(result is not None for result in results) == 1
    assert await store.count_messages("100") == 1


async def test_concurrent_appends_of_a_shared_image(database: Database, store: Store) -> None:
    results = await asyncio.gather(*(store.append_message(message(str(i), images=(BLUE,))) for i in range(6)))

    assert all(result is not None for result in results)
    assert await image_count(database) == 1
    assert all(m.images[0].data == BLUE.data for m in await store.recent_window("100", 10))


async def test_images_deduplicated_by_hash_and_linked_in_order(database: Database, store: Store) -> None:
    first = await store.append_message(message("1", images=(RED, GREEN, RED)))
    await store.append_message(message("2", channel="200", images=(GREEN, BLUE)))

    [stored] = await store.recent_window("100", 1)
    assert first is not None and stored.images == first.images
    assert [image.data for image in stored.images] == [RED.data, GREEN.data, RED.data]
    assert stored.images[0].sha256 == stored.images[2].sha256 != stored.images[1].sha256
    assert (stored.images[0].mime, stored.images[0].width, stored.images[0].height) == ("image/png", 4, 3)
    assert await image_count(database) == 3


async def test_image_over_the_bound_is_refused_and_nothing_stored(store: Store) -> None:
    big = png((0, 0, 0))
    big = type(big)(data=b"\0" * (MAX_IMAGE_BYTES + 1), mime=big.mime, width=1, height=1)

    with pytest.raises(ImageTooLarge) as caught:
        await store.append_message(message("1", images=(RED, big)))

    assert caught.value.user_message and "KiB" in caught.value.user_message
    assert await store.get_message("1") is None


@pytest.mark.parametrize(
    "fields",
    [{"role": "system"}, {"request_state": "lost"}, {"created_at": datetime(2024, 1, 1)}],
    ids=["role", "request_state", "naive-time"],
)
async def test_invalid_messages_are_refused(store: Store, fields: dict[str, object]) -> None:
    with pytest.raises(InvalidMessage):
        await store.append_message(message("1", **fields))
    assert await store.get_message("1") is None


async def test_window_before_id_is_the_history_as_the_request_saw_it(store: Store) -> None:
    ids = {}
    for i in range(6):
        stored = await store.append_message(message(str(i)))
        assert stored is not None
        ids[str(i)] = stored.id

    window = await store.recent_window("100", 3, before_id=ids["4"])

    assert [m.platform_id for m in window] == ["1", "2", "3"]
    assert await store.recent_window("100", 10, before_id=ids["0"]) == []


async def test_window_through_a_request_ends_at_it_with_the_answers_stored_since(store: Store) -> None:
    """A request that waited its turn while the channel moved on: its window ends at it, and still holds the
    answer to the request before it, stored (so numbered) after it."""
    await store.append_message(message("q1", request_state="pending"))
    q2 = await store.append_message(message("q2", request_state="pending"))
    assert q2 is not None
    for i in range(5):
        await store.append_message(message(f"later-{i}", author="u2"))
    await store.append_answer(message("a1", role="assistant", author="bot", reply_to="q1"))
    await store.append_message(message("a-stranger", role="assistant", author="bot", reply_to="later-0"))

    window = await store.recent_window("100", 3, through_id=q2.id)

    assert [m.platform_id for m in window] == ["q1", "q2", "a1"]
    assert [m.platform_id for m in await store.recent_window("100", 1, through_id=q2.id)] == ["q2"]
    assert [m.platform_id for m in await store.recent_window("100", 3)] == ["later-4", "a1", "a-stranger"]


async def test_nul_characters_are_left_out_on_every_database(store: Store) -> None:
    """PostgreSQL's text cannot hold NUL: a model's answer carrying one is stored without it, not refused."""
    await store.append_message(message("q", text="a\x00b", request_state="pending"))
    stored = await store.append_answer(message("a", role="assistant", author="bot", reply_to="q", text="c\x00d"))
    assert stored is not None and stored.text == "cd"
    assert await store.edit_message("q", "e\x00f")
    assert [m.text for m in await store.recent_window("100", 10)] == ["ef", "cd"]


async def test_edit_message(store: Store) -> None:
    await store.append_message(message("1", text="before", images=(RED,)))

    assert await store.edit_message("1", "after") is True
    assert await store.edit_message("missing", "x") is False
    stored = await store.get_message("1")
    assert stored is not None and stored.text == "after" and len(stored.images) == 1


async def test_delete_single_keeps_images_still_shared(database: Database, store: Store) -> None:
    await store.append_message(message("1", images=(RED, GREEN)))
    await store.append_message(message("2", channel="200", images=(RED,)))

    assert await store.delete_message("1") is True
    assert await store.delete_message("1") is False

    assert await image_count(database) == 1  # GREEN went, RED is still used by message 2
    [left] = await store.recent_window("200", 10)
    assert left.images[0].data == RED.data
    assert await store.delete_message("2") is True
    assert await image_count(database) == 0


async def test_delete_bulk(database: Database, store: Store) -> None:
    for i in range(5):
        await store.append_message(message(str(i), images=(RED,) if i % 2 else (BLUE,)))

    removed = await store.delete_messages(["0", "2", "4", "missing", "0"])

    assert removed == 3
    assert [m.platform_id for m in await store.recent_window("100", 10)] == ["1", "3"]
    assert await image_count(database) == 1  # BLUE was only on the even ones
    assert await store.delete_messages([]) == 0


async def test_clear_channel_keeps_settings_and_other_channels(database: Database, store: Store) -> None:
    await store.update_channel_settings("100", decoding="sample")
    await store.append_message(message("1", images=(RED,)))
    await store.append_message(message("2", images=(GREEN,)))
    await store.append_message(message("3", channel="200", images=(GREEN,)))

    assert await store.clear_channel("100") == 2

    assert await store.count_messages("100") == 0
    assert await store.count_messages("200") == 1
    assert (await store.channel_settings("100")).decoding == "sample"
    assert await image_count(database) == 1
    assert await store.clear_channel("never-seen") == 0
    assert await store.append_message(message("4")) is not None  # the channel is usable again


async def test_forget_user_everywhere_with_the_answers_to_them(database: Database, store: Store) -> None:
    await store.append_message(message("a1", channel="100", author="alice", images=(RED,)))
    await store.append_message(reply("r1", to="a1", channel="100"))
    await store.append_message(message("b1", channel="100", author="bob", images=(GREEN,)))
    await store.append_message(reply("r2", to="b1", channel="100"))
    await store.append_message(message("a2", channel="200", author="alice", images=(GREEN,)))
    await store.append_message(reply("r3", to="a2", channel="200", images=(BLUE,)))
    await store.append_message(message("b2", channel="200", author="bob", reply_to="a2"))

    assert await store.forget_user("alice") == 4

    assert [m.platform_id for m in await store.recent_window("100", 10)] == ["b1", "r2"]
    assert [m.platform_id for m in await store.recent_window("200", 10)] == ["b2"]  # bob's reply stays
    assert await image_count(database) == 1  # GREEN (bob's) remains; RED and BLUE went
    assert await store.forget_user("alice") == 0


async def test_an_answer_whose_question_was_erased_is_not_stored(store: Store) -> None:
    """Checked in the answer's own transaction: the question forgotten (or deleted) while it was answered."""
    await store.append_message(message("q1", author="alice", request_state="pending"))
    await store.append_message(message("q2", author="alice", request_state="pending"))
    assert await store.forget_user("alice") == 2

    assert await store.append_answer(message("a1", role="assistant", author="bot", reply_to="q1")) is None

    await store.append_message(message("q3", author="bob", request_state="pending"))
    await store.delete_message("q3")
    assert await store.append_answer(message("a3", role="assistant", author="bot", reply_to="q3")) is None
    assert await store.get_message("a1") is None and await store.get_message("a3") is None
    assert await store.recent_window("100", 10) == []
    # A question still there is answered as before.
    await store.append_message(message("q4", author="bob", request_state="pending"))
    assert await store.append_answer(message("a4", role="assistant", author="bot", reply_to="q4")) is not None
    assert (await store.get_message("q4")).request_state == "answered"  # type: ignore[union-attr]


async def test_the_partial_reply_of_a_request_is_kept_for_a_restart(store: Store) -> None:
    await store.append_message(message("q1", request_state="pending", created_at=datetime.now(UTC)))
    assert (await store.get_message("q1")).partial_reply_id is None  # type: ignore[union-attr]

    assert await store.set_partial_reply("q1", "r1") is True
    assert await store.set_partial_reply("missing", "r2") is False

    assert (await store.get_message("q1")).partial_reply_id == "r1"  # type: ignore[union-attr]
    [pending] = await store.pending_requests_before(datetime.now(UTC) + timedelta(seconds=1))
    assert pending.platform_id == "q1" and pending.partial_reply_id == "r1"


async def test_request_states_and_pending_requests(store: Store) -> None:
    now = datetime.now(UTC)
    old = now - timedelta(hours=3)
    await store.append_message(message("old", created_at=old, request_state="pending"))
    await store.append_message(message("new", channel="200", created_at=now, request_state="pending"))
    await store.append_message(message("done", created_at=now, request_state="pending"))
    await store.append_message(message("chat", created_at=now))

    assert await store.set_request_state("done", "answered") is True
    assert await store.set_request_state("missing", "failed") is False
    with pytest.raises(InvalidMessage):
        await store.set_request_state("done", "weird")  # type: ignore[arg-type]

    recent = await store.pending_requests(now - timedelta(hours=1))
    assert [(m.platform_id, m.channel_key) for m in recent] == [("new", "200")]
    assert [m.platform_id for m in await store.pending_requests(old)] == ["old", "new"]
    assert [m.platform_id for m in await store.pending_requests(old, before=now)] == ["old"]
    assert [m.platform_id for m in await store.pending_requests_before(now - timedelta(hours=1))] == ["old"]

    assert await store.claim_request("old", "failed") is True
    assert await store.claim_request("old", "failed") is False  # claimed once: a second claim loses
    assert (await store.get_message("old")).request_state == "failed"  # type: ignore[union-attr]
    assert [m.platform_id for m in await store.pending_requests(old)] == ["new"]


async def test_answer_is_stored_and_its_request_marked_answered_together(store: Store) -> None:
    await store.append_message(message("q1", request_state="pending"))

    answer = await store.append_answer(reply("a1", to="q1", text="an answer"))

    assert answer is not None and answer == await store.get_message("a1")
    assert (await store.get_message("q1")).request_state == "answered"  # type: ignore[union-attr]
    # A repeated answer id stores nothing and marks nothing (the caller marks the request itself).
    await store.append_message(message("q2", request_state="pending"))
    assert await store.append_answer(reply("a1", to="q2")) is None
    assert (await store.get_message("q2")).request_state == "pending"  # type: ignore[union-attr]
    with pytest.raises(InvalidMessage):
        await store.append_answer(message("u1", reply_to="q2"))  # not an assistant message
    with pytest.raises(InvalidMessage):
        await store.append_answer(message("a2", author="bot", role="assistant"))  # answers nothing


async def test_window_reads_every_field_and_image_as_get_message_does(store: Store) -> None:
    at = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    await store.append_message(message("1", images=(RED, GREEN, RED), created_at=at, request_state="pending"))
    await store.append_message(reply("2", to="1", text="two"))
    await store.append_message(message("3", author="42", images=(BLUE,), request_state="failed"))
    await store.append_message(message("4"))

    window = await store.recent_window("100", 10)

    assert window == [await store.get_message(platform_id) for platform_id in ("1", "2", "3", "4")]
    assert [len(m.images) for m in window] == [3, 0, 1, 0]
    assert [image.data for image in window[0].images] == [RED.data, GREEN.data, RED.data]
    assert window[0].created_at == at and window[0].created_at.tzinfo == UTC


async def test_channels_made_by_another_store_or_undone_by_a_duplicate(database_url: str, store: Store) -> None:
    # A store remembers the ids of the channel rows it has seen committed; another process's store (here a
    # second database object) finds the same rows, and a channel row dropped with a duplicate is not remembered.
    from storage import open_database

    await store.append_message(message("1"))
    async with open_database(database_url) as other:
        assert await other.store.append_message(message("2")) is not None
        assert await other.store.append_message(message("3", channel="200")) is not None
    assert await store.append_message(message("4")) is not None
    assert await store.append_message(message("5", channel="200")) is not None
    assert [m.platform_id for m in await store.recent_window("100", 10)] == ["1", "2", "4"]
    assert [m.platform_id for m in await store.recent_window("200", 10)] == ["3", "5"]

    assert await store.append_message(message("1", channel="300")) is None  # its new channel row rolled back
    assert await store.append_message(message("6", channel="300")) is not None
    assert [m.platform_id for m in await store.recent_window("300", 10)] == ["6"]

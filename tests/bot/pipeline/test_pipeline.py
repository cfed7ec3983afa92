"""The conversation pipeline on a real database and the tiny model: store first, order, failures."""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime

import pytest

from bot.images.check import ImageLimits, check_image
from bot.pipeline.conversation import ChatDefaults, Conversation, IncomingMessage, ModelInfo, Reply, conversation_order
from model_server.errors import Busy
from model_server.executor import Executor
from model_server.prompt import prompt_text
from model_server.types import GenerationResult
from storage import StoredMessage, open_database
from tests.conftest import noise_image
from tests.fakes.faults import stuck_forward


class RecordingSink:
    def __init__(self, platform_id: str) -> None:
        self.platform_id = platform_id
        self.deltas: list[str] = []
        self.queued_updates: list[int] = []
        self.failures: list[str] = []
        self.final: str | None = None

    async def queued(self, ahead: int) -> None:
        self.queued_updates.append(ahead)

    async def delta(self, text: str) -> None:
        self.deltas.append(text)

    async def finish(self, text: str, result: GenerationResult) -> Reply | None:
        self.final = text
        return Reply(self.platform_id, text)

    async def failed(self, user_message: str) -> None:
        self.failures.append(user_message)


@pytest.fixture
async def database(tmp_path):
    async with open_database(f"sqlite+aiosqlite:///{tmp_path / 'chat.sqlite3'}") as db:
        yield db


@pytest.fixture
def conversation(database, executor, loaded_model) -> Conversation:
    info = ModelInfo(name="tiny", instruct=True, count_tokens=loaded_model.count_tokens)
    return Conversation(database.store, executor, info, ChatDefaults(max_new_tokens=12), assistant_id="bot")


def message(pid: str, text: str, channel: str = "c1", author: str = "u1", images=()) -> IncomingMessage:
    checked = tuple(check_image(_png(i), ImageLimits()) for i in images)
    return IncomingMessage(platform_id=pid, channel_key=channel, author_id=author, author_name=f"name-{author}",
                           text=text, images=checked)


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    noise_image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_answer_is_streamed_and_both_turns_stored(conversation: Conversation, database):
    sink = RecordingSink("r1")
    reply = await conversation.handle(message("m1", "what is this?", images=[1]), sink)
    assert reply is not None and sink.final == reply.text
    assert "".join(sink.deltas) == reply.text or reply.text.startswith("(the model gave")
    window = await database.store.recent_window("c1", 10)
    assert [(m.role, m.platform_id, m.request_state) for m in window] == [
        ("user", "m1", "answered"), ("assistant", "r1", None)]
    assert len(window[0].images) == 1 and window[1].reply_to == "m1"


async def test_duplicate_event_is_stored_and_answered_once(conversation: Conversation, database):
    first, second = RecordingSink("r1"), RecordingSink("r2")
    await conversation.handle(message("m1", "hi"), first)
    assert await conversation.handle(message("m1", "hi"), second) is None
    assert second.final is None and second.failures == []
    assert await database.store.count_messages("c1") == 2


async def test_requests_of_one_channel_see_the_answers_before_them(conversation: Conversation, executor):
    sinks = [RecordingSink(f"r{i}") for i in range(3)]
    stored = [await conversation.record(message(f"m{i}", f"question {i}"), request=True) for i in range(3)]
    await asyncio.gather(*(conversation.respond(s, k) for s, k in zip(stored, sinks, strict=True)))
    # The last prompt holds question 0, answer 0, question 1, answer 1, question 2, in that order.
    prompt = prompt_text((await conversation.prompt_for(stored[2])).items)
    # (Answers are random bytes from the tiny model, and rendering strips their control characters,
    # so the turns are located by their markers.)
    q0, q1, q2 = (prompt.index(f"question {i}") for i in range(3))
    a0 = prompt.index("\nAssistant: ", q0)
    a1 = prompt.index("\nAssistant: ", q1)
    assert q0 < a0 < q1 < a1 < q2
    assert prompt.count("\nAssistant: ") == 2 and prompt.endswith("\nAssistant:")
    assert [b.size for b in executor.batches] == [1, 1, 1]


async def test_two_channels_share_a_batch(database, engine, model_config, loaded_model):
    info = ModelInfo(name="tiny", instruct=True, count_tokens=loaded_model.count_tokens)
    async with Executor(engine, model_config, batch_window_s=0.3) as ex:
        conv = Conversation(database.store, ex, info, ChatDefaults(max_new_tokens=8))
        await asyncio.gather(conv.handle(message("a1", "hello", channel="A"), RecordingSink("ra")),
                             conv.handle(message("b1", "hello", channel="B"), RecordingSink("rb")))
        assert [b.size for b in ex.batches] == [2]


async def test_busy_is_told_and_the_message_kept(database, loaded_model):
    class BusyExecutor:
        def submit(self, prompt, **kwargs):
            raise Busy(64, 64)

    info = ModelInfo(name="tiny", instruct=True)
    conv = Conversation(database.store, BusyExecutor(), info, ChatDefaults())  # type: ignore[arg-type]
    sink = RecordingSink("never")
    assert await conv.handle(message("m1", "hello?", images=[2]), sink) is None
    assert sink.failures == ["the model is busy (64 requests waiting), try again in a minute"]
    stored = await database.store.get_message("m1")
    assert stored is not None and stored.request_state == "failed" and len(stored.images) == 1


async def test_unexpected_failure_is_a_short_message(database):
    class BrokenExecutor:
        def submit(self, prompt, **kwargs):
            raise RuntimeError("internal detail that must not reach the user")

    conv = Conversation(database.store, BrokenExecutor(), ModelInfo(name="x", instruct=True),  # type: ignore[arg-type]
                        ChatDefaults())
    sink = RecordingSink("never")
    await conv.handle(message("m1", "hello?"), sink)
    assert sink.failures == ["something went wrong on my side; please try again"]
    assert (await database.store.get_message("m1")).request_state == "failed"


async def test_queue_position_is_reported(database, engine, model_config, loaded_model):
    from model_server.config import ModelConfig

    info = ModelInfo(name="tiny", instruct=True)
    config = ModelConfig(model=model_config.model, max_batch_size=1)
    with stuck_forward(engine) as gate:
        async with Executor(engine, config, batch_window_s=0) as ex:
            conv = Conversation(database.store, ex, info, ChatDefaults(max_new_tokens=4))
            sinks = [RecordingSink(f"r{c}") for c in "ABC"]
            tasks = [asyncio.create_task(conv.handle(message(f"m{c}", "hi", channel=c), s))
                     for c, s in zip("ABC", sinks, strict=True)]
            await asyncio.sleep(1.0)
            gate.set()
            await asyncio.gather(*tasks)
    # Which channel reaches the queue first depends on the database: one runs, the others wait 0 and 1 ahead.
    firsts = sorted(s.queued_updates[0] for s in sinks if s.queued_updates)
    assert firsts == [0, 1]
    assert all(s.final is not None for s in sinks)


def _stored(i: int, role: str, pid: str, reply_to: str | None = None) -> StoredMessage:
    return StoredMessage(id=i, platform_id=pid, channel_key="c", role=role, author_id="u", author_name="u",
                         text=pid, created_at=datetime.now(UTC), reply_to=reply_to, request_state=None, images=())


def test_conversation_order_puts_answers_after_their_questions():
    q1, q2, a1, q3, a2 = (_stored(1, "user", "q1"), _stored(2, "user", "q2"), _stored(3, "assistant", "a1", "q1"),
                          _stored(4, "user", "q3"), _stored(5, "assistant", "a2", "q2"))
    window = [q1, q2, a1, q3, a2]
    assert [m.platform_id for m in conversation_order(window, q2)] == ["q1", "a1", "q2"]
    assert [m.platform_id for m in conversation_order(window, q3)] == ["q1", "a1", "q2", "a2", "q3"]


async def test_a_state_that_could_not_be_written_is_written_later(conversation: Conversation, database,
                                                                   monkeypatch):
    """The database is away just when an answer is delivered: the request is not left "pending"."""
    from storage import DatabaseUnavailable

    store = database.store
    real = store.set_request_state
    failures = {"left": 1}

    async def flaky(platform_id, state):
        if state == "answered" and failures["left"]:
            failures["left"] -= 1
            raise DatabaseUnavailable(detail="server restarting")
        return await real(platform_id, state)

    async def away(msg):  # storing the answer (which marks the request too) fails first
        raise DatabaseUnavailable(detail="server restarting")

    monkeypatch.setattr(store, "append_answer", away)
    monkeypatch.setattr(store, "set_request_state", flaky)
    await conversation.handle(message("m1", "first"), RecordingSink("r1"))
    assert (await store.get_message("m1")).request_state == "pending"
    await conversation.record(message("m2", "next"), request=False)
    assert (await store.get_message("m1")).request_state == "answered"


async def test_a_flooded_channel_has_a_bounded_line(database, engine, model_config, loaded_model):
    """Past `channel_backlog` requests running or waiting in one channel, the next is told the model is busy."""
    info = ModelInfo(name="tiny", instruct=True)
    with stuck_forward(engine) as gate:
        async with Executor(engine, model_config, batch_window_s=0) as ex:
            conv = Conversation(database.store, ex, info, ChatDefaults(max_new_tokens=4, channel_backlog=2))
            sinks = [RecordingSink(f"r{i}") for i in range(4)]
            stored = [await conv.record(message(f"m{i}", f"q{i}"), request=True) for i in range(4)]
            tasks = [asyncio.create_task(conv.respond(m, s)) for m, s in zip(stored, sinks, strict=True)]
            await asyncio.sleep(0.3)
            gate.set()
            await asyncio.gather(*tasks)
    assert [s.final is not None for s in sinks] == [True, True, False, False]
    assert all("busy" in s.failures[0] for s in sinks[2:])
    states = [(await database.store.get_message(f"m{i}")).request_state for i in range(4)]
    assert states == ["answered", "answered", "failed", "failed"]

"""The executor's admission rules as tables of plain values: no model, no clock, no thread.

Each case gives the queue (oldest first), the running batch (rows, decode steps) and the time; the scheduler
answers who expires, who joins, and who runs alone.
"""

from __future__ import annotations

import pytest

from model_server.failed_batch import OUT_OF_MEMORY_MESSAGE, failure, retry_parts
from model_server.scheduler import JOIN_WAIT_STEPS, Decision, Request, admit, batch_key, next_batch, weight

NOW = 100.0


def gen(request_id: int, *, deadline: float = 200.0, at_step: int = 0) -> Request:
    return Request(id=request_id, kind="generate", deadline=deadline, steps_at_submit=at_step, key="greedy")


def beam(request_id: int, beams: int = 2) -> Request:
    return Request(id=request_id, kind="beam", deadline=200.0, key="beam", weight=beams)


def rank(request_id: int) -> Request:
    return Request(id=request_id, kind="rank", deadline=200.0, key=("rank", request_id))


# -- continuous batching ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("waiting", "running", "steps", "expected"), [
    pytest.param([], 0, 0, Decision(), id="nothing waits"),
    pytest.param([gen(1), gen(2)], 0, 0, Decision(join=(1, 2)), id="an idle batch takes everyone"),
    pytest.param([gen(i) for i in range(1, 11)], 0, 0, Decision(join=tuple(range(1, 9))), id="up to max rows"),
    pytest.param([gen(1)], 2, 5, Decision(join=(1,)), id="half the rows free: joins at once"),
    pytest.param([gen(1, at_step=0)], 6, 3, Decision(), id="few rows free: waits for company"),
    pytest.param([gen(1, at_step=0), gen(2, at_step=10)], 6, JOIN_WAIT_STEPS, Decision(join=(1, 2)),
                 id="few rows free: the oldest waited long enough, and brings the next"),
    pytest.param([gen(i, at_step=0) for i in range(1, 5)], 6, JOIN_WAIT_STEPS, Decision(join=(1, 2)),
                 id="joining never passes max rows"),
    pytest.param([gen(1)], 8, 100, Decision(), id="a full batch takes nobody"),
    pytest.param([rank(1), gen(2)], 4, 0, Decision(alone=1), id="scoring runs alone between two steps"),
    pytest.param([beam(1), gen(2)], 0, 0, Decision(alone=1), id="beam search runs alone once idle"),
    pytest.param([beam(1), gen(2)], 3, 100, Decision(), id="beam search waits for the running rows"),
    pytest.param([gen(1), beam(2), gen(3)], 0, 0, Decision(join=(1,)), id="nothing overtakes a waiting beam search"),
    pytest.param([gen(1, deadline=99.0), gen(2)], 0, 0, Decision(expired=(1,), join=(2,)),
                 id="an expired request leaves, the next joins"),
    pytest.param([gen(1, deadline=NOW)], 0, 0, Decision(join=(1,)), id="a deadline of now has not passed"),
    pytest.param([gen(1, deadline=1.0), rank(2)], 7, 0, Decision(expired=(1,), alone=2),
                 id="expiry first, then scoring alone"),
])
def test_admit(waiting: list[Request], running: int, steps: int, expected: Decision):
    assert admit(waiting, running=running, steps=steps, max_rows=8, now=NOW) == expected


@pytest.mark.parametrize(("max_rows", "running", "joins"), [
    (1, 0, True),  # a one-row batch: its single row is "half"
    (1, 1, False),
    (2, 1, True),
    (3, 2, True),  # half of three rounds down to one
    (5, 4, False),  # one of five free is less than half
    (4, 2, True),
])
def test_admit_half_free_rule(max_rows: int, running: int, joins: bool):
    decision = admit([gen(1)], running=running, steps=0, max_rows=max_rows, now=NOW)
    assert decision.join == ((1,) if joins else ())


# -- static batching -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("waiting", "expected"), [
    pytest.param([], Decision(), id="nothing waits"),
    pytest.param([gen(1), beam(2), gen(3)], Decision(join=(1, 3)), id="the oldest and its compatible followers"),
    pytest.param([beam(1, 4), beam(2, 4), beam(3, 4)], Decision(join=(1, 2)), id="beams count their rows"),
    pytest.param([rank(1), rank(2)], Decision(join=(1,)), id="scoring runs alone"),
    pytest.param([gen(1, deadline=0.0), beam(2)], Decision(expired=(1,), join=(2,)), id="expired first"),
])
def test_next_batch(waiting: list[Request], expected: Decision):
    assert next_batch(waiting, max_rows=8, now=NOW) == expected


@pytest.mark.parametrize(("kind", "request_id", "params_key", "num_beams", "key", "rows"), [
    ("generate", 1, "p", 1, "p", 1),
    ("beam", 2, "p", 3, "p", 3),
    ("rank", 3, "p", 1, ("rank", 3), 1),
    ("rank", 4, "p", 1, ("rank", 4), 1),
])
def test_batch_key_and_weight(kind: str, request_id: int, params_key: str, num_beams: int, key: object, rows: int):
    assert batch_key(kind, request_id, params_key) == key
    assert weight(kind, num_beams) == rows


# -- a batch the model raised on -------------------------------------------------------------------------------
@pytest.mark.parametrize(("pending", "oom", "parts"), [
    ([1, 2, 3, 4, 5], True, [[1, 2, 3], [4, 5]]),
    ([1], True, [[1]]),
    ([1, 2, 3], False, [[1], [2], [3]]),
    ([], False, []),
])
def test_retry_parts(pending: list[int], oom: bool, parts: list[list[int]]):
    assert retry_parts(pending, oom) == parts


@pytest.mark.parametrize(("oom", "user_message"), [
    (True, OUT_OF_MEMORY_MESSAGE),
    (False, "the model failed on this request, please try again"),
])
def test_failure_alone(oom: bool, user_message: str):
    error = failure(RuntimeError("CUDA error 7"), oom)
    assert error.user_message == user_message
    assert str(error) == "RuntimeError: CUDA error 7"

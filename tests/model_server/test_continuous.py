"""Continuous batching on the tiny IDEFICS: requests join a running batch between decode steps and leave
it when done, and a request's output does not depend on who it shared the batch with."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from model_server.backend import RequestHandle
from model_server.config import ModelConfig
from model_server.errors import GenerationFailed
from model_server.executor import Executor
from model_server.types import FinishReason, GenerationResult, Prompt
from tests.model_server.test_executor import chat

LONG = chat("tell me a very long story about this", 1, 11, max_new_tokens=48)
JOINERS = [chat("hi", 0, 12, max_new_tokens=8), chat("what is in it?", 2, 13, max_new_tokens=8),
           chat("and the colours?", 1, 14, max_new_tokens=8)]
SAMPLED = chat("make something up", 1, 15, max_new_tokens=10, decoding="sample", temperature=1.0, seed=7)


def static(config: ModelConfig) -> ModelConfig:
    return dataclasses.replace(config, batching="static")


async def alone(engine, config: ModelConfig, prompt: Prompt) -> GenerationResult:
    async with Executor(engine, config, batch_window_s=0) as ex:
        return await ex.generate(prompt)


async def first_delta(handle: RequestHandle) -> None:
    async for _ in handle:
        return


async def test_the_long_request_runs_past_the_joiners(engine, model_config):
    """The scenarios below need the long request still running when the others arrive."""
    result = await alone(engine, model_config, LONG)
    assert result.finish_reason is FinishReason.LENGTH and result.completion_tokens == 48


async def test_joining_a_running_batch_changes_no_output(engine, model_config):
    expected = [await alone(engine, model_config, p) for p in (LONG, *JOINERS, SAMPLED)]
    async with Executor(engine, model_config, batch_window_s=0) as ex:
        long = ex.submit(LONG)
        await first_delta(long)
        # Greedy rows with 0, 2 and 1 images, and a sampling row with its own seed, join one by one.
        joined = []
        for prompt in (*JOINERS, SAMPLED):
            handle = ex.submit(prompt)
            await first_delta(handle)
            joined.append(handle)
        results = [await long.result(), *[await h.result() for h in joined]]
    assert [r.text for r in results] == [r.text for r in expected]
    assert [r.completion_tokens for r in results] == [r.completion_tokens for r in expected]
    # Each joiner started while the long request ran: it joined the batch rather than waiting for it.
    assert all(r.batch_size >= 2 for r in results[1:])
    assert all(r.total_s < results[0].total_s for r in results[1:])


async def test_a_short_request_does_not_wait_for_a_long_one(engine, model_config):
    """Static batching: the short request starts when the long one ends. Continuous: at the next step."""
    order: dict[str, list[str]] = {}
    for mode, config in (("static", static(model_config)), ("continuous", model_config)):
        async with Executor(engine, config, batch_window_s=0) as ex:
            long = ex.submit(LONG)
            await first_delta(long)
            short = ex.submit(JOINERS[0])
            finished: list[str] = []

            async def wait(name: str, handle: RequestHandle, finished=finished) -> GenerationResult:
                result = await handle.result()
                finished.append(name)
                return result

            long_result, short_result = await asyncio.gather(wait("long", long), wait("short", short))
            order[mode] = finished
            if mode == "static":
                assert short_result.batch_size == 1 and short_result.queued_s >= long_result.total_s - 0.5
            else:
                assert short_result.batch_size == 2 and short_result.first_token_s < long_result.total_s
    assert order == {"static": ["long", "short"], "continuous": ["short", "long"]}


async def test_finished_rows_leave_and_free_their_slots(engine, model_config):
    """With room for two rows, a third request runs as soon as one of the first two is done."""
    config = dataclasses.replace(model_config, max_batch_size=2)
    async with Executor(engine, config, batch_window_s=0.05) as ex:
        long = ex.submit(LONG)
        first = ex.submit(JOINERS[0])
        await first_delta(long)
        third = ex.submit(JOINERS[1])
        assert third.ahead() == 0
        first_result, third_result = await first.result(), await third.result()
        long_result = await long.result()
    assert first_result.batch_size == 2 and third_result.batch_size == 2
    assert third_result.total_s + 0.0 < long_result.total_s


async def test_scoring_runs_between_steps_and_beam_search_waits_its_turn(engine, model_config):
    from model_server import tasks
    from tests.conftest import noise_image

    finished: list[str] = []

    async def wait(name: str, handle: RequestHandle) -> GenerationResult:
        result = await handle.result()
        finished.append(name)
        return result

    async with Executor(engine, model_config, batch_window_s=0) as ex:
        long = ex.submit(LONG)
        await first_delta(long)
        ranked = await ex.rank(chat("is it a cat or a dog?", 1, 16), ["cat", "dog"])
        finished.append("rank")
        story = ex.submit(tasks.story([noise_image(17)]))
        later = ex.submit(JOINERS[0])
        results = await asyncio.gather(wait("long", long), wait("story", story), wait("later", later))
    assert {r.category for r in ranked} == {"cat", "dog"}
    assert all(r.completion_tokens > 0 for r in results)
    # Scoring did not wait for the long answer; the short request after the story did not overtake it.
    assert finished == ["rank", "long", "story", "later"]


async def test_a_decode_step_that_fails_retries_each_row_alone(engine, model_config):
    expected = [await alone(engine, model_config, p) for p in (LONG, JOINERS[1])]
    original = engine.forward
    failures = []

    def fail_once_on_a_joined_step(**kwargs):
        if kwargs["input_ids"].shape == (2, 1) and not failures:
            failures.append(1)
            raise RuntimeError("device lost")
        return original(**kwargs)

    async with Executor(engine, model_config, batch_window_s=0) as ex:
        long = ex.submit(LONG)
        await first_delta(long)
        engine.forward = fail_once_on_a_joined_step
        try:
            joiner = ex.submit(JOINERS[1])
            deltas = [d async for d in joiner]
            results = [await long.result(), await joiner.result()]
        finally:
            engine.forward = original
        assert ex.stats().errors["error"] == 1
    assert failures and [r.text for r in results] == [r.text for r in expected]
    assert "".join(deltas) == results[1].text  # nothing streamed twice after the retry


async def test_a_request_that_breaks_prefill_fails_alone_while_the_batch_runs(engine, model_config):
    original = engine.forward

    def poison(**kwargs):
        if kwargs["input_ids"].shape[1] > 1 and kwargs["image_attention_mask"].shape[-1] == 2:
            raise RuntimeError("boom")
        return original(**kwargs)

    async with Executor(engine, model_config, batch_window_s=0) as ex:
        long = ex.submit(LONG)
        await first_delta(long)
        engine.forward = poison
        try:
            with pytest.raises(GenerationFailed):
                await ex.generate(JOINERS[1])
            result = await long.result()
        finally:
            engine.forward = original
    assert result.finish_reason is FinishReason.LENGTH and result.completion_tokens == 48


async def test_a_nearly_full_batch_takes_newcomers_a_few_at_a_time(engine, model_config):
    """Each join pauses the running rows for a prefill: with fewer than half the rows free, a newcomer waits
    up to `JOIN_WAIT_STEPS` decode steps (for company, or for rows to finish), then joins."""
    from model_server.scheduler import JOIN_WAIT_STEPS

    config = dataclasses.replace(model_config, max_batch_size=4)
    async with Executor(engine, config, batch_window_s=0.05) as ex:
        longs = [ex.submit(LONG) for _ in range(3)]
        await first_delta(longs[0])
        submitted_at = ex._steps
        short = ex.submit(JOINERS[0])
        await first_delta(short)
        waited = ex._steps - submitted_at
        results = [await h.result() for h in (*longs, short)]
    assert JOIN_WAIT_STEPS <= waited < 48  # it joined the running rows, neither at once nor after them
    assert results[-1].batch_size == 4 and results[-1].total_s < results[0].total_s

"""Model trouble: a model thread that stops answering, out-of-memory and errors, all visible.

Faults are injected the way tests/model_server/test_executor.py does it: by replacing `engine.forward`
(the session's engine is shared, so every test puts the original back).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any

import pytest
import torch

from model_server.config import ModelConfig
from model_server.errors import GenerationFailed, ModelStuck
from model_server.executor import Executor
from model_server.types import FinishReason
from tests.bot.discord_app.conftest import answer_to, eventually, open_test_services, run_bot
from tests.bot.discord_app.test_commands import answered, slash
from tests.fakes.faults import stuck_forward
from tests.model_server.test_executor import PROMPTS, chat


def small_watchdog(model_config: ModelConfig, watchdog_s: float, **changes: Any) -> ModelConfig:
    return dataclasses.replace(model_config, watchdog_s=watchdog_s, **changes)


async def test_stuck_model_fails_every_request_then_recovers(engine: Any, model_config: ModelConfig) -> None:
    config = small_watchdog(model_config, 1.0, max_batch_size=1)
    fatal: list[str] = []
    async with Executor(engine, config, batch_window_s=0) as ex:
        ex.on_fatal = fatal.append
        with stuck_forward(engine) as gate:
            started = time.monotonic()
            running = ex.submit(PROMPTS[0])
            await asyncio.sleep(0.05)
            waiting = ex.submit(PROMPTS[1])
            outcomes = await asyncio.gather(running.result(), waiting.result(), return_exceptions=True)
            took = time.monotonic() - started
            assert all(isinstance(o, ModelStuck) for o in outcomes), outcomes
            assert all(isinstance(o, GenerationFailed) for o in outcomes)
            assert "stopped responding" in outcomes[0].user_message  # type: ignore[union-attr]
            assert 1.0 <= took < 2.0
            stats = ex.stats()
            assert ex.fault is not None and ex.fault.startswith("model thread stuck for ")
            assert stats.fault is not None and stats.errors["watchdog"] == 1
            assert stats.queue_length == 0 and stats.failed == 2
            with pytest.raises(ModelStuck) as refused:
                ex.submit(PROMPTS[2])
            assert refused.value.user_message == outcomes[0].user_message  # type: ignore[union-attr]
            gate.set()  # the stuck call returns: its rows were cancelled, the batch ends, the fault clears
            await eventually(lambda: ex.fault is None, 10, "the fault to clear")
            result = await ex.generate(PROMPTS[2])
        assert result.completion_tokens > 0
        assert result.finish_reason is not FinishReason.CANCELLED
        stats = ex.stats()
        assert stats.fault is None and stats.errors["watchdog"] == 1 and stats.completed >= 1
        assert fatal == []


async def test_model_stuck_for_good_calls_on_fatal_once(engine: Any, model_config: ModelConfig) -> None:
    config = small_watchdog(model_config, 0.3)
    fatal: list[tuple[str, str]] = []
    async with Executor(engine, config, batch_window_s=0) as ex:
        ex.on_fatal = lambda reason: fatal.append((reason, threading.current_thread().name))
        with stuck_forward(engine):
            handle = ex.submit(PROMPTS[0])
            with pytest.raises(ModelStuck):
                await handle.result()
            await eventually(lambda: fatal, 5, "on_fatal")
            await asyncio.sleep(0.6)  # several more watchdog checks, past more deadlines: still one call
            assert len(fatal) == 1
            reason, thread = fatal[0]
            assert reason.startswith("model thread stuck for ") and "watchdog 0.3 s" in reason
            assert thread == "model-watchdog"
            assert ex.stats().errors["watchdog"] == 1 and ex.fault is not None


async def test_no_fault_while_idle_or_busy_with_progress(engine: Any, model_config: ModelConfig) -> None:
    """A slow model that keeps stepping is not stuck; neither is an executor with nothing to do."""
    original = engine.forward

    def slow(**kwargs: Any) -> Any:
        time.sleep(0.1)
        return original(**kwargs)

    config = small_watchdog(model_config, 1.0)
    async with Executor(engine, config, batch_window_s=0) as ex:
        await asyncio.sleep(2.2)  # idle for more than twice the watchdog
        engine.forward = slow
        try:
            result = await ex.generate(chat("keep going", 1, 4, max_new_tokens=20))
        finally:
            engine.forward = original
        assert result.completion_tokens > 10
        assert result.total_s > 1.0  # longer than the watchdog, yet never silent for that long
        assert ex.fault is None and ex.stats().errors["watchdog"] == 0


async def test_out_of_memory_errors_and_timeouts_are_counted(engine: Any, model_config: ModelConfig) -> None:
    original = engine.forward
    failure: list[BaseException] = []

    def failing(**kwargs: Any) -> Any:
        raise failure[0]

    async with Executor(engine, model_config, batch_window_s=0) as ex:
        engine.forward = failing
        try:
            failure[:] = [torch.OutOfMemoryError("CUDA out of memory")]
            with pytest.raises(GenerationFailed):
                await ex.generate(PROMPTS[0])
            failure[:] = [RuntimeError("boom")]
            with pytest.raises(GenerationFailed):
                await ex.generate(PROMPTS[0])
        finally:
            engine.forward = original
        timed_out = await ex.generate(chat("long", 1, 8, max_new_tokens=1000), timeout_s=0.2)
        assert timed_out.finish_reason is FinishReason.TIMEOUT
        stats = ex.stats()
    assert stats.errors == {"oom": 1, "error": 1, "timeout": 1, "watchdog": 0}
    assert stats.failed == 2 and stats.fault is None


async def test_status_shows_the_fault_and_the_bot_recovers(fake_discord: Any, bot_settings: Any, engine: Any,
                                                           model_config: ModelConfig, loaded_model: Any) -> None:
    config = small_watchdog(model_config, 1.0)
    async with open_test_services(bot_settings, engine, config, loaded_model) as services, \
            run_bot(fake_discord, services) as running:
        fake, world = running.fake, running.world
        with stuck_forward(engine) as gate:
            asked = await fake.send_message_as(world.member, world.general, "are you there?", mentions_bot=True)
            reply = await answer_to(running, world.general, asked)
            assert reply.content == ModelStuck.default_user_message
            text = answered(await slash(running, "status"))
            fields = dict(line.split(": ", 1) for line in text.strip("`\n").splitlines())
            assert fields["fault"].startswith("model thread stuck for ")
            assert fields["errors"] == "watchdog 1"
            gate.set()
            await eventually(lambda: services.executor.fault is None, 10, "the fault to clear")
        again = await fake.send_message_as(world.member, world.general, "and now?", mentions_bot=True)
        answer = await answer_to(running, world.general, again)
        assert answer.content and answer.content != ModelStuck.default_user_message
        stored = await running.store.get_message(str(again.id))
        assert stored.request_state == "answered"
        assert "fault" not in answered(await slash(running, "status"))

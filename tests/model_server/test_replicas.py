"""Several replicas in one process (`IDEFICS_DEVICES=cpu,cpu`): two tiny models behind one `ReplicaPool`.

The replicas are loaded through the same code users run (`load_replicas` -> `load_model(device=...)`); faults are
injected as in test_executor.py, by replacing one replica's `engine.forward`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from model_server.backend import ExecutorStats
from model_server.config import ModelConfig
from model_server.errors import Busy, ExecutorClosed, ModelLoadError, ModelStuck
from model_server.executor import Executor
from model_server.replicas import (
    ReplicaPool,
    load_replicas,
    merge_stats,
    parse_devices,
    resolve_devices,
    route,
)
from model_server.types import FinishReason
from tests.fakes.faults import stuck_forward as stuck
from tests.model_server.test_executor import PROMPTS


@pytest.fixture(scope="module")
def pool_config(tiny_model_path: Path) -> ModelConfig:
    return ModelConfig(model=str(tiny_model_path), devices=("cpu", "cpu"), max_batch_size=8, max_queue=16,
                       request_timeout_s=60.0)


@pytest.fixture(scope="module")
def replica_models(pool_config: ModelConfig) -> tuple[list[Any], list[str]]:
    lines: list[str] = []
    models = load_replicas(pool_config, progress=lambda line: (lines.append(line),
                                                              logging.getLogger("tests").info("%s", line)))
    return models, lines


def make_pool(replica_models, config: ModelConfig, window: float = 0.02) -> ReplicaPool:
    # Fresh engines (and executors) per test over the shared weights: injected faults never leak.
    return ReplicaPool.from_models(replica_models[0], config, batch_window_s=window)


@pytest.fixture
async def pool(replica_models, pool_config) -> ReplicaPool:
    async with make_pool(replica_models, pool_config) as opened:
        yield opened


async def eventually(check, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while True:
            if check():
                return
            await asyncio.sleep(0.02)


# -- loading ---------------------------------------------------------------------------------------------------
def test_each_replica_is_its_own_model_loaded_in_sequence(replica_models) -> None:
    models, lines = replica_models
    assert len(models) == 2
    assert models[0].model is not models[1].model and models[0].processor is not models[1].processor
    assert all(str(m.device) == "cpu" and m.dtype == torch.float32 for m in models)
    first = [n for n, line in enumerate(lines) if line.startswith("replica 1/2 on cpu: ")]
    second = [n for n, line in enumerate(lines) if line.startswith("replica 2/2 on cpu: ")]
    assert first and second and max(first) < min(second)
    assert lines[-1].startswith("2 replicas ready in ")


def test_device_list_is_checked_with_clear_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_devices([" CUDA:0", "cuda:1 "]) == ("cuda:0", "cuda:1")
    for entries, expected in [(["gpu0"], "'gpu0' is not a device"), (["cuda:0", ""], "empty entry"),
                              (["cuda:x"], "not a device"), (["cpu", "cuda:0"], "mixes cpu and GPUs")]:
        with pytest.raises(ModelLoadError) as bad:
            parse_devices(entries)
        assert expected in bad.value.user_message and "IDEFICS_DEVICES" in bad.value.user_message
    assert resolve_devices(["cpu", "cpu"]) == ("cpu", "cpu")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError) as no_gpu:
        resolve_devices(["cuda:0"])
    assert no_gpu.value.user_message == "IDEFICS_DEVICES lists cuda:0, but no CUDA GPU is available"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_devices(["cuda", "cuda:1"]) == ("cuda:0", "cuda:1")
    with pytest.raises(ModelLoadError) as missing:
        resolve_devices(["cuda:0", "cuda:2"])
    assert missing.value.user_message == "IDEFICS_DEVICES lists cuda:2, but this machine has 2 CUDA GPUs " \
                                         "(cuda:0 to cuda:1)"


def test_a_replica_is_never_spread_but_one_model_on_cuda_is(monkeypatch: pytest.MonkeyPatch,
                                                            tiny_model_path: Path) -> None:
    """`device_map={"": "cuda:1"}` for a replica; `"auto"` (the 80B path) without `IDEFICS_DEVICES`."""
    from transformers import IdeficsForVisionText2Text

    from model_server.loading import load_model

    asked: list[dict[str, Any]] = []

    def from_pretrained(name: str, **kwargs: Any) -> Any:
        asked.append(kwargs)
        raise OSError("no GPU in this test")

    monkeypatch.setattr(IdeficsForVisionText2Text, "from_pretrained", from_pretrained)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = ModelConfig(model=str(tiny_model_path), device="cuda", dtype="bfloat16")
    for device in ("cuda:1", None):
        with pytest.raises(ModelLoadError):
            load_model(config, progress=lambda line: None, device=device)
    assert [kwargs["device_map"] for kwargs in asked] == [{"": "cuda:1"}, "auto"]


def test_settings_pass_the_device_list_down() -> None:
    from bot.settings import Settings

    def devices(value: str) -> tuple[str, ...]:
        return Settings(_env_file=None, idefics_devices=value).model_config_for().devices  # type: ignore[call-arg]

    assert devices("") == devices("  ") == ()
    assert devices("cuda:0, cuda:1") == ("cuda:0", "cuda:1")
    assert devices("cuda:0,") == ("cuda:0", "")  # refused with a clear message when the model loads


async def test_open_executor_builds_a_pool_for_several_devices_and_a_plain_executor_for_one(
        tiny_model_path: Path) -> None:
    from bot.pipeline.services import open_executor
    from bot.settings import Settings

    for devices, kind in (("cpu,cpu", ReplicaPool), ("cpu", Executor)):
        settings = Settings(_env_file=None, idefics_model=str(tiny_model_path),  # type: ignore[call-arg]
                            idefics_devices=devices)
        lines: list[str] = []
        async with open_executor(settings, progress=lines.append) as (executor, info):
            assert type(executor) is kind and info.instruct
            assert (await executor.generate(PROMPTS[0])).completion_tokens > 0
        assert any(line.startswith("replica 1/") for line in lines)
        assert any(line.startswith("replica 2/2 on cpu: ") for line in lines) == (kind is ReplicaPool)


# -- routing and results ---------------------------------------------------------------------------------------
def test_route_picks_the_least_loaded_healthy_replica() -> None:
    assert route([0, 0]) == 0
    assert route([1, 0]) == 1
    assert route([2, 2, 1]) == 2
    assert route([None, 5]) == 1
    assert route([None, None]) is None


def test_merge_stats() -> None:
    def part(waiting: int, running: int, completed: int, errors: dict[str, int]) -> ExecutorStats:
        return ExecutorStats(queue_length=waiting, running=running, completed=completed, failed=1,
                             median_latency_s=99.0, batches=completed, errors=errors, fault=None)

    merged = merge_stats([part(1, 2, 3, {"oom": 1, "watchdog": 0}), part(4, 1, 5, {"oom": 2, "watchdog": 1})],
                         [1.0, 2.0, 10.0], "replica 1/2 on cuda:0: stuck")
    assert (merged.queue_length, merged.running, merged.completed, merged.failed, merged.batches) == (5, 3, 8, 2, 8)
    assert merged.errors == {"oom": 3, "watchdog": 1}
    assert merged.median_latency_s == 2.0  # over all latencies, not a median of the replicas' medians
    assert merged.fault == "replica 1/2 on cuda:0: stuck"
    assert merge_stats([part(0, 0, 0, {})], [], None).median_latency_s is None


async def test_requests_spread_over_replicas_with_the_single_executors_answers(pool: ReplicaPool,
                                                                               executor: Executor) -> None:
    singles = [await executor.generate(p) for p in PROMPTS]
    results = await asyncio.gather(*(pool.generate(p) for p in PROMPTS))
    assert [r.text for r in results] == [r.text for r in singles]
    assert [r.completion_tokens for r in results] == [r.completion_tokens for r in singles]
    # Submitted together: 1st, 3rd, 5th to replica 0, 2nd and 4th to replica 1, each batched on its replica.
    records = pool.batches
    assert {r.replica for r in records} == {0, 1}
    assert [sum(r.size for r in records if r.replica == i) for i in (0, 1)] == [3, 2]
    assert [r.started for r in records] == sorted(r.started for r in records)
    assert sorted(r.batch_size for r in results) == sorted(r.size for r in records for _ in range(r.size))

    # A batch's results are handed back just before its replica counts it as no longer running.
    await eventually(lambda: pool.stats().running == 0)
    stats = pool.stats()
    parts = [s for _, s in pool.replica_stats()]
    assert stats.completed == 5 == sum(p.completed for p in parts) and all(p.completed for p in parts)
    assert (stats.queue_length, stats.running, stats.failed, stats.fault) == (0, 0, 0, None)
    assert stats.batches == len(records) and stats.errors == {"oom": 0, "error": 0, "timeout": 0, "watchdog": 0}
    assert stats.median_latency_s is not None and stats.median_latency_s > 0


async def test_status_shows_the_whole_pool(pool: ReplicaPool) -> None:
    from bot.discord_app.cogs.channel import ChannelCommands
    from bot.pipeline.conversation import ModelInfo

    await asyncio.gather(*(pool.generate(p) for p in PROMPTS[:4]))
    await eventually(lambda: pool.stats().running == 0)
    services = SimpleNamespace(model=ModelInfo(name="tiny", instruct=True), executor=pool,
                               settings=SimpleNamespace(generation_backend="local"))
    text = ChannelCommands.describe_status(SimpleNamespace(services=services))  # type: ignore[arg-type]
    assert "queue: 0 waiting, 0 running" in text
    assert f"batches run: {len(pool.batches)}" in text and "requests: 4 done, 0 failed" in text
    assert "fault" not in text


async def test_streaming_and_rank_on_the_pool(pool: ReplicaPool, executor: Executor) -> None:
    from model_server import tasks
    from tests.conftest import noise_image

    handle = pool.submit(PROMPTS[2])
    deltas = [d async for d in handle]
    assert "".join(deltas) == (await handle.result()).text

    categories = ["animals", "vegetables", "city landscape", "cars"]
    prompt = tasks.classify_prompt(noise_image(1), categories)
    ranked = await pool.rank(prompt, categories)
    expected = await executor.rank(prompt, categories)
    assert [r.category for r in ranked] == [r.category for r in expected]
    assert [r.logprob for r in ranked] == pytest.approx([r.logprob for r in expected], abs=1e-4)
    assert [b.kind for b in pool.batches][-1] == "rank"


# -- bounds, faults, closing -----------------------------------------------------------------------------------
async def test_busy_means_the_whole_pool_is_full(replica_models, pool_config) -> None:
    config = dataclasses.replace(pool_config, max_batch_size=1, max_queue=2)
    async with make_pool(replica_models, config, window=0) as pool:
        with stuck(pool.replicas[0].engine) as gate0, stuck(pool.replicas[1].engine) as gate1:
            running = [pool.submit(PROMPTS[0])]
            await eventually(lambda: pool.stats().running == 1)
            running.append(pool.submit(PROMPTS[1]))
            await eventually(lambda: pool.stats().running == 2)
            waiting = [pool.submit(PROMPTS[2]), pool.submit(PROMPTS[3])]
            assert [s.queue_length for _, s in pool.replica_stats()] == [1, 1]  # each below its own bound of 2
            with pytest.raises(Busy) as refused:
                pool.submit(PROMPTS[4])
            assert (refused.value.queue_length, refused.value.limit) == (2, 2)
            with pytest.raises(Busy):
                await pool.rank(PROMPTS[4], ["a", "b"])
            gate0.set()
            gate1.set()
            for handle in [*running, *waiting]:
                assert (await handle.result()).completion_tokens > 0


async def test_a_stuck_replica_is_routed_around_and_reported(replica_models, pool_config) -> None:
    config = dataclasses.replace(pool_config, watchdog_s=0.3, max_batch_size=1)
    fatal: list[str] = []
    async with make_pool(replica_models, config, window=0) as pool:
        pool.on_fatal = fatal.append
        with stuck(pool.replicas[0].engine) as gate:
            with pytest.raises(ModelStuck):
                await pool.generate(PROMPTS[0])
            assert pool.fault is not None and pool.fault.startswith("replica 1/2 on cpu: model thread stuck for ")
            stats = pool.stats()
            assert stats.fault == pool.fault and stats.errors["watchdog"] == 1 and stats.failed == 1
            # Replica 0 is idle (load 0) but faulted: everything goes to replica 1, and is answered.
            before = len(pool.batches)
            results = await asyncio.gather(*(pool.generate(p) for p in PROMPTS[1:4]))
            assert all(r.completion_tokens > 0 for r in results)
            assert {r.replica for r in pool.batches[before:]} == {1}
            # Stuck past twice the watchdog: the pool's hook hears it, naming the replica.
            await eventually(lambda: fatal)
            assert len(fatal) == 1 and fatal[0].startswith("replica 1/2 on cpu: model thread stuck for ")
            with stuck(pool.replicas[1].engine):
                with pytest.raises(ModelStuck):
                    await pool.generate(PROMPTS[1])
                with pytest.raises(ModelStuck) as refused:  # every replica faulted: refused at once
                    pool.submit(PROMPTS[2])
                assert "replica 1/2" in str(refused.value) and "replica 2/2" in str(refused.value)
            gate.set()
            await eventually(lambda: pool.fault is None)
        assert (await pool.generate(PROMPTS[0])).finish_reason is not FinishReason.CANCELLED
        pool.on_fatal = None
        assert all(replica.on_fatal is None for replica in pool.replicas)


async def test_close_lets_running_requests_finish_then_refuses(replica_models, pool_config) -> None:
    pool = make_pool(replica_models, pool_config)
    pool.start()
    handles = [pool.submit(p) for p in PROMPTS[:2]]
    await pool.close(grace_s=30)
    results = [await h.result() for h in handles]
    assert all(r.finish_reason is not FinishReason.CANCELLED for r in results)
    assert {r.replica for r in pool.batches} == {0, 1}
    with pytest.raises(ExecutorClosed):
        pool.submit(PROMPTS[0])
    with pytest.raises(ExecutorClosed):
        await pool.rank(PROMPTS[0], ["a"])

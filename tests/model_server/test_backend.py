"""Every generation backend keeps the one contract (`model_server.backend.GenerationBackend`).

mypy checks the signatures (each concrete module ends with a typed assignment to the protocol); this checks, at
run time, that each backend has every member the contract declares, and the shared pieces themselves.
"""

from __future__ import annotations

import asyncio
import inspect
import math

import pytest

from model_server.backend import END_OF_STREAM, GenerationBackend, Job, rank_by_scores, resolve_job
from model_server.config import ModelConfig, OpenAIConfig, TgiConfig
from model_server.executor import Executor
from model_server.openai import OpenAIExecutor
from model_server.remote.backend import RemoteExecutor
from model_server.replicas import ReplicaPool
from model_server.tgi import TgiExecutor
from model_server.types import Prompt

CONTRACT = sorted(
    name for name in {*vars(GenerationBackend), *GenerationBackend.__annotations__}
    if not name.startswith("_") or name in ("__aenter__", "__aexit__")
)


def test_the_contract_names_what_front_ends_use():
    assert {"submit", "generate", "rank", "stats", "batches", "fault", "alive", "health", "memory", "close",
            "add_observer", "remove_observer", "on_fatal", "__aenter__", "__aexit__"} <= set(CONTRACT)


def _backends(engine: object) -> list[object]:
    config = ModelConfig(model="tiny", watchdog_s=0)
    executor = Executor(engine, config)  # type: ignore[arg-type]
    return [executor, ReplicaPool([executor, Executor(engine, config)], config),  # type: ignore[arg-type]
            TgiExecutor(TgiConfig(url="http://127.0.0.1:9")), OpenAIExecutor(OpenAIConfig(url="http://127.0.0.1:9"))]


@pytest.mark.parametrize("kind", ["executor", "pool", "tgi", "openai"])
async def test_each_backend_has_every_member_of_the_contract(kind: str):
    backend = dict(zip(["executor", "pool", "tgi", "openai"], _backends(object()), strict=True))[kind]
    missing = [name for name in CONTRACT if not hasattr(backend, name)]
    assert missing == []
    for name in CONTRACT:
        declared = inspect.getattr_static(GenerationBackend, name, None)
        if inspect.iscoroutinefunction(declared):
            assert inspect.iscoroutinefunction(getattr(backend, name)), name
    if isinstance(backend, RemoteExecutor):
        await backend.close()


@pytest.mark.parametrize(("scores", "order"), [
    ([0.0, -1.0, -2.0], ["a", "b", "c"]),
    ([-5.0, -1.0, -3.0], ["b", "c", "a"]),
    ([-1000.0, -1001.0, -1002.0], ["a", "b", "c"]),  # large negative log-likelihoods do not underflow
])
def test_rank_by_scores(scores: list[float], order: list[str]):
    ranked = rank_by_scores(["a", "b", "c"], scores)
    assert [r.category for r in ranked] == order
    assert math.isclose(sum(r.probability for r in ranked), 1.0)
    by_name = {r.category: r for r in ranked}
    assert math.isclose(by_name["a"].probability / by_name["b"].probability, math.exp(scores[0] - scores[1]))


async def test_resolve_job_settles_once_and_ends_the_stream():
    loop = asyncio.get_running_loop()
    job = Job(id=1, kind="generate", prompt=Prompt(items=("hi",)), categories=(), future=loop.create_future(),
              deltas=asyncio.Queue(), submitted=0.0, deadline=1.0)
    resolve_job(job, "first")
    resolve_job(job, RuntimeError("late"))  # a late outcome never replaces the first
    assert job.future.result() == "first" and job.started_event.is_set()
    assert job.deltas.get_nowait() is END_OF_STREAM

"""Metrics and health (`bot.ops.metrics`) and JSON logs (`bot.ops.log_format`).

The metrics server runs on a free port next to the real bot logged in to the fake Discord; `/metrics` is parsed
with prometheus-client's own parser. One test runs the real `idefics-bot run` process with `METRICS_PORT`,
`LOG_FORMAT=json` and `LOG_LEVEL=DEBUG`, and reads its log line by line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import signal
import socket
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.discord_app.client import IdeficsBot
from bot.ops.log_format import JsonFormatter, use_log_format
from bot.ops.logging_setup import REDACTED, install_log_redaction, uninstall_log_redaction
from bot.ops.metrics import BatchSizes, MetricsServer, MetricsServerError
from bot.pipeline.services import Services
from model_server.backend import BatchRecord
from model_server.config import ModelConfig
from model_server.errors import Busy, ModelStuck
from model_server.executor import Executor
from model_server.replicas import ReplicaPool
from model_server.tgi import TgiConfig, TgiExecutor
from model_server.types import GenerationParams, Prompt
from tests.bot.discord_app.conftest import RunningBot, answer_to, eventually
from tests.conftest import noise_image
from tests.fakes.discord_api import FakeDiscord
from tests.fakes.faults import stuck_forward
from tests.fakes.tgi import FakeTgi
from tests.system.reliability.bot_process import bot_env, bot_process, final_answer

Families = dict[str, Any]
SECRET_PHRASE = "periwinkle walrus"
"""Message text that must appear in no log line and no metric."""


# -- helpers --------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def metrics_server(executor: Any, client: Any) -> AsyncIterator[MetricsServer]:
    server = MetricsServer(executor, client, port=0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


async def scrape(port: int) -> tuple[Families, str]:
    status, text = await get(port, "/metrics")
    assert status == 200
    return {family.name: family for family in text_string_to_metric_families(text)}, text


async def healthz(port: int) -> tuple[int, dict[str, str]]:
    status, text = await get(port, "/healthz")
    return status, json.loads(text)


def value(families: Families, sample: str, **labels: str) -> float:
    """The value of one sample (`idefics_requests_refused_total`, ...), 0 when it is not there yet."""
    return total(families, sample, **labels)


def total(families: Families, sample: str, **labels: str) -> float:
    """Sum of the samples so named whose labels include `labels` (e.g. answers of every finish reason)."""
    return sum(s.value for family in families.values() for s in family.samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PROMPT = Prompt(items=("User:", noise_image(3), "What is this?<end_of_utterance>\nAssistant:"),
                params=GenerationParams(max_new_tokens=4))


# -- the bot against the fake Discord -------------------------------------------------------------
async def test_metrics_move_when_a_mention_is_answered(running_bot: RunningBot) -> None:
    fake, world = running_bot.fake, running_bot.world
    async with metrics_server(running_bot.services.executor, running_bot.bot) as server:
        before, _ = await scrape(server.port)
        assert value(before, "idefics_discord_connected") == 1
        assert total(before, "idefics_requests_answered_total") == 0
        asked = await fake.send_message_as(world.member, world.general, f"what is a {SECRET_PHRASE}?",
                                           mentions_bot=True)
        await answer_to(running_bot, world.general, asked)
        after, text = await scrape(server.port)
        assert await healthz(server.port) == (200, {"status": "ok"})

    assert total(after, "idefics_requests_answered_total") == 1
    for histogram in ("idefics_request_latency_seconds", "idefics_time_to_first_token_seconds",
                      "idefics_generation_tokens_per_second", "idefics_queue_wait_seconds"):
        assert value(after, f"{histogram}_count") == 1, histogram
        assert value(after, f"{histogram}_sum") > 0, histogram
    assert value(after, "idefics_request_latency_seconds_bucket", le="+Inf") == 1
    assert value(after, "idefics_generated_tokens_total") > 0
    assert value(after, "idefics_prompt_tokens_total") > 0
    assert value(after, "idefics_batch_size_count") == 1 and value(after, "idefics_batch_size_sum") == 1
    assert value(after, "idefics_batch_size_bucket", le="1.0") == 1
    # Scrape-time gauges: idle again, healthy.
    assert after["idefics_queue_length"].samples[0].value == 0
    assert after["idefics_requests_running"].samples[0].value == 0
    assert value(after, "idefics_model_fault") == 0
    assert {s.labels["kind"] for s in after["idefics_model_errors"].samples} == {"oom", "error", "timeout",
                                                                                  "watchdog"}
    assert total(after, "idefics_model_errors_total") == 0
    assert after["idefics_gpu_memory_allocated_bytes"].type == "gauge"  # no samples without CUDA
    assert {s.labels["result"] for s in after["idefics_vision_cache_lookups"].samples} == {"hit", "miss"}
    assert after["idefics_vision_cache_bytes"].type == "gauge"
    assert value(after, "idefics_requests_refused_total") == 0
    # Nothing users wrote becomes a label.
    assert SECRET_PHRASE not in text and str(world.member.id) not in text


async def test_healthz_follows_the_discord_connection(fake_discord: FakeDiscord, services: Services) -> None:
    bot = IdeficsBot(services, guild_ready_timeout=0.01)
    async with metrics_server(services.executor, bot) as server:
        assert await healthz(server.port) == (503, {"status": "unavailable", "discord": "not connected yet",
                                                    "model": "ok"})
        async with fake_discord.running(bot):
            assert await healthz(server.port) == (200, {"status": "ok"})
            families, _ = await scrape(server.port)
            assert value(families, "idefics_discord_connected") == 1
        status, body = await healthz(server.port)
        assert (status, body["discord"]) == (503, "closed")
        families, _ = await scrape(server.port)
        assert value(families, "idefics_discord_connected") == 0


async def test_a_full_queue_and_a_stuck_model_show_and_fail_the_health_check(
    running_bot: RunningBot, engine: Any, model_config: ModelConfig
) -> None:
    config = dataclasses.replace(model_config, watchdog_s=1.5, max_batch_size=1, max_queue=1)
    async with Executor(engine, config, batch_window_s=0) as executor:
        async with metrics_server(executor, running_bot.bot) as server:
            port = server.port
            with stuck_forward(engine) as gate:
                running = asyncio.ensure_future(executor.generate(PROMPT))
                await eventually(lambda: executor.stats().running == 1, 10, "the first request running")
                waiting = asyncio.ensure_future(executor.generate(PROMPT))
                await eventually(lambda: executor.stats().queue_length == 1, 10, "the second request queued")
                with pytest.raises(Busy):
                    executor.submit(PROMPT)
                families, _ = await scrape(port)
                assert value(families, "idefics_queue_length") == 1
                assert value(families, "idefics_requests_running") == 1
                assert value(families, "idefics_requests_refused_total") == 1
                # The watchdog declares the model stuck: both requests fail, the health check says why.
                outcomes = await asyncio.gather(running, waiting, return_exceptions=True)
                assert all(isinstance(o, ModelStuck) for o in outcomes), outcomes
                status, body = await healthz(port)
                assert status == 503 and body["discord"] == "ok"
                assert body["model"].startswith("model thread stuck for ")
                families, _ = await scrape(port)
                assert value(families, "idefics_model_fault") == 1
                assert value(families, "idefics_model_errors_total", kind="watchdog") == 1
                assert value(families, "idefics_requests_failed_total", error="model_stuck") == 2
                gate.set()  # the stuck call returns: the fault clears
                await eventually(lambda: executor.fault is None, 10, "the fault to clear")
            assert await healthz(port) == (200, {"status": "ok"})
            await executor.close()
            status, body = await healthz(port)
            assert (status, body["model"]) == (503, "model thread not running")
        assert server.requests.observe not in executor.observers  # stop() detached it


async def test_text_generation_inference_health_and_outcomes(fake_discord: FakeDiscord, services: Services) -> None:
    bot = IdeficsBot(services, guild_ready_timeout=0.01)
    async with FakeTgi() as fake_tgi:
        config = TgiConfig(url=fake_tgi.url, connect_timeout_s=2.0, max_retries=0, start_wait_s=0.0)
        async with TgiExecutor(config) as tgi, fake_discord.running(bot), metrics_server(tgi, bot) as server:
            tgi.health_interval_s = 0.0
            assert await healthz(server.port) == (200, {"status": "ok"})
            assert (await tgi.generate(PROMPT)).completion_tokens > 0
            families, _ = await scrape(server.port)
            assert total(families, "idefics_requests_answered_total") == 1
            assert value(families, "idefics_time_to_first_token_seconds_count") == 1
            assert "idefics_gpu_memory_allocated_bytes" in families  # empty: no local model
            fake_tgi.healthy = False
            status, body = await healthz(server.port)
            assert (status, body["model"]) == (503, "text-generation-inference /health: 503")


async def test_a_taken_port_is_one_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = MetricsServer(None, None, port=taken.getsockname()[1])  # type: ignore[arg-type]
        with pytest.raises(MetricsServerError, match=r"cannot listen on 127\.0\.0\.1:"):
            await server.start()
        await server.stop()


def test_batch_sizes_count_each_batch_once_even_after_the_record_drops_old_ones() -> None:
    record: deque[BatchRecord] = deque(maxlen=3)
    sizes = BatchSizes((1, 2, 4))
    record.extend([BatchRecord(1, "generate", 0.0), BatchRecord(3, "generate", 1.0)])
    sizes.update(record)
    sizes.update(list(record))  # nothing new (a replica pool hands out fresh copies of its records)
    assert (sizes.counts, sizes.total) == ([1, 0, 1, 0], 4)
    record.extend([BatchRecord(2, "generate", 2.0), BatchRecord(8, "generate", 3.0)])  # the first one drops
    sizes.update(record)
    assert (sizes.counts, sizes.total) == ([1, 1, 1, 1], 14)
    record.extend(BatchRecord(1, "generate", 4.0 + i) for i in range(5))  # more than the record keeps
    sizes.update(record)
    assert sizes.counts == [4, 1, 1, 1]  # the three still kept
    buckets = {s.labels["le"]: s.value for s in sizes.metric().samples if s.name.endswith("_bucket")}
    assert buckets == {"1.0": 4, "2.0": 5, "4.0": 6, "+Inf": 7}


async def test_a_replica_pool_is_measured_through_its_replicas(
    running_bot: RunningBot, engine: Any, model_config: ModelConfig
) -> None:
    replicas = [Executor(engine, model_config, batch_window_s=0) for _ in range(2)]
    async with ReplicaPool(replicas, model_config, ["cpu", "cpu"]) as pool, \
            metrics_server(pool, running_bot.bot) as server:
        for _ in range(2):  # one at a time: both replicas share the session's engine
            await pool.generate(PROMPT)
        await scrape(server.port)
        families, _ = await scrape(server.port)  # a second scrape counts no batch twice
        assert total(families, "idefics_requests_answered_total") == 2
        assert value(families, "idefics_batch_size_count") == 2
        assert await healthz(server.port) == (200, {"status": "ok"})
    assert all(server.requests.observe not in r.observers for r in replicas)


# -- JSON logs ------------------------------------------------------------------------------------
def test_json_lines_parse_and_never_carry_the_token() -> None:
    token = "MTIzNDU2.fake.token-value"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.json_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    install_log_redaction([token])
    try:
        logger.info("request %d done in %.2fs", 12, 0.5, extra={"request": 12, "channel": "42"})
        logger.warning("login with %s failed", token)
        logger.info("configured", extra={"header": f"Bot {token}"})
        try:
            raise RuntimeError(f"bad token {token}")
        except RuntimeError:
            logger.exception("it failed")
        # discord.py at DEBUG logs whole gateway events: summarised, the message text never shows.
        logging.getLogger("discord.gateway").addHandler(handler)
        logging.getLogger("discord.gateway").setLevel(logging.DEBUG)
        logging.getLogger("discord.gateway").debug("For Shard ID %s: WebSocket Event: %s", 0, {
            "op": 0, "t": "MESSAGE_CREATE", "s": 3, "d": {"content": SECRET_PHRASE}})
    finally:
        uninstall_log_redaction()
        logger.removeHandler(handler)
        logging.getLogger("discord.gateway").removeHandler(handler)
        logging.getLogger("discord.gateway").setLevel(logging.NOTSET)
    output = stream.getvalue()
    assert token not in output and SECRET_PHRASE not in output
    lines = [json.loads(line) for line in output.splitlines()]
    assert len(lines) == 5
    first = lines[0]
    assert set(first) == {"time", "level", "logger", "message", "request", "channel"}
    assert (first["level"], first["logger"]) == ("INFO", "tests.json_logs")
    assert first["message"] == "request 12 done in 0.50s"
    assert (first["request"], first["channel"]) == (12, "42")
    assert first["time"].endswith("+00:00")
    assert lines[1]["message"] == f"login with {REDACTED} failed"
    assert lines[2]["header"] == f"Bot {REDACTED}"
    assert REDACTED in lines[3]["exception"] and lines[3]["exception"].startswith("Traceback")
    assert lines[4]["message"] == "For Shard ID 0: WebSocket Event: <op=0 t=MESSAGE_CREATE s=3>"


def test_use_log_format_sets_every_root_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)  # put back as it was afterwards
    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    root.addHandler(handler)
    try:
        use_log_format("text")  # the default: logging.basicConfig's format stays
        assert handler.formatter is None
        use_log_format("json")
        assert isinstance(handler.formatter, JsonFormatter)
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # no progress bar between JSON lines
    finally:
        root.removeHandler(handler)
        logging.captureWarnings(False)


# -- the real process -----------------------------------------------------------------------------
async def test_idefics_bot_run_serves_metrics_and_writes_json_logs(
    fake_discord: FakeDiscord, tiny_model_path: Path, tmp_path: Path
) -> None:
    fake, world = fake_discord, fake_discord.world
    port = free_port()
    env = bot_env(fake, tiny_model_path, f"sqlite+aiosqlite:///{tmp_path / 'bot.sqlite3'}",
                  METRICS_PORT=port, LOG_FORMAT="json", LOG_LEVEL="DEBUG", MAX_NEW_TOKENS=6)
    async with bot_process(env, tmp_path, "bot") as bot:
        await bot.wait_ready()
        await eventually(lambda: _healthy(port), 30, "/healthz 200")
        asked = await fake.send_message_as(world.member, world.general, f"what is a {SECRET_PHRASE}?",
                                           mentions_bot=True)
        await fake.wait_for_message(world.general, final_answer(asked), 60)
        families: Families = {}

        async def answered() -> bool:
            nonlocal families
            families, _ = await scrape(port)
            return total(families, "idefics_requests_answered_total") == 1

        await eventually(answered, 30, "the answer counted")
        assert value(families, "idefics_request_latency_seconds_count") == 1
        assert value(families, "idefics_discord_connected") == 1
        assert await bot.stop(signal.SIGTERM) == 0
    with pytest.raises(aiohttp.ClientConnectionError):  # the server stopped with the bot
        await get(port, "/healthz")
    log = bot.log()
    assert fake.token not in log and SECRET_PHRASE not in log
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    messages = [line["message"] for line in lines]
    assert any(m.startswith("metrics at http://127.0.0.1:") for m in messages)
    assert any(line["level"] == "DEBUG" and line["logger"].startswith("discord.") for line in lines)


async def _healthy(port: int) -> bool:
    try:
        status, _ = await get(port, "/healthz")
    except aiohttp.ClientConnectionError:
        return False
    return status == 200

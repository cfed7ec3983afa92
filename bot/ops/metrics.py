"""Metrics and health of a running bot: `/metrics` (Prometheus text format) and `/healthz`, on `METRICS_PORT`.

`idefics-bot run` starts the server inside its event loop when `METRICS_PORT` is set (on `METRICS_HOST`,
127.0.0.1 by default) and stops it at shutdown. The metrics live in a registry of their own, not
prometheus-client's global one, so several bots (tests) never share a counter.

Two sources:
- observations, from the executor's observer hook (`add_observer`: each request's result or failure):
  answered / refused / failed / cancelled counts, latency, queue wait, time to first token, tokens per second,
  generated and prompt tokens;
- scrape-time reads, by `LiveCollector`: queue length and running requests (`executor.stats()`), the
  executor's errors by kind, its fault, the batch sizes of batches run since the last scrape
  (`executor.batches`), GPU memory (`executor.memory()`) and whether Discord is connected.

No metric has a user, channel or message label: labels are finish reasons, error kinds and device names.

`/healthz`: 200 `{"status": "ok"}` only when Discord is connected (ready, not closed, every shard up, not
shutting down) and the model answers (`executor.health()`: no fault and its model thread alive; on
text-generation-inference, its `/health` answered 200 at the last check); else 503 with the state of
each part, e.g. `{"status": "unavailable", "discord": "not connected yet", "model": "ok"}`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import discord
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from bot.settings import Settings
from model_server.backend import BatchRecord, GenerationBackend
from model_server.errors import Busy
from model_server.types import FinishReason, GenerationResult

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
TOKENS_PER_SECOND_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 200.0, 500.0)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
OK = "ok"


class MetricsServerError(Exception):
    """The metrics server could not start (the port is taken, the host is not this machine's): one line."""


# -- observations ---------------------------------------------------------------------------------
class RequestMetrics:
    """The metrics fed by the executor's outcome hook (`observe`); thread-safe, as prometheus-client is."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.answered = Counter("idefics_requests_answered", "Requests the model answered, by finish reason.",
                                ["finish_reason"], registry=registry)
        self.refused = Counter("idefics_requests_refused", "Requests refused at once: the queue was full (Busy).",
                               registry=registry)
        self.failed = Counter("idefics_requests_failed", "Requests that failed, by error (exception kind).",
                              ["error"], registry=registry)
        self.cancelled = Counter("idefics_requests_cancelled", "Requests cancelled before their end.",
                                 registry=registry)
        self.latency = Histogram("idefics_request_latency_seconds",
                                 "Submission to last token, per answered request.", buckets=LATENCY_BUCKETS,
                                 registry=registry)
        self.queue_wait = Histogram("idefics_queue_wait_seconds", "Submission to the start of its batch.",
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.first_token = Histogram("idefics_time_to_first_token_seconds", "Submission to the first token.",
                                     buckets=FIRST_TOKEN_BUCKETS, registry=registry)
        self.tokens_per_second = Histogram(
            "idefics_generation_tokens_per_second",
            "Generated tokens per second of generation (batch start to last token), per request.",
            buckets=TOKENS_PER_SECOND_BUCKETS, registry=registry)
        self.generated_tokens = Counter("idefics_generated_tokens", "Tokens generated (rate() it for throughput).",
                                        registry=registry)
        self.prompt_tokens = Counter("idefics_prompt_tokens", "Prompt tokens of answered requests.",
                                     registry=registry)

    def observe(self, outcome: GenerationResult | Exception) -> None:
        """One request's outcome: the executor calls this (`add_observer`)."""
        if isinstance(outcome, Busy):
            self.refused.inc()
        elif isinstance(outcome, Exception):
            self.failed.labels(error_kind(outcome)).inc()
        elif outcome.finish_reason is FinishReason.CANCELLED:
            self.cancelled.inc()
        else:
            self._answered(outcome)

    def _answered(self, result: GenerationResult) -> None:
        self.answered.labels(result.finish_reason.value).inc()
        self.latency.observe(result.total_s)
        self.queue_wait.observe(result.queued_s)
        if result.first_token_s is not None:
            self.first_token.observe(result.first_token_s)
        self.generated_tokens.inc(result.completion_tokens)
        self.prompt_tokens.inc(result.prompt_tokens)
        generating_s = result.total_s - result.queued_s
        if result.completion_tokens > 0 and generating_s > 0:
            self.tokens_per_second.observe(result.completion_tokens / generating_s)


def error_kind(exc: BaseException) -> str:
    """The exception's class in snake case ("RequestTimeout" -> "request_timeout"): a small, fixed set."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


# -- scrape-time reads ----------------------------------------------------------------------------
class BatchSizes:
    """A histogram of the sizes of the batches the executor ran, read from its `batches` record at each scrape.

    A batch is new when it started after the newest one counted so far (`BatchRecord.started`, monotonic): this
    holds for a replica pool too, whose `batches` are fresh records merged from its replicas at each read. The
    executor keeps the last 1000 batches: scraped more often than that many batches run (every 15 s at 66
    batches/s), none is missed. The first scrape counts the batches run before it too.
    """

    def __init__(self, buckets: Sequence[int] = BATCH_SIZE_BUCKETS) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket (not cumulative), the last one +Inf
        self.total = 0.0
        self._newest = float("-inf")

    def update(self, records: Iterable[BatchRecord]) -> None:
        new = [record for record in list(records) if record.started > self._newest]
        for record in new:
            index = next((i for i, bound in enumerate(self.bounds) if record.size <= bound), len(self.bounds))
            self.counts[index] += 1
            self.total += record.size
            self._newest = max(self._newest, record.started)

    def metric(self) -> HistogramMetricFamily:
        cumulative, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            cumulative.append((_bound_text(bound), running))
        return HistogramMetricFamily("idefics_batch_size", "Rows in the batch each time requests started (joined it).",
                                     buckets=cumulative, sum_value=self.total)


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class LiveCollector(Collector):
    """The values read when Prometheus scrapes: queue, running, errors, fault, batches, GPU memory, Discord."""

    def __init__(self, executor: GenerationBackend | None, client: discord.Client) -> None:
        self.executor = executor
        self.client = client
        self.batch_sizes = BatchSizes()

    def collect(self) -> Iterator[Metric]:
        executor = self.executor
        connected = GaugeMetricFamily("idefics_discord_connected",
                                      "1 while connected to Discord (every shard), else 0.")
        connected.add_metric([], 0 if discord_problem(self.client) else 1)
        yield connected
        if executor is None:
            return
        stats = executor.stats()
        yield GaugeMetricFamily("idefics_queue_length", "Requests waiting for the model.", value=stats.queue_length)
        yield GaugeMetricFamily("idefics_requests_running", "Requests being generated now.", value=stats.running)
        yield GaugeMetricFamily("idefics_model_fault",
                                "1 while the executor reports a fault (model thread stuck, TGI unreachable).",
                                value=1 if stats.fault else 0)
        errors = CounterMetricFamily("idefics_model_errors", "Faults the executor saw, by kind.", labels=["kind"])
        for kind, count in sorted(stats.errors.items()):
            errors.add_metric([kind], count)
        yield errors
        if stats.vision_cache is not None:
            cache = stats.vision_cache
            lookups = CounterMetricFamily("idefics_vision_cache_lookups",
                                          "Image-feature cache lookups, by result.", labels=["result"])
            lookups.add_metric(["hit"], cache.hits)
            lookups.add_metric(["miss"], cache.misses)
            yield lookups
            yield GaugeMetricFamily("idefics_vision_cache_bytes", "Bytes of image features kept.", value=cache.bytes)
        self.batch_sizes.update(executor.batches)
        yield self.batch_sizes.metric()
        memory = GaugeMetricFamily("idefics_gpu_memory_allocated_bytes",
                                   "Bytes of tensors allocated on each GPU (torch.cuda.memory_allocated).",
                                   labels=["device"])
        for device, used in sorted(executor.memory().items()):
            memory.add_metric([device], used)
        yield memory


# -- health ---------------------------------------------------------------------------------------
def discord_problem(client: discord.Client) -> str | None:
    """What keeps the Discord connection from being up, None when it is (every shard, for a sharded bot)."""
    if client.is_closed():
        return "closed"
    if not client.is_ready():
        return "not connected yet"
    if isinstance(client, discord.AutoShardedClient):
        shards = client.shards
        down = sorted(shard_id for shard_id, shard in shards.items() if shard.is_closed())
        if not shards or down:
            return f"shards not connected: {down}" if down else "no shard connected"
    elif client.ws is None or not client.ws.open:
        return "gateway connection lost, reconnecting"
    return None


@dataclass(frozen=True)
class Health:
    discord: str
    """"ok", or what is wrong with the Discord connection."""
    model: str
    """"ok", or why the model does not answer."""

    @property
    def ok(self) -> bool:
        return self.discord == OK and self.model == OK

    def body(self) -> dict[str, str]:
        if self.ok:
            return {"status": "ok"}
        return {"status": "unavailable", "discord": self.discord, "model": self.model}


class HealthCheck:
    """Whether the bot can answer: Discord connected and the model answering (see the module's docstring)."""

    def __init__(self, executor: GenerationBackend | None, client: discord.Client) -> None:
        self.executor = executor
        self.client = client

    async def check(self) -> Health:
        problem = discord_problem(self.client)
        if problem is None and getattr(self.client, "draining", False):
            problem = "shutting down"
        return Health(discord=problem or OK, model=await self.model_problem() or OK)

    async def model_problem(self) -> str | None:
        if self.executor is None:
            return "no model loaded"
        return await self.executor.health()


# -- the server -----------------------------------------------------------------------------------
class MetricsServer:
    """`/metrics` and `/healthz` for one bot and its executor, on the running event loop.

    `await start()` registers the observer and listens; `await stop()` undoes both. `port=0` takes a free port
    (see `port` once started).
    """

    def __init__(self, executor: GenerationBackend | None, client: discord.Client, *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.executor = executor
        self.host = host
        self.requested_port = port
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(self.registry)
        self.live = LiveCollector(executor, client)
        self.registry.register(self.live)
        self.health = HealthCheck(executor, client)
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        """The port listened on (the requested one, or the free one `port=0` found)."""
        assert self._runner is not None, "not started"
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.requested_port).start()
        except OSError as exc:
            await runner.cleanup()
            raise MetricsServerError(f"the metrics server cannot listen on {self.host}:{self.requested_port} "
                                     f"({exc.strerror or exc}): set METRICS_PORT to a free port, or unset it") from exc
        self._runner = runner
        if self.executor is not None:
            self.executor.add_observer(self.requests.observe)
        log.info("metrics at http://%s:%d/metrics, health at /healthz", self.host, self.port)

    async def stop(self) -> None:
        if self.executor is not None:
            self.executor.remove_observer(self.requests.observe)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        # Scrape-time reads are quick (counters, a lock held for microseconds): done on the loop.
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        health = await self.health.check()
        return web.json_response(health.body(), status=200 if health.ok else 503)


async def start_metrics_server(settings: Settings, executor: GenerationBackend | None,
                               client: discord.Client) -> MetricsServer | None:
    """The started server when `METRICS_PORT` is set, else None; raises `MetricsServerError` (one line)."""
    if settings.metrics_port is None:
        return None
    server = MetricsServer(executor, client, host=settings.metrics_host, port=settings.metrics_port)
    await server.start()
    return server

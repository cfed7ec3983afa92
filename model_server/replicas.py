"""Several model replicas in one process: one per device, each with its own `Executor` and model thread.

`IDEFICS_DEVICES=cuda:0,cuda:1` loads the whole model once per listed device (`device_map={"": device}`, never
spread) and serves the replicas as one `ReplicaPool`, which keeps the same `backend.GenerationBackend` contract
as a single executor. A checkpoint too large for
one GPU (80B) does not use this: without `IDEFICS_DEVICES` one model is spread over all GPUs (`loading`).

Routing: each request goes to the healthy replica with the fewest requests waiting plus running (ties: the lowest
index), so requests that arrive together spread over the replicas and each replica batches its own share. A
replica whose model thread the watchdog declared stuck (`fault`) gets nothing new until it recovers; when every
replica is stuck, `submit` raises `ModelStuck`, as a single executor does. `submit` and `rank` run on the event
loop and choosing a replica and queueing on it happen with nothing in between.

Queue bound: `config.max_queue` bounds the requests waiting in the whole pool, not on each replica, so `Busy`
means the pool is full and `MAX_QUEUE` keeps the meaning it has with one GPU ("most requests waiting"). Requests
only wait while every replica is busy, so a bound per replica would add nothing but a larger total.

A replica stuck past twice the watchdog calls the pool's `on_fatal` (the reason names the replica): a GPU that
hangs that long does not come back, and restarting the process (crash recovery answers the cut-off requests) is
better than serving on with part of the pool lost for good.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from model_server.backend import BatchRecord, ExecutorStats, GenerationBackend, Observer, RequestHandle
from model_server.config import ModelConfig
from model_server.errors import Busy, ExecutorClosed, ModelLoadError, ModelStuck
from model_server.executor import Executor
from model_server.types import GenerationResult, Prompt, RankedCategory
from model_server.vision_cache import VisionCacheStats

if TYPE_CHECKING:
    from model_server.loading import LoadedModel, Progress

log = logging.getLogger(__name__)

_DEVICE = re.compile(r"cpu|cuda(?::(\d+))?")
_EXAMPLE = "list cpu, cuda or cuda:N separated by commas, e.g. IDEFICS_DEVICES=cuda:0,cuda:1"


@dataclass(frozen=True)
class ReplicaBatchRecord(BatchRecord):
    """A batch record of the pool: which replica ran it."""

    replica: int = 0
    """Index into `ReplicaPool.replicas` (0 is the first device listed)."""


# -- devices -------------------------------------------------------------------------------------------------
def parse_devices(entries: Sequence[str]) -> tuple[str, ...]:
    """Check the form of each entry (`cpu`, `cuda`, `cuda:N`) without asking torch; lower-cased and stripped."""
    devices = tuple(entry.strip().lower() for entry in entries)
    for entry, device in zip(entries, devices, strict=True):
        if not device:
            raise ModelLoadError(f"IDEFICS_DEVICES has an empty entry: {_EXAMPLE}",
                                 detail=f"IDEFICS_DEVICES has an empty entry: {list(entries)!r}")
        if _DEVICE.fullmatch(device) is None:
            raise ModelLoadError(f"IDEFICS_DEVICES: {entry.strip()!r} is not a device; {_EXAMPLE}",
                                 detail=f"IDEFICS_DEVICES entry {entry!r} is not a device")
    if "cpu" in devices and any(d != "cpu" for d in devices):
        raise ModelLoadError("IDEFICS_DEVICES mixes cpu and GPUs: list GPUs only (a CPU replica would "
                             "answer far slower than the others)",
                             detail=f"IDEFICS_DEVICES mixes cpu and cuda: {','.join(devices)}")
    return devices


def resolve_devices(entries: Sequence[str]) -> tuple[str, ...]:
    """`parse_devices`, then check each GPU exists; `cuda` becomes the current GPU (`cuda:0` unless set)."""
    import torch

    devices = parse_devices(entries)
    if not devices or devices[0] == "cpu":
        return devices
    if not torch.cuda.is_available():
        raise ModelLoadError(f"IDEFICS_DEVICES lists {devices[0]}, but no CUDA GPU is available",
                             detail=f"IDEFICS_DEVICES={','.join(devices)} but torch sees no CUDA device")
    count = torch.cuda.device_count()
    resolved: list[str] = []
    for device in devices:
        index = _DEVICE.fullmatch(device).group(1)  # type: ignore[union-attr]
        number = torch.cuda.current_device() if index is None else int(index)
        if number >= count:
            seen = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise ModelLoadError(f"IDEFICS_DEVICES lists {device}, but this machine has {count} CUDA "
                                 f"GPU{'s' if count != 1 else ''} ({seen})",
                                 detail=f"IDEFICS_DEVICES lists {device}, torch sees {count} CUDA devices")
        resolved.append(f"cuda:{number}")
    return tuple(resolved)


def load_replicas(config: ModelConfig, progress: Progress | None = None) -> list[LoadedModel]:
    """One `LoadedModel` per entry of `config.devices`, loaded one after the other (each on its own device).

    Each replica gets its own processor too: a fast tokenizer used from two model threads at once can fail
    ("Already borrowed"). All replicas compute in one dtype, so any replica gives the same greedy answer.
    """
    import torch

    from model_server.loading import load_model, resolve_dtype

    say = progress or (lambda line: log.info("%s", line))
    devices = resolve_devices(config.devices)
    if not devices:
        raise ModelLoadError("IDEFICS_DEVICES lists no device", detail="load_replicas without devices")
    dtypes = {resolve_dtype(config.dtype, device) for device in devices}
    # Only GPUs of different generations disagree ("auto": bfloat16 on some, float16 on others).
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float16
    config = dataclasses.replace(config, dtype=str(dtype).removeprefix("torch."))  # type: ignore[arg-type]
    started = time.monotonic()
    loaded: list[LoadedModel] = []
    for number, device in enumerate(devices, 1):
        loaded.append(load_model(config, _prefixed(say, f"replica {number}/{len(devices)} on {device}: "),
                                 device=device))
    if len(devices) > 1:
        say(f"{len(devices)} replicas ready in {time.monotonic() - started:.1f}s")
    return loaded


def _prefixed(say: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    return lambda line: say(prefix + line)


# -- the pool --------------------------------------------------------------------------------------------------
def route(loads: Sequence[int | None]) -> int | None:
    """The replica to take the next request: the least load (waiting + running), ties to the lowest index;
    None marks a faulted replica, never chosen. None when every replica is faulted."""
    healthy = [(load, index) for index, load in enumerate(loads) if load is not None]
    return min(healthy)[1] if healthy else None


def merge_stats(parts: Sequence[ExecutorStats], latencies: Sequence[float], fault: str | None) -> ExecutorStats:
    """The pool's stats: counts summed, errors summed by kind, the median over every replica's latencies."""
    errors: dict[str, int] = {}
    for part in parts:
        for kind, count in part.errors.items():
            errors[kind] = errors.get(kind, 0) + count
    return ExecutorStats(
        queue_length=sum(p.queue_length for p in parts), running=sum(p.running for p in parts),
        completed=sum(p.completed for p in parts), failed=sum(p.failed for p in parts),
        median_latency_s=statistics.median(latencies) if latencies else None,
        batches=sum(p.batches for p in parts), errors=errors, fault=fault,
        vision_cache=merge_vision_cache([p.vision_cache for p in parts if p.vision_cache is not None]),
        latencies_s=tuple(latencies),
    )


def merge_vision_cache(parts: Sequence[VisionCacheStats]) -> VisionCacheStats | None:
    """Every replica's image-feature cache counted as one (each replica keeps its own)."""
    if not parts:
        return None
    return VisionCacheStats(*(sum(getattr(p, f.name) for p in parts) for f in dataclasses.fields(VisionCacheStats)))


class ReplicaPool:
    """Executors on several replicas of one model, used like one. `async with ReplicaPool(...) as pool:`."""

    def __init__(self, replicas: Sequence[Executor], config: ModelConfig,
                 devices: Sequence[str] | None = None) -> None:
        if not replicas:
            raise ValueError("a replica pool needs at least one executor")
        self.replicas = tuple(replicas)
        self.config = config
        """`max_queue` bounds the whole pool; the replicas' own bounds are not reached first (see the module)."""
        self.devices = tuple(devices) if devices is not None else tuple(f"#{i + 1}" for i in range(len(replicas)))
        """One label per replica, for logs and `fault`."""
        self._closing = False
        self._on_fatal: Callable[[str], object] | None = None

    @classmethod
    def from_models(cls, models: Sequence[LoadedModel], config: ModelConfig, *,
                    batch_window_s: float = 0.005) -> ReplicaPool:
        """One `Executor` (with its own model thread) per loaded replica; start it with `async with`."""
        from model_server.engine import engine_for

        executors = [Executor(engine_for(m, config), config, batch_window_s=batch_window_s) for m in models]
        return cls(executors, config, [str(m.device) for m in models])

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> ReplicaPool:
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()

    def start(self) -> None:
        for replica in self.replicas:
            replica.start()
        log.info("replica pool started: %d replicas on %s, at most %d requests waiting in all",
                 len(self.replicas), ",".join(self.devices), self.config.max_queue)

    async def close(self, grace_s: float = 0.0) -> None:
        """Refuse new requests; let queued and running ones finish for `grace_s`, then cancel the rest."""
        self._closing = True
        await asyncio.gather(*(replica.close(grace_s) for replica in self.replicas))

    @property
    def on_fatal(self) -> Callable[[str], object] | None:
        """Called once per replica stuck past twice `config.watchdog_s`, from that replica's watchdog thread."""
        return self._on_fatal

    @on_fatal.setter
    def on_fatal(self, hook: Callable[[str], object] | None) -> None:
        self._on_fatal = hook
        for index, replica in enumerate(self.replicas):
            replica.on_fatal = None if hook is None else self._fatal_hook(index, hook)

    def _fatal_hook(self, index: int, hook: Callable[[str], object]) -> Callable[[str], object]:
        return lambda reason: hook(f"{self._label(index)}: {reason}")

    # -- submitting ------------------------------------------------------------------------------
    def submit(self, prompt: Prompt, *, timeout_s: float | None = None) -> RequestHandle:
        """Queue on the least loaded healthy replica; the handle is that replica's (`ahead()` counts its queue)."""
        return self._pick().submit(prompt, timeout_s=timeout_s)

    async def generate(self, prompt: Prompt, *, timeout_s: float | None = None) -> GenerationResult:
        return await self.submit(prompt, timeout_s=timeout_s).result()

    async def rank(self, prompt: Prompt, categories: Sequence[str], *,
                   timeout_s: float | None = None) -> list[RankedCategory]:
        """Every category scored by its likelihood after `prompt`, most likely first (on one replica)."""
        # The replica queues the request before its first await, so nothing runs between choosing and queueing.
        return await self._pick().rank(prompt, categories, timeout_s=timeout_s)

    def _pick(self) -> Executor:
        if self._closing:
            raise ExecutorClosed(detail="executor is closing")
        parts = [replica.stats() for replica in self.replicas]
        waiting = sum(p.queue_length for p in parts)
        if waiting >= self.config.max_queue:
            raise Busy(waiting, self.config.max_queue)
        chosen = route([None if p.fault is not None else p.queue_length + p.running for p in parts])
        if chosen is None:
            raise ModelStuck(detail=f"request refused: {self.fault}")
        log.debug("request routed to %s (loads %s)", self._label(chosen),
                  ",".join(str(p.queue_length + p.running) for p in parts))
        return self.replicas[chosen]

    # -- what `/status`, tests and benchmarks read -----------------------------------------------
    def stats(self) -> ExecutorStats:
        parts = [replica.stats() for replica in self.replicas]
        # Each replica reports its last 200 latencies; a median of the replicas' medians would not be the median.
        latencies = [s for part in parts for s in part.latencies_s]
        return merge_stats(parts, latencies, self.fault)

    def replica_stats(self) -> list[tuple[str, ExecutorStats]]:
        """Each replica's own stats, with its device."""
        return [(device, replica.stats()) for device, replica in zip(self.devices, self.replicas, strict=True)]

    @property
    def batches(self) -> list[ReplicaBatchRecord]:
        """Every replica's recorded batches (the last 1000 of each), oldest first, each saying its replica."""
        records = [ReplicaBatchRecord(r.size, r.kind, r.started, index)
                   for index, replica in enumerate(self.replicas) for r in replica.batches.copy()]
        return sorted(records, key=lambda r: r.started)

    @property
    def alive(self) -> bool:
        """Every replica's model thread runs."""
        return all(replica.alive for replica in self.replicas)

    async def health(self) -> str | None:
        return self.fault or (None if self.alive else "model thread not running")

    def memory(self) -> dict[str, int]:
        # Every replica reports every GPU of the process: asking one is enough.
        return self.replicas[0].memory()

    def add_observer(self, observer: Observer) -> None:
        """Each replica tells `observer` its requests' outcomes."""
        for replica in self.replicas:
            replica.add_observer(observer)

    def remove_observer(self, observer: Observer) -> None:
        for replica in self.replicas:
            replica.remove_observer(observer)

    @property
    def fault(self) -> str | None:
        """What is wrong with any replica ("replica 2/2 on cuda:1: model thread stuck for 130 s"), else None."""
        faults = [f"{self._label(i)}: {fault}" for i, fault in enumerate(r.fault for r in self.replicas)
                  if fault is not None]
        return "; ".join(faults) if faults else None

    def _label(self, index: int) -> str:
        return f"replica {index + 1}/{len(self.replicas)} on {self.devices[index]}"


def local_executor(models: Sequence[LoadedModel], config: ModelConfig, *,
                   batch_window_s: float = 0.005) -> Executor | ReplicaPool:
    """A plain `Executor` for one loaded model, a `ReplicaPool` for several."""
    if len(models) == 1:
        from model_server.engine import engine_for

        return Executor(engine_for(models[0], config), config, batch_window_s=batch_window_s)
    return ReplicaPool.from_models(models, config, batch_window_s=batch_window_s)


if TYPE_CHECKING:
    def _keeps_the_contract(backend: ReplicaPool) -> GenerationBackend:
        return backend  # mypy checks that `ReplicaPool` is a `GenerationBackend`

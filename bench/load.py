"""Load: the real bot (loopback fake Discord, SQLite, the tiny IDEFICS or a real checkpoint) under a stream of
mentions over many channels, for minutes. The scaled-up twin of `tests/system/load/test_flood.py`.

Every message must get exactly one reply: an answer, or the queue-full ("busy") message. The last line is
one JSON object: answered, refused, other (replies that are neither), lost (must be 0), duplicated,
out_of_order_channels, p50/p95 latency (mention sent -> the reply's final content reached Discord), the
longest queue seen, peak RSS and the settings used.

    python -m bench.load                                   # tiny model, 20 channels, 10 msg/s, 60 s
    python -m bench.load --channels 50 --users 200 --rate 20 --duration 300 --max-queue 64
    python -m bench.load --model PATH --device cuda --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

from bot.discord_app.client import IdeficsBot
from bot.pipeline.services import open_services
from bot.settings import Settings
from tests.fakes.discord_api import FakeDiscord
from tests.system.load.flood import QueueSampler, all_final, build_flood_world, judge, percentile, send_flood


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or hub id (default: a fresh tiny model)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--channels", type=int, default=20)
    parser.add_argument("--users", type=int, default=100, help="distinct authors, round-robin")
    parser.add_argument("--rate", type=float, default=10.0, help="mentions per second, over all channels")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of sending")
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--drain-timeout", type=float, default=300.0,
                        help="seconds to wait after sending for the last replies")
    parser.add_argument("--user-max-inflight", type=int, default=100,
                        help="per-user limits: high by default, so the queue is what refuses")
    parser.add_argument("--user-max-per-minute", type=int, default=10_000)
    return parser.parse_args()


async def run(args: argparse.Namespace, model: str, database_url: str) -> dict[str, object]:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        discord_token="bench-token",
        idefics_model=model,
        idefics_device=args.device,
        database_url=database_url,
        max_queue=args.max_queue,
        max_batch_size=args.max_batch_size,
        max_new_tokens=args.max_new_tokens,
        user_max_inflight=args.user_max_inflight,
        user_max_per_minute=args.user_max_per_minute,
    )
    count = max(1, round(args.rate * args.duration))
    async with FakeDiscord(token="bench-token") as fake:
        world = build_flood_world(fake, args.channels, args.users)
        with fake.patch_discord():
            async with open_services(settings, progress=lambda line: print(line, file=sys.stderr)) as services:
                bot = IdeficsBot(services, guild_ready_timeout=0.01)
                async with fake.running(bot, ready_timeout=60):
                    with QueueSampler(services.executor, interval_s=0.005) as sampler:
                        started = time.monotonic()
                        asked = await send_flood(fake, world, count, rate_per_s=args.rate)
                        sent_s = time.monotonic() - started
                        for _ in range(max(1, int(args.drain_timeout * 2))):
                            if bot.tasks_running == 0 and all_final(fake, asked):
                                break
                            await asyncio.sleep(0.5)
                        total_s = time.monotonic() - started
                    outcome = judge(fake, asked)
    return {
        "messages": len(asked),
        "answered": len(outcome.answered),
        "refused": len(outcome.refused),
        "other": len(outcome.other),
        "lost": len(outcome.lost),
        "duplicated": len(outcome.duplicated),
        "out_of_order_channels": len(outcome.out_of_order),
        "latency_p50_s": _round(percentile(outcome.latencies_s, 0.50)),
        "latency_p95_s": _round(percentile(outcome.latencies_s, 0.95)),
        "latency_max_s": _round(max(outcome.latencies_s, default=None)),
        "peak_queue": sampler.peak,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "send_seconds": round(sent_s, 1),
        "total_seconds": round(total_s, 1),
        "settings": {
            "model": "tiny" if args.model is None else args.model, "device": args.device,
            "channels": args.channels, "users": args.users, "rate_per_s": args.rate, "duration_s": args.duration,
            "max_queue": args.max_queue, "max_batch_size": args.max_batch_size,
            "max_new_tokens": args.max_new_tokens, "user_max_inflight": args.user_max_inflight,
            "user_max_per_minute": args.user_max_per_minute,
        },
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from tests.fakes.tiny_idefics import build_tiny_idefics

            model = str(build_tiny_idefics(Path(tmp) / "tiny"))
        result = asyncio.run(run(args, model, f"sqlite+aiosqlite:///{Path(tmp) / 'load.sqlite3'}"))
    print(json.dumps(result))
    if result["lost"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Work outside the model for one message (storage writes, window load, prompt rendering) against history size.

For each history size N a fresh SQLite database (through `open_database`, migrations included) gets one channel
filled with N messages: user questions and assistant answers, every tenth question with an image, written in bulk
into the store's own tables (set-up, not measured). Then `--messages` more messages go through the per-message
work of the real pipeline, each timed as a whole:

    the front end reads the channel's settings (trigger decision, `bot/discord_app/client.py`)
    -> `Conversation.record` (stores the user message as a "pending" request)
    -> `Conversation.prompt_for` (settings, the history window with its images, `model_server.prompt.render_chat`)
    -> `Conversation.store_answer` (stores the assistant turn and marks the request "answered", one transaction)

The model itself is left out: the answer is a fixed text. Target: p50 at the largest size within 2x of p50 at the
smallest, and under 5 ms. The last line is one JSON object: p50_ms and p95_ms per size, ratio_p50_<largest>_vs_
<smallest>, target_met.

    python -m bench.overhead                                  # N = 10, 1000, 100000; 300 messages each
    python -m bench.overhead --sizes 10,50 --messages 5       # a quick check
    python -m bench.overhead --database-url postgresql+asyncpg://user:pass@host/db  # its own channels, removed after
    python -m bench.overhead --model PATH                     # count tokens with the checkpoint's tokenizer
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import logging
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import insert, select

from bot.images.check import CheckedImage, ImageLimits, check_image
from bot.pipeline.conversation import ChatDefaults, Conversation, IncomingMessage, ModelInfo, Reply
from storage import Database, ImageBlob, NewMessage, open_database
from storage.models import Channel, Message, MessageImage
from storage.models import Image as ImageRow

STEPS = ("settings", "record", "prompt", "answer")
"""The timed parts of one message, in order (their sum is the figure per message)."""

FILL_BATCH = 10_000
"""Rows per bulk INSERT while filling the history."""

IMAGE_EVERY = 10
"""Every tenth user message carries an image, in the history and among the measured messages."""

QUESTION = "What do you see in this picture, and what would you call it? Please answer in two sentences. "
ANSWER = ("It shows a small square of coloured noise, mostly reds and greens with a few blue specks; "
          "I would call it 'static at dusk'. ")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,1000,100000",
                        help="history sizes (messages already in the channel), comma-separated")
    parser.add_argument("--messages", type=int, default=300, help="timed messages per size")
    parser.add_argument("--warmup", type=int, default=10, help="untimed messages per size before the timed ones")
    parser.add_argument("--database-url",
                        help="SQLAlchemy async URL of an existing database (default: a fresh SQLite file per size); "
                             "each size uses a channel of its own, deleted afterwards")
    parser.add_argument("--model", help="checkpoint folder or hub id whose tokenizer counts tokens "
                                        "(default: the renderer's estimate, no tokenizer)")
    parser.add_argument("--history-messages", type=int, default=ChatDefaults.history_messages,
                        help="window length loaded per message (the bot's HISTORY_MESSAGES)")
    parser.add_argument("--image-side", type=int, default=64,
                        help="side in pixels of the (square) images, in the history and in the measured messages")
    args = parser.parse_args(argv)
    try:
        args.sizes = sorted({int(part) for part in args.sizes.split(",") if part.strip()})
    except ValueError:
        parser.error(f"--sizes must be integers separated by commas, not {args.sizes!r}")
    if not args.sizes or args.sizes[0] < 1 or args.messages < 1:
        parser.error("--sizes must name at least one size >= 1, and --messages must be >= 1")
    return args


def png(seed: int, side: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


async def fill(db: Database, channel: str, prefix: str, count: int, image_side: int) -> None:
    """`count` messages in `channel`: alternating answered questions and their answers, as the store writes them.

    The channel and a handful of images go in through the store itself; the bulk of the rows by executemany into
    the store's own tables, with the same values `Store.append_message` writes.
    """
    images = [ImageBlob(png(1_000_000 + i, image_side), "image/png", image_side, image_side) for i in range(4)]
    first = await db.store.append_message(NewMessage(
        platform_id=f"{prefix}-h0", channel_key=channel, role="user", author_id="u0", author_name="user 0",
        text=QUESTION, request_state="answered", images=images[:1]))
    assert first is not None
    for blob in images[1:]:  # the other pictures, through the store's own image path (sha256, byte_size)
        await db.store.append_message(NewMessage(
            platform_id=f"{prefix}-seed-{blob.data[-8:].hex()}", channel_key=f"{channel}-seed", role="user",
            author_id="u0", author_name="user 0", text="seed", images=(blob,)))
    async with db.sessions() as session:
        channel_id = (await session.scalars(select(Channel.id).where(Channel.key == channel))).one()
        shas = [hashlib.sha256(blob.data).hexdigest() for blob in images]
        image_ids = list((await session.scalars(select(ImageRow.id).where(ImageRow.sha256.in_(shas)))).all())
    start = datetime.now(UTC) - timedelta(seconds=count)
    for low in range(1, count, FILL_BATCH):
        rows: list[dict[str, Any]] = []
        for i in range(low, min(low + FILL_BATCH, count)):
            question = i % 2 == 0
            rows.append({
                "platform_id": f"{prefix}-h{i}",
                "channel_id": channel_id,
                "role": "user" if question else "assistant",
                "author_id": f"u{i % 7}" if question else "bot",
                "author_name": f"user {i % 7}" if question else "Assistant",
                "text": f"{QUESTION}({i})" if question else f"{ANSWER}({i})",
                "created_at": start + timedelta(seconds=i),
                "reply_to": None if question else f"{prefix}-h{i - 1}",
                "request_state": "answered" if question else None,
            })
        pictured = [row["platform_id"] for n, row in enumerate(rows, start=low) if n % (2 * IMAGE_EVERY) == 0]
        async with db.sessions() as session:
            await session.execute(insert(Message.__table__), rows)  # one executemany, no ORM bookkeeping
            ids = (await session.scalars(select(Message.id).where(Message.platform_id.in_(pictured))
                                         .order_by(Message.id))).all()
            if ids:
                await session.execute(insert(MessageImage.__table__), [
                    {"message_id": message_id, "position": 0, "image_id": image_ids[n % len(image_ids)]}
                    for n, message_id in enumerate(ids)])
            await session.commit()


def incoming_messages(channel: str, prefix: str, count: int, image_side: int = 64) -> list[IncomingMessage]:
    """The measured messages, images checked the way the bot checks attachments (done here, not timed)."""
    limits = ImageLimits()
    messages = []
    for i in range(count):
        images: tuple[CheckedImage, ...] = ()
        if i % IMAGE_EVERY == 0:
            images = (check_image(png(i, image_side), limits),)
        messages.append(IncomingMessage(
            platform_id=f"{prefix}-m{i}", channel_key=channel, author_id=f"u{i % 7}", author_name=f"user {i % 7}",
            text=f"{QUESTION}(live {i})", images=images, created_at=datetime.now(UTC)))
    return messages


async def one_message(conversation: Conversation, incoming: IncomingMessage) -> dict[str, float]:
    """The per-message work of the pipeline outside the model, each step timed (seconds)."""
    times: dict[str, float] = {}
    started = time.perf_counter()
    await conversation.store.channel_settings(incoming.channel_key)  # the front end's trigger decision
    times["settings"] = time.perf_counter()
    stored = await conversation.record(incoming, request=True)
    assert stored is not None
    times["record"] = time.perf_counter()
    prompt = await conversation.prompt_for(stored)
    assert prompt.items
    times["prompt"] = time.perf_counter()
    await conversation.store_answer(stored, Reply(platform_id=f"{incoming.platform_id}-answer", text=ANSWER))
    times["answer"] = time.perf_counter()
    previous, steps = started, {}
    for name in STEPS:
        steps[name], previous = times[name] - previous, times[name]
    return steps


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(args: argparse.Namespace, url: str, size: int, model: ModelInfo) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    channel, prefix = f"bench-{size}-{run}", f"b{run}"
    async with open_database(url) as db:
        started = time.perf_counter()
        await fill(db, channel, prefix, size, args.image_side)
        fill_s = time.perf_counter() - started
        assert await db.store.count_messages(channel) == size
        if db.engine.dialect.name == "postgresql":  # fresh statistics, as autovacuum keeps them after a bulk load
            async with db.engine.connect() as connection:
                await connection.exec_driver_sql("ANALYZE channels, messages, message_images, images")
        conversation = Conversation(db.store, None, model, ChatDefaults(history_messages=args.history_messages),
                                    assistant_id="bot")
        messages = incoming_messages(channel, prefix, args.warmup + args.messages, args.image_side)
        for incoming in messages[: args.warmup]:
            await one_message(conversation, incoming)
        runs = [await one_message(conversation, incoming) for incoming in messages[args.warmup:]]
        if args.database_url:  # a shared database: leave it as it was
            await db.store.clear_channel(channel)
            await db.store.clear_channel(f"{channel}-seed")
    totals = [sum(steps.values()) * 1000 for steps in runs]
    return {
        "p50_ms": statistics.median(totals),
        "p95_ms": percentile(totals, 0.95),
        "steps_p50_ms": {name: statistics.median(steps[name] * 1000 for steps in runs) for name in STEPS},
        "fill_s": fill_s,
    }


def model_info(name: str | None) -> ModelInfo:
    if name is None:
        return ModelInfo(name="bench", instruct=True)
    from bot.pipeline.services import model_info_without_weights

    info = model_info_without_weights(name)
    if info.count_tokens is None:
        print(f"no tokenizer found for {name}: counting with the estimate", file=sys.stderr)
    return info


async def run_all(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, Any]]:
    model = model_info(args.model)
    results = {}
    for size in args.sizes:
        url = args.database_url or f"sqlite+aiosqlite:///{tmp / f'overhead-{size}.sqlite3'}"
        results[str(size)] = result = await measure(args, url, size, model)
        steps = ", ".join(f"{name} {ms:.2f}" for name, ms in result["steps_p50_ms"].items())
        print(f"N={size:>7}: p50 {result['p50_ms']:.2f} ms, p95 {result['p95_ms']:.2f} ms "
              f"(step p50s ms: {steps}; fill {result['fill_s']:.1f}s)", flush=True)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(run_all(args, Path(tmp)))
    smallest, largest = str(args.sizes[0]), str(args.sizes[-1])
    ratio = results[largest]["p50_ms"] / results[smallest]["p50_ms"]
    summary = {
        "p50_ms": {size: round(r["p50_ms"], 3) for size, r in results.items()},
        "p95_ms": {size: round(r["p95_ms"], 3) for size, r in results.items()},
        f"ratio_p50_{largest}_vs_{smallest}": round(ratio, 3),
        "target_met": ratio <= 2 and all(r["p50_ms"] < 5 for r in results.values()),
        "steps_p50_ms": {size: {k: round(v, 3) for k, v in r["steps_p50_ms"].items()} for size, r in results.items()},
        "settings": {"messages": args.messages, "history_messages": args.history_messages,
                     "database": "sqlite" if args.database_url is None else "given URL",
                     "tokenizer": args.model or "estimate"},
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

"""Sequential vs dynamic vs continuous batching, and time to first token behind a long request.

Throughput: 16 concurrent chat requests (0 to 2 images, answers of 8 to 64 tokens) run
- sequential: one at a time the guide's way (processor inputs, `model.generate`);
- dynamic: through the executor with `BATCHING=static`: a batch of up to `--max-batch-size` runs to its end;
- continuous: through the executor with `BATCHING=continuous`: a finished row's slot is refilled at once.
The vision cache is off here, so the figures compare batching alone.

Time to first token: a long request (`--long-tokens`) runs; a short one arrives after its first token.
Static batching starts the short one when the long one ends; continuous batching at the next step.

Tiny IDEFICS on CPU by default. The last line is one JSON object with sequential_tokens_per_s,
dynamic_tokens_per_s, continuous_tokens_per_s, ttft_static_s and ttft_continuous_s (targets:
continuous >= dynamic and >= 4x sequential; ttft_continuous_s <= ttft_static_s / 5).

    python -m bench.executor
    python -m bench.executor --model PATH --device cuda --requests 32 --max-batch-size 16
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.batching import QUESTIONS, model_or_tiny, sequential
from model_server.config import ModelConfig
from model_server.engine import LocalEngine
from model_server.executor import Executor
from model_server.loading import load_model
from model_server.prompt import render_chat
from model_server.types import ChatTurn, GenerationParams, Prompt

ANSWER_LENGTHS = (8, 64, 16, 32)


def make_prompts(count: int, seed: int = 0) -> list[Prompt]:
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(count):
        images = tuple(Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(i % 3))
        turns = [ChatTurn("user", QUESTIONS[i % len(QUESTIONS)] + f" (request {i})", f"user{i}", images)]
        params = GenerationParams(max_new_tokens=ANSWER_LENGTHS[i % len(ANSWER_LENGTHS)])
        prompts.append(render_chat(turns, instruct=True, params=params))
    return prompts


class ExecutorRun:
    """An executor kept open across repeats, so that each repeat measures the same warm thing."""

    def __init__(self, loaded, config: ModelConfig) -> None:
        self.executor = Executor(LocalEngine.for_config(loaded, config), config, batch_window_s=0.01)

    async def once(self, prompts: list[Prompt]) -> tuple[float, list[str]]:
        """Tokens/s of all prompts submitted at once, and the answers."""
        started = time.perf_counter()
        results = await asyncio.gather(*(self.executor.generate(p) for p in prompts))
        seconds = time.perf_counter() - started
        return sum(r.completion_tokens for r in results) / seconds, [r.text for r in results]


async def throughput(loaded, configs: dict[str, ModelConfig], prompts: list[Prompt],
                     repeats: int) -> dict[str, dict[str, object]]:
    """Median tokens/s of each way over `repeats` rounds; the ways take turns within a round, so a slow
    moment of the machine does not fall on one of them only."""
    runs = {name: ExecutorRun(loaded, config) for name, config in configs.items()}
    rates: dict[str, list[float]] = {name: [] for name in [*configs, "sequential"]}
    texts: dict[str, list[str]] = {}
    for run in runs.values():
        run.executor.start()
        await run.executor.generate(prompts[0])  # warm-up
    sequential(loaded, prompts[:1])  # warm-up
    try:
        for _ in range(repeats):
            # On the calling thread, the way the guide runs it (the executors are idle meanwhile).
            tokens, seconds = sequential(loaded, prompts)
            rates["sequential"].append(tokens / seconds)
            for name, run in runs.items():
                rate, texts[name] = await run.once(prompts)
                rates[name].append(rate)
    finally:
        for run in runs.values():
            await run.executor.close()
    return {name: {"tokens_per_s": statistics.median(values), "runs": [round(v, 1) for v in values],
                   "texts": texts.get(name)} for name, values in rates.items()}


async def first_token_behind_long(loaded, config: ModelConfig, long: Prompt, short: Prompt,
                                  repeats: int) -> float:
    """Median seconds from the short request's submission to its first token, a long request running."""
    async with Executor(LocalEngine.for_config(loaded, config), config, batch_window_s=0) as executor:
        await executor.generate(short)  # warm-up
        waits = []
        for _ in range(repeats):
            running = executor.submit(long)
            async for _ in running:
                break
            result = await executor.generate(short)
            await running.result()
            waits.append(result.first_token_s)
        return statistics.median(waits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or hub id (default: a fresh tiny model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each measurement; medians are reported")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = model_or_tiny(args.model, Path(tmp))
        base = ModelConfig(model=model, device=args.device, max_batch_size=args.max_batch_size,
                           max_queue=args.requests * 2, vision_cache_mb=0)
        static = dataclasses.replace(base, batching="static")
        continuous = dataclasses.replace(base, batching="continuous")
        loaded = load_model(base, progress=lambda line: print(line, file=sys.stderr))
        prompts = make_prompts(args.requests)

        rates = asyncio.run(throughput(loaded, {"dynamic": static, "continuous": continuous}, prompts,
                                       args.repeats))
        seq_rate = rates["sequential"]["tokens_per_s"]
        dyn_rate, cont_rate = rates["dynamic"]["tokens_per_s"], rates["continuous"]["tokens_per_s"]
        for name, rate in rates.items():
            print(f"{name}: median {rate['tokens_per_s']:.0f} tokens/s, runs {rate['runs']}", file=sys.stderr)

        long = dataclasses.replace(make_prompts(2, seed=1)[1],
                                   params=GenerationParams(max_new_tokens=args.long_tokens))
        short = dataclasses.replace(make_prompts(1, seed=2)[0], params=GenerationParams(max_new_tokens=8))
        ttft_static = asyncio.run(first_token_behind_long(loaded, static, long, short, args.repeats))
        ttft_cont = asyncio.run(first_token_behind_long(loaded, continuous, long, short, args.repeats))
        print(f"first token behind a {args.long_tokens}-token answer: static {ttft_static:.3f}s, "
              f"continuous {ttft_cont:.3f}s", file=sys.stderr)

    print(json.dumps({
        "requests": args.requests,
        "max_batch_size": args.max_batch_size,
        "answer_lengths": list(ANSWER_LENGTHS),
        "sequential_tokens_per_s": round(seq_rate, 1),
        "dynamic_tokens_per_s": round(dyn_rate, 1),
        "continuous_tokens_per_s": round(cont_rate, 1),
        "continuous_vs_sequential": round(cont_rate / seq_rate, 2),
        "continuous_vs_dynamic": round(cont_rate / dyn_rate, 2),
        "continuous_equals_dynamic": rates["continuous"]["texts"] == rates["dynamic"]["texts"],
        "runs_tokens_per_s": {name: rate["runs"] for name, rate in rates.items()},
        "long_tokens": args.long_tokens,
        "ttft_static_s": round(ttft_static, 4),
        "ttft_continuous_s": round(ttft_cont, 4),
        "ttft_ratio": round(ttft_cont / ttft_static, 3),
        "targets_met": {
            "continuous_at_least_dynamic": cont_rate >= dyn_rate,
            "continuous_at_least_4x_sequential": cont_rate >= 4 * seq_rate,
            "ttft_at_most_one_fifth": ttft_cont <= ttft_static / 5,
        },
    }))


if __name__ == "__main__":
    main()

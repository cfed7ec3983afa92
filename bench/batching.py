"""Batched serving against one-at-a-time generation, on the tiny IDEFICS (CPU) or a real checkpoint.

16 chat requests (some with one or two images) go through the executor concurrently; then the same
16 run one at a time the way the guide does it (processor inputs, `model.generate`). The last line is
one JSON object: sequential_tokens_per_s, batched_tokens_per_s, ratio (target: at least 4).

    python -m bench.batching                       # builds the tiny model in a temporary folder
    python -m bench.batching --model PATH --requests 32 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from model_server.config import ModelConfig
from model_server.encoding import encode
from model_server.engine import LocalEngine
from model_server.executor import Executor
from model_server.loading import load_model
from model_server.prompt import render_chat
from model_server.types import ChatTurn, GenerationParams, Prompt

QUESTIONS = ["What is in this image?", "Describe the colours.", "Tell me a fact about this.",
             "What happens next?", "Who would like this?", "Write a title for it."]


def make_prompts(count: int, max_new_tokens: int) -> list[Prompt]:
    rng = np.random.default_rng(0)
    prompts = []
    for i in range(count):
        images = tuple(Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(i % 3))
        turns = [ChatTurn("user", QUESTIONS[i % len(QUESTIONS)] + f" (request {i})", f"user{i}", images)]
        prompts.append(render_chat(turns, instruct=True, params=GenerationParams(max_new_tokens=max_new_tokens)))
    return prompts


def model_or_tiny(model: str | None, tmp: Path) -> str:
    """`model`, or a fresh tiny IDEFICS built in `tmp` when none is given."""
    if model is not None:
        return model
    from tests.fakes.tiny_idefics import build_tiny_idefics

    return str(build_tiny_idefics(tmp / "tiny"))


def sequential(loaded, prompts: list[Prompt]) -> tuple[int, float]:
    """The guide's way: one prompt, one `model.generate`, one after the other."""
    import torch

    tokens = 0
    started = time.perf_counter()
    for prompt in prompts:
        enc = encode(loaded.processor, [prompt]).to(loaded.device, loaded.dtype)
        with torch.inference_mode():
            out = loaded.model.generate(
                input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=enc.pixel_values,
                image_attention_mask=enc.image_attention_mask, max_new_tokens=prompt.params.max_new_tokens,
                do_sample=False, bad_words_ids=loaded.bad_words_ids, eos_token_id=list(loaded.stop_token_ids),
                pad_token_id=loaded.tokenizer.pad_token_id,
            )
        tokens += int(out.shape[1] - enc.input_ids.shape[1])
    return tokens, time.perf_counter() - started


async def batched(loaded, config: ModelConfig, prompts: list[Prompt], repeats: int) -> dict[str, object]:
    async with Executor(LocalEngine(loaded), config, batch_window_s=0.01) as executor:
        await executor.generate(prompts[0])  # warm-up, as the sequential run warms up on its first prompt
        started = time.perf_counter()
        one_by_one = [await executor.generate(p) for p in prompts]
        one_by_one_s = time.perf_counter() - started
        # A batched run takes a fraction of a second: the median of several runs is the figure.
        runs = []
        for _ in range(repeats):
            executor.batches.clear()
            started = time.perf_counter()
            results = await asyncio.gather(*(executor.generate(p) for p in prompts))
            runs.append(time.perf_counter() - started)
        return {
            "tokens": sum(r.completion_tokens for r in results),
            "seconds": statistics.median(runs),
            "sizes": [b.size for b in executor.batches],
            "one_by_one_tokens": sum(r.completion_tokens for r in one_by_one),
            "one_by_one_seconds": one_by_one_s,
            "same_text": [r.text for r in results] == [r.text for r in one_by_one],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or hub id (default: a fresh tiny model)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7, help="batched runs; the median is reported")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = model_or_tiny(args.model, Path(tmp))
        config = ModelConfig(model=model, device=args.device, max_batch_size=args.requests,
                             max_queue=args.requests * 2)
        loaded = load_model(config, progress=lambda line: print(line, file=sys.stderr))
        prompts = make_prompts(args.requests, args.max_new_tokens)
        sequential(loaded, prompts[:1])  # warm-up
        seq_tokens, seq_s = sequential(loaded, prompts)
        run = asyncio.run(batched(loaded, config, prompts, args.repeats))

    bat_tokens, bat_s, sizes = run["tokens"], run["seconds"], run["sizes"]
    seq_rate, bat_rate = seq_tokens / seq_s, bat_tokens / bat_s
    own_rate = run["one_by_one_tokens"] / run["one_by_one_seconds"]
    print(f"sequential (model.generate): {seq_tokens} tokens in {seq_s:.2f}s; executor one at a time: "
          f"{run['one_by_one_tokens']} tokens in {run['one_by_one_seconds']:.2f}s; batched: {bat_tokens} tokens "
          f"in {bat_s:.2f}s, batches {sizes}", file=sys.stderr)
    print(json.dumps({
        "requests": args.requests,
        "max_new_tokens": args.max_new_tokens,
        "sequential_tokens": seq_tokens,
        "batched_tokens": bat_tokens,
        "sequential_tokens_per_s": round(seq_rate, 1),
        "batched_tokens_per_s": round(bat_rate, 1),
        "ratio": round(bat_rate / seq_rate, 2),
        "executor_one_at_a_time_tokens_per_s": round(own_rate, 1),
        "ratio_vs_executor_one_at_a_time": round(bat_rate / own_rate, 2),
        "batched_equals_one_at_a_time": run["same_text"],
        "batch_sizes": sizes,
    }))


if __name__ == "__main__":
    main()

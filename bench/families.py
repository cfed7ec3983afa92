"""What Idefics2, Idefics3 and SmolVLM cost on a CPU: batched vs one at a time, and a SmolVLM-256M-sized model.

Rows, one per architecture (tiny random checkpoints from `tests/fakes/tiny_families.py`): `--requests` chat
requests with one image each, `--new-tokens` tokens per answer, greedy; tokens/s one at a time (each awaited before
the next) and batched (all submitted together; continuous batching). Greedy answers must be equal both ways.

Then a random checkpoint of SmolVLM-256M-Instruct's size, built from its real config (below; ~256M parameters):
one request with one 512x384 picture (one 512-pixel tile: the processor's `size={"longest_edge": 512}`, the
setting to use on a CPU, so 64 image tokens instead of up to 17 x 64), time to first token and decode tokens/s,
then `--requests` of them batched. Random weights never stop early, so every answer is `--new-tokens` long;
real answers are shorter and the figures per token hold.

    python -m bench.families
    python -m bench.families --requests 4 --new-tokens 8 --skip-256m     (the test's size)

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model_server.config import ModelConfig
from model_server.engine import engine_for
from model_server.executor import Executor
from model_server.loading import load_model
from model_server.prompt import render_chat
from model_server.types import ChatTurn, GenerationParams, GenerationResult, Prompt

SMOLVLM_256M_TEXT = {
    # HuggingFaceTB/SmolVLM-256M-Instruct config.json, text_config (a SmolLM2-135M-sized Llama).
    "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
    "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "vocab_size": 49280, "tie_word_embeddings": False,
}
SMOLVLM_256M_VISION = {
    # Its vision_config: a SigLIP base encoder on 512-pixel tiles, 16-pixel patches.
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "image_size": 512, "patch_size": 16,
}
SMOLVLM_256M_SCALE_FACTOR = 4
"""Pixel shuffle: (512 / 16)^2 / 4^2 = 64 tokens per tile."""


def picture(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def prompts(count: int, new_tokens: int, size: tuple[int, int] = (48, 40)) -> list[Prompt]:
    return [render_chat([ChatTurn("user", f"What is in this picture? (request {i})", "you", (picture(i, size),))],
                        instruct=True, params=GenerationParams(max_new_tokens=new_tokens)) for i in range(count)]


async def _run(loaded: Any, batch: list[Prompt], max_batch: int) -> tuple[list[GenerationResult], float, float]:
    """(results one at a time, seconds for them, seconds for the same batched); the vision cache is off."""
    config = ModelConfig(model=loaded.name, device="cpu", max_batch_size=max_batch, vision_cache_mb=0,
                         request_timeout_s=3600.0)
    async with Executor(engine_for(loaded, config), config, batch_window_s=0.01) as executor:
        await executor.generate(batch[0])  # warm-up
        started = time.perf_counter()
        alone = [await executor.generate(p) for p in batch]
        one_s = time.perf_counter() - started
        started = time.perf_counter()
        together = await asyncio.gather(*(executor.generate(p) for p in batch))
        batched_s = time.perf_counter() - started
    if [r.text for r in together] != [r.text for r in alone]:
        raise AssertionError("batched greedy answers differ from one at a time")
    return alone, one_s, batched_s


def family_row(architecture: str, requests: int, new_tokens: int, workdir: Path) -> dict[str, Any]:
    from tests.fakes.tiny_families import build_tiny_family

    path = build_tiny_family(workdir / architecture, architecture)
    loaded = load_model(ModelConfig(model=str(path), device="cpu"), progress=lambda line: None)
    alone, one_s, batched_s = asyncio.run(_run(loaded, prompts(requests, new_tokens), requests))
    tokens = sum(r.completion_tokens for r in alone)
    return {"architecture": architecture, "requests": requests, "tokens": tokens,
            "one_at_a_time_tokens_per_s": round(tokens / one_s, 1),
            "batched_tokens_per_s": round(tokens / batched_s, 1), "speedup": round(one_s / batched_s, 2)}


def build_smolvlm_256m(path: Path) -> Path:
    """A random checkpoint with SmolVLM-256M-Instruct's config (Idefics3 classes), a small byte-level tokenizer."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from tests.fakes.tiny_families import SMOLVLM_CHAT_TEMPLATE, _byte_level_tokenizer

    tokenizer = _byte_level_tokenizer()
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 512}, max_image_size={"longest_edge": 512})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=64,
                                  chat_template=SMOLVLM_CHAT_TEMPLATE)
    text = {**SMOLVLM_256M_TEXT, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    config = Idefics3Config(text_config=text, vision_config=SMOLVLM_256M_VISION,
                            scale_factor=SMOLVLM_256M_SCALE_FACTOR, tie_word_embeddings=False,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def smolvlm_256m_row(requests: int, new_tokens: int, workdir: Path) -> dict[str, Any]:
    path = build_smolvlm_256m(workdir / "smolvlm-256m")
    loaded = load_model(ModelConfig(model=str(path), device="cpu", dtype="float32"), progress=lambda line: None)
    parameters = sum(p.numel() for p in loaded.model.parameters())
    batch = prompts(requests, new_tokens, size=(512, 384))
    alone, one_s, batched_s = asyncio.run(_run(loaded, batch, requests))
    first = [r.first_token_s for r in alone if r.first_token_s is not None]
    decode = [(r.completion_tokens - 1) / (r.total_s - r.first_token_s) for r in alone
              if r.first_token_s is not None and r.completion_tokens > 1]
    tokens = sum(r.completion_tokens for r in alone)
    return {"model": "random SmolVLM-256M-Instruct config", "parameters_m": round(parameters / 1e6, 1),
            "prompt_tokens": alone[0].prompt_tokens, "time_to_first_token_s": round(sum(first) / len(first), 2),
            "decode_tokens_per_s": round(sum(decode) / len(decode), 1),
            "one_at_a_time_tokens_per_s": round(tokens / one_s, 1),
            "batched_tokens_per_s": round(tokens / batched_s, 1), "requests": requests}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-256m", action="store_true", help="only the tiny rows")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"families": []}
    with tempfile.TemporaryDirectory() as tmp:
        for architecture in ("idefics2", "idefics3", "smolvlm"):
            row = family_row(architecture, args.requests, args.new_tokens, Path(tmp))
            report["families"].append(row)
            print(f"{architecture:9} tiny: one at a time {row['one_at_a_time_tokens_per_s']:8.1f} tok/s, "
                  f"batched x{args.requests} {row['batched_tokens_per_s']:8.1f} tok/s ({row['speedup']}x)",
                  file=sys.stderr)
        if not args.skip_256m:
            row = smolvlm_256m_row(min(args.requests, 4), args.new_tokens, Path(tmp))
            report["smolvlm_256m"] = row
            print(f"SmolVLM-256M size ({row['parameters_m']}M parameters, {row['prompt_tokens']} prompt tokens): "
                  f"first token {row['time_to_first_token_s']} s, decode {row['decode_tokens_per_s']} tok/s, "
                  f"one at a time {row['one_at_a_time_tokens_per_s']} tok/s, batched x{row['requests']} "
                  f"{row['batched_tokens_per_s']} tok/s", file=sys.stderr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""GPU benchmark: the real IDEFICS-9B architecture with random bfloat16 weights, through our own engine.

Nothing is downloaded. The model is built from IDEFICS-9B's public configuration (written out below) with
random weights, directly on the GPU in bfloat16; the tokenizer is a word-level one built in-process whose
ids fill IDEFICS's 32,000 + 2 vocabulary, and the processor is the real `IdeficsProcessor` (224 px). Both go
into `model_server.loading.LoadedModel`, and every measurement runs `model_server.engine.LocalEngine.generate`
(our decode loop), not `model.generate`.

What it measures, for batches of 1, 8, 32 and 64 prompts of ~1,000 tokens and one 224 px image (random pixels)
each, every row generating exactly `--new-tokens` tokens (the end-of-sequence token is banned, so no row stops
early; the tokens actually generated are what is counted):

- aggregate tokens/s (all generated tokens / wall time of `generate`, prefill included);
- time to first token (from the call to the first token, encoding and prefill included);
- decode-only tokens/s (tokens after the first / time from first token to the end);
- the memory-bandwidth ceiling: device bandwidth from a large device-to-device copy (bytes read + written,
  timed with CUDA events), divided by the weight bytes one decode step reads (the decoder layers, the gated
  cross-attention layers, the final norm and the output head; not the vision tower or the perceiver, which
  run once per batch, nor the embedding table, of which a step reads one row per sequence; the KV cache is
  reported apart). `batch1_vs_ceiling` = measured batch-1 decode tokens/s / that ceiling.

Targets: batch-1 decode >= 0.5 of the ceiling; batch 32 >= 2,500 tokens/s aggregate. One warm-up per batch
size, short runs, progress on stderr; past `--budget` seconds (default 420) it stops and reports what it has.
The last line on stdout is one JSON object.

    python -m bench.gpu                        # one CUDA GPU (H100/H200 class: ~18 GB weights + KV cache)
    python -m bench.gpu --batch-sizes 1,32 --new-tokens 32 --budget 200
    python -m bench.gpu --small --cpu          # the same code path with a tiny config on CPU (a check, ~10 s)

Without CUDA (and without `--cpu`) it exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

NO_CUDA = "bench/gpu.py needs a CUDA GPU; none found (use --small --cpu to check the script on CPU)"

# HuggingFaceM4/idefics-9b config.json (the values that shape the model; the 9B defaults of
# transformers' IdeficsConfig). Freeze settings do not matter for inference; they are all off here.
IDEFICS_9B: dict[str, Any] = {
    "vocab_size": 32000,
    "additional_vocab_size": 2,  # <fake_token_around_image>, <image>
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "cross_layer_interval": 4,  # a gated cross-attention layer before every 4th decoder layer: 8 of them
    "qk_layer_norms": False,
    "alpha_initializer": "zeros",
    "alpha_type": "float",
    "alphas_initializer_range": 0.0,
    "initializer_range": 0.02,
    "use_resampler": True,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "vision_config": {  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K
        "embed_dim": 1280,
        "image_size": 224,
        "patch_size": 14,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "intermediate_size": 5120,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    },
    "perceiver_config": {
        "use_resampler": True,
        "resampler_n_latents": 64,
        "resampler_depth": 6,
        "resampler_n_heads": 16,
        "resampler_head_dim": 96,
        "qk_layer_norms_perceiver": False,
    },
}

# `--small`: the same structure, tiny (for checking the script on CPU).
SMALL: dict[str, Any] = {
    **IDEFICS_9B,
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "cross_layer_interval": 2,
    "vision_config": {**IDEFICS_9B["vision_config"], "embed_dim": 32, "image_size": 32, "patch_size": 8,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64},
    "perceiver_config": {**IDEFICS_9B["perceiver_config"], "resampler_n_latents": 8, "resampler_depth": 1,
                         "resampler_n_heads": 2, "resampler_head_dim": 16},
}

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"

TARGET_BATCH1_VS_CEILING = 0.5
TARGET_BATCH32_TOKENS_PER_S = 2500.0

_STARTED = time.monotonic()


def say(line: str) -> None:
    print(f"[gpu-bench {time.monotonic() - _STARTED:6.1f}s] {line}", file=sys.stderr, flush=True)


@dataclass
class Plan:
    spec: dict[str, Any]
    batch_sizes: list[int]
    prompt_tokens: int
    new_tokens: int
    warmup_tokens: int
    copy_bytes: int
    budget_s: float
    device: str
    dtype_name: str
    seed: int
    label: str


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true",
                        help="a tiny config (hidden 64, 4 layers, 32 px images), ~50-token prompts, batches 1,2")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (only with --small)")
    parser.add_argument("--batch-sizes", help="comma-separated (default 1,8,32,64; --small: 1,2)")
    parser.add_argument("--prompt-tokens", type=int, help="tokens per prompt (default 1000; --small: 50)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per row (default 64; --small: 8)")
    parser.add_argument("--warmup-tokens", type=int, default=4, help="tokens per row in each warm-up run")
    parser.add_argument("--copy-gib", type=float, help="size of the bandwidth copy (default 4; --small: 1/16)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds; past it the runs stop and partial results are printed (default 420)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    small = args.small
    default_batches = "1,2" if small else "1,8,32,64"
    try:
        batch_sizes = [int(b) for b in (args.batch_sizes or default_batches).split(",") if b.strip()]
    except ValueError:
        batch_sizes = []
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"bench/gpu.py: --batch-sizes must be positive integers, got {args.batch_sizes!r}")
    new_tokens = args.new_tokens if args.new_tokens is not None else (8 if small else 64)
    prompt_tokens = args.prompt_tokens if args.prompt_tokens is not None else (50 if small else 1000)
    if new_tokens < 2 or prompt_tokens < 8 or prompt_tokens + new_tokens > IDEFICS_9B["max_position_embeddings"]:
        raise ValueError("bench/gpu.py: need --new-tokens >= 2, --prompt-tokens >= 8, and their sum <= 2048")
    copy_gib = args.copy_gib if args.copy_gib is not None else (1 / 16 if small else 4.0)
    spec = SMALL if small else IDEFICS_9B
    layers, hidden = spec["num_hidden_layers"], spec["hidden_size"]
    label = (f"{'small test config' if small else 'IDEFICS-9B architecture'}: {layers} layers, hidden {hidden}, "
             f"{layers // spec['cross_layer_interval']} gated cross-attention layers, "
             f"vision {spec['vision_config']['embed_dim']}-wide {spec['vision_config']['num_hidden_layers']} layers "
             f"at {spec['vision_config']['image_size']} px, perceiver {spec['perceiver_config']['resampler_n_latents']}"
             f" latents; random {args.dtype} weights")
    return Plan(spec=spec, batch_sizes=batch_sizes, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                warmup_tokens=max(1, args.warmup_tokens), copy_bytes=int(copy_gib * 2**30), budget_s=args.budget,
                device="cpu" if args.cpu else "cuda", dtype_name=args.dtype, seed=args.seed, label=label)


def _usage_error(line: str) -> int:
    print(line, file=sys.stderr)
    return 2


# -- model, tokenizer, processor --------------------------------------------------------------------------
def build_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly `vocab_size` base ids (`<unk>`, `<s>`, `</s>`, then words "w3"...),
    and IDEFICS's two image tokens as ids vocab_size and vocab_size + 1 (as in the real tokenizer).
    Every word of a prompt is one token, so prompt lengths are exact, and any id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
        additional_special_tokens=[FAKE_IMAGE_TOKEN, IMAGE_TOKEN], padding_side="left", model_max_length=2048,
    )
    assert len(tokenizer) == vocab_size + 2, len(tokenizer)
    assert tokenizer.convert_tokens_to_ids(FAKE_IMAGE_TOKEN) == vocab_size
    return tokenizer


def build_processor(tokenizer, image_size: int):
    from transformers import IdeficsProcessor
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    image_processor = IdeficsImageProcessorPil(image_size=image_size)
    return IdeficsProcessor(image_processor=image_processor, tokenizer=tokenizer, image_size=image_size)


def build_model(spec: dict[str, Any], device, dtype):
    """Random weights made on `device` in `dtype` directly (no CPU init: 9B parameters on CPU take minutes).

    The constructor's own initialisation runs on the device: normal(0, initializer_range=0.02) for linear and
    embedding weights, ones for the norms: small enough that activations stay finite through 32 layers.
    """
    import torch
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    config = IdeficsConfig(**copy.deepcopy(spec), freeze_text_layers=False, freeze_vision_layers=False,
                           freeze_lm_head=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = IdeficsForVisionText2Text(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        # The checkpoint's trained gates are open; zeros (the config's initializer) would make the images
        # irrelevant to the output. The cost of a step is the same either way.
        for name, param in model.named_parameters():
            if name.endswith(("alpha_cross_attn", "alpha_dense")):
                param.fill_(0.5)
    model.eval()
    model.requires_grad_(False)
    return model


def build_loaded(model, processor, device, dtype):
    from model_server.loading import LoadedModel

    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    fake_id = tokenizer.convert_tokens_to_ids(FAKE_IMAGE_TOKEN)
    eos = tokenizer.eos_token_id
    return LoadedModel(
        name="random-idefics-9b-architecture",
        model=model,
        processor=processor,
        device=device,
        dtype=dtype,
        instruct=False,
        # `</s>` stays a stop token (the engine checks it every step, as in serving) but is also banned like
        # the image tokens, so random weights can never end a row early: every row runs to --new-tokens.
        # `<unk>` and `<s>` are banned too, so that every token is visible text (a streamed delta).
        stop_token_ids=(eos,),
        bad_words_ids=[[image_id], [fake_id], [eos], [tokenizer.unk_token_id], [tokenizer.bos_token_id]],
        max_positions=int(model.config.max_position_embeddings),
    )


# -- measurements -----------------------------------------------------------------------------------------
def measure_bandwidth(device, nbytes: int, repeats: int = 10) -> float:
    """Bytes moved per second (read + written) by a device-to-device copy of `nbytes`."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(7)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            dst.copy_(src)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        started = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        seconds = time.perf_counter() - started
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes * repeats / seconds


_PARTS = (("model.layers.", "decoder_layers"), ("model.gated_cross_attn_layers.", "gated_cross_attn_layers"),
          ("model.norm.", "final_norm"), ("lm_head.", "lm_head"), ("model.embed_tokens.", "not_read_embed_tokens"),
          ("model.vision_model.", "not_read_vision_model"), ("model.perceiver_resampler.", "not_read_perceiver"))
"""Parameter name prefix -> the part of the model it belongs to."""


def weight_bytes_per_step(model) -> tuple[int, dict[str, int]]:
    """Parameter bytes one decode step reads, and a breakdown by part (counted and not counted)."""
    parts = {"decoder_layers": 0, "gated_cross_attn_layers": 0, "final_norm": 0, "lm_head": 0,
             "not_read_embed_tokens": 0, "not_read_vision_model": 0, "not_read_perceiver": 0, "other": 0}
    for name, param in model.named_parameters():  # each shared parameter once
        part = next((part for prefix, part in _PARTS if name.startswith(prefix)), "other")
        parts[part] += param.numel() * param.element_size()
    counted = parts["decoder_layers"] + parts["gated_cross_attn_layers"] + parts["final_norm"] + parts["lm_head"]
    return counted, parts


def make_prompts(loaded, batch: int, prompt_tokens: int, new_tokens: int, image_size: int, seed: int) -> list:
    """`batch` prompts of exactly `prompt_tokens` tokens (BOS, one image = 3 tokens, words), each its own image."""
    import numpy as np
    from PIL import Image

    from model_server.types import GenerationParams, Prompt

    vocab = int(loaded.model.config.vocab_size)
    rng = np.random.default_rng(seed)
    params = GenerationParams(max_new_tokens=new_tokens, decoding="greedy")
    words = prompt_tokens - 4
    prompts = []
    for _ in range(batch):
        image = Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))
        text = " ".join(f"w{i}" for i in rng.integers(3, vocab, words))
        prompts.append(Prompt(items=(image, text), params=params))
    return prompts


@dataclass
class _Outcome:
    text: str = ""
    reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    """The engine's own first-token time."""
    first_seen_at: float | None = None
    """When the first token reached us (first step report or streamed delta): after the GPU finished it."""
    done_at: float = 0.0

    def seen(self) -> None:
        if self.first_seen_at is None:
            self.first_seen_at = time.monotonic()


@dataclass
class RunResult:
    batch: int
    seconds: float
    outcomes: list[_Outcome] = field(default_factory=list)
    started_at: float = 0.0

    @property
    def generated(self) -> int:
        return sum(o.completion_tokens for o in self.outcomes)


def run_batch(engine, prompts: list, deadline: float, sync) -> RunResult:
    """One `LocalEngine.generate` call over `prompts`: per-row first-token and end times."""
    from model_server.engine import Row

    outcomes = [_Outcome() for _ in prompts]
    rows = [Row(prompt=p, deadline=deadline, cancelled=threading.Event(), key=k) for k, p in enumerate(prompts)]

    def after_step(step) -> None:
        for row, _delta in step.deltas:
            outcomes[row.key].seen()
        for done in step.finished:
            out = outcomes[done.row.key]
            out.done_at = time.monotonic()
            out.text, out.reason = done.text, str(done.reason)
            out.prompt_tokens, out.completion_tokens = int(done.prompt_tokens), int(done.completion_tokens)
            out.first_token_at = done.first_token_at

    for row, out in zip(rows, outcomes, strict=True):
        # The engine reports each step to the row after reading the chosen token back from the device, so
        # the first report is the true first-token time. (Its own `first_token_at` is taken just before that
        # read, when on a GPU the prefill may still be running.)
        row.on_step = out.seen
    sync()
    started = time.monotonic()
    engine.generate(rows, after_step=after_step)
    sync()
    seconds = time.monotonic() - started
    for row, out in zip(rows, outcomes, strict=True):
        if out.first_token_at is None:
            out.first_token_at = getattr(row, "first_token_at", None)
    return RunResult(batch=len(prompts), seconds=seconds, outcomes=outcomes, started_at=started)


def summarise(run: RunResult, new_tokens: int) -> dict[str, Any]:
    outs = run.outcomes
    firsts = [o.first_seen_at or o.first_token_at for o in outs]
    firsts = [f for f in firsts if f is not None]
    result: dict[str, Any] = {
        "batch": run.batch,
        "seconds": round(run.seconds, 4),
        "generated_tokens": run.generated,
        "rows_full_length": sum(o.completion_tokens >= new_tokens for o in outs),
        "prompt_tokens": max((o.prompt_tokens for o in outs), default=0),
        "finish_reasons": sorted({o.reason for o in outs}),
        "tokens_per_s": run.generated / run.seconds if run.seconds > 0 else None,
        "ttft_s": None,
        "decode_tokens_per_s": None,
        "decode_step_ms": None,
    }
    if firsts:
        result["ttft_s"] = sum(f - run.started_at for f in firsts) / len(firsts)
        decode_s = max(o.done_at for o in outs) - min(firsts)
        decode_tokens = sum(max(0, o.completion_tokens - 1) for o in outs)
        steps = max(o.completion_tokens for o in outs) - 1
        if decode_s > 0 and decode_tokens > 0:
            result["decode_tokens_per_s"] = decode_tokens / decode_s
            result["decode_step_ms"] = 1000 * decode_s / steps
    return result


def bench_batch(engine, loaded, plan: Plan, batch: int, image_size: int, deadline: float, sync) -> dict[str, Any]:
    """Warm-up once (short rows, same shapes), then the measured run; its summary."""
    prompts = make_prompts(loaded, batch, plan.prompt_tokens, plan.new_tokens, image_size, plan.seed + batch)
    warm = make_prompts(loaded, batch, plan.prompt_tokens, plan.warmup_tokens, image_size, plan.seed + 7 * batch)
    warm_run = run_batch(engine, warm, deadline, sync)
    say(f"batch {batch}: warm-up ({plan.warmup_tokens} tokens a row) {warm_run.seconds:.2f}s")
    run = run_batch(engine, prompts, deadline, sync)
    summary = summarise(run, plan.new_tokens)
    summary["encode_s"] = time_encode(loaded, prompts)
    return summary


def time_encode(loaded, prompts: list) -> float | None:
    """Seconds the CPU side of the prompt encoding takes (tokenizer, image processor, image mask): part of ttft."""
    try:
        from model_server.encoding import encode
    except ImportError:
        return None
    started = time.monotonic()
    encode(loaded.processor, prompts)
    return time.monotonic() - started


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu and not args.small:
        return _usage_error("bench/gpu.py: --cpu needs --small (the 9B architecture on CPU would take hours)")
    import torch

    if not args.cpu and not torch.cuda.is_available():
        return _usage_error(NO_CUDA)
    try:
        plan = make_plan(args)
    except ValueError as exc:
        return _usage_error(str(exc))
    deadline = _STARTED + plan.budget_s
    device = torch.device(plan.device if plan.device == "cpu" else f"cuda:{torch.cuda.current_device()}")
    dtype = getattr(torch, plan.dtype_name)
    is_cuda = device.type == "cuda"
    torch.manual_seed(plan.seed)

    def sync() -> None:
        if is_cuda:
            torch.cuda.synchronize(device)

    device_name = torch.cuda.get_device_name(device) if is_cuda else "cpu"
    say(f"device {device_name}; {plan.label}")

    bandwidth = measure_bandwidth(device, plan.copy_bytes)
    say(f"bandwidth: {bandwidth / 1e9:.1f} GB/s (copy of {plan.copy_bytes / 2**30:.2f} GiB, read + write)")

    from model_server.engine import LocalEngine

    t0 = time.monotonic()
    tokenizer = build_tokenizer(plan.spec["vocab_size"])
    processor = build_processor(tokenizer, plan.spec["vision_config"]["image_size"])
    model = build_model(plan.spec, device, dtype)
    sync()
    loaded = build_loaded(model, processor, device, dtype)
    engine = LocalEngine(loaded)
    params = sum(p.numel() for p in model.parameters())
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    step_bytes, parts = weight_bytes_per_step(model)
    ceiling = bandwidth / step_bytes
    say(f"model built in {time.monotonic() - t0:.1f}s: {params / 1e6:,.1f}M parameters, "
        f"{weights_bytes / 1e9:.3f} GB; a decode step reads {step_bytes / 1e9:.3f} GB of weights "
        f"-> batch-1 ceiling {ceiling:.1f} tokens/s")
    cfg = model.config
    # Keys and values of every self-attention layer, at the mean length of the run (the cross-attention
    # layers keep no cache: they re-project the 64 image latents each step, counted with their weights).
    kv_bytes_batch1 = (2 * cfg.num_hidden_layers * cfg.hidden_size * (plan.prompt_tokens + plan.new_tokens // 2)
                       * torch.empty((), dtype=dtype).element_size())

    image_size = plan.spec["vision_config"]["image_size"]
    weights_allocated_gb = round(torch.cuda.memory_allocated(device) / 1e9, 2) if is_cuda else None
    results: dict[int, dict[str, Any]] = {}
    skipped: list[int] = []
    errors: dict[str, str] = {}
    peaks: dict[str, float] = {}
    last: tuple[int, float] | None = None  # (batch, seconds of its warm-up + run)
    for index, batch in enumerate(plan.batch_sizes):
        left = deadline - time.monotonic()
        # A conservative guess: the last batch's time scaled by the batch size (prefill grows linearly).
        guess = last[1] * batch / last[0] if last else 0.0
        if left <= 0 or guess > left:
            say(f"batch {batch}: skipped, {left:.0f}s of the budget left and it would need ~{guess:.0f}s")
            skipped.append(batch)
            continue
        if is_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        began = time.monotonic()
        try:
            summary = bench_batch(engine, loaded, plan, batch, image_size, deadline, sync)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            first_line = (str(exc).splitlines() or [""])[0][:200]
            say(f"batch {batch}: out of memory ({first_line}); stopping here")
            errors[str(batch)] = f"out of memory: {first_line}"
            skipped.extend(plan.batch_sizes[index + 1:])
            break
        finally:
            if is_cuda:
                peaks[str(batch)] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        last = (batch, time.monotonic() - began)
        summary["peak_memory_gb"] = peaks.get(str(batch))
        results[batch] = summary
        if summary["rows_full_length"] < batch:
            say(f"batch {batch}: only {summary['rows_full_length']}/{batch} rows reached {plan.new_tokens} tokens "
                f"(finish reasons {summary['finish_reasons']})")
        say(f"batch {batch}: {summary['generated_tokens']} tokens in {summary['seconds']:.2f}s = "
            f"{summary['tokens_per_s']:.1f} tokens/s; ttft {_fmt(summary['ttft_s'], 's')} (encode "
            f"{_fmt(summary['encode_s'], 's')}); decode {_fmt(summary['decode_tokens_per_s'], ' tokens/s')} "
            f"({_fmt(summary['decode_step_ms'], ' ms/step')})"
            + (f"; peak {peaks[str(batch)]:.1f} GB allocated" if is_cuda else ""))
    if is_cuda:
        torch.cuda.empty_cache()
    partial = bool(skipped or errors or any(r["rows_full_length"] < r["batch"] for r in results.values()))

    b1 = results.get(1, {}).get("decode_tokens_per_s")
    b32 = results.get(32, {}).get("tokens_per_s")
    vs_ceiling = b1 / ceiling if b1 else None
    report = {
        "tokens_per_s": {str(b): _round(r["tokens_per_s"], 2) for b, r in results.items()},
        "decode_tokens_per_s": {str(b): _round(r["decode_tokens_per_s"], 2) for b, r in results.items()},
        "ttft_s": {str(b): _round(r["ttft_s"]) for b, r in results.items()},
        "encode_s": {str(b): _round(r["encode_s"]) for b, r in results.items()},
        "decode_step_ms": {str(b): _round(r["decode_step_ms"], 3) for b, r in results.items()},
        "generated_tokens": {str(b): r["generated_tokens"] for b, r in results.items()},
        "bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "weight_bytes_per_step": step_bytes,
        "weight_bytes_per_step_counts": "decoder layers + gated cross-attention layers (incl. their k/v projections "
                                        "of the image latents, recomputed every step) + final norm + lm_head; "
                                        "not the embedding table, vision tower or perceiver",
        "weight_bytes_breakdown": parts,
        "kv_cache_bytes_per_step_batch1": kv_bytes_batch1,
        "ceiling_tokens_per_s_batch1": round(ceiling, 2),
        "ceiling_tokens_per_s_batch1_with_kv": round(bandwidth / (step_bytes + kv_bytes_batch1), 2),
        "batch1_vs_ceiling": _round(vs_ceiling),
        "targets": {"batch1_vs_ceiling": TARGET_BATCH1_VS_CEILING, "batch32_tokens_per_s": TARGET_BATCH32_TOKENS_PER_S},
        # null where that batch size was not measured (e.g. --small runs batches 1 and 2 only).
        "targets_met": {
            "batch1_vs_ceiling": None if vs_ceiling is None else vs_ceiling >= TARGET_BATCH1_VS_CEILING,
            "batch32_tokens_per_s": None if b32 is None else b32 >= TARGET_BATCH32_TOKENS_PER_S,
        },
        "peak_memory_gb": peaks,
        "weights_allocated_gb": weights_allocated_gb,
        "max_memory_allocated_gb": max(peaks.values(), default=weights_allocated_gb),
        "prompt_tokens": max((r["prompt_tokens"] for r in results.values()), default=plan.prompt_tokens),
        "new_tokens": plan.new_tokens,
        "parameters": params,
        "device": device_name,
        "device_memory_gb": (round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1)
                             if is_cuda else None),
        "dtype": plan.dtype_name,
        "config": plan.label,
        "partial": partial,
        "skipped_batch_sizes": skipped,
        "errors": errors,
        "elapsed_s": round(time.monotonic() - _STARTED, 1),
    }
    for line in _table(results, ceiling):
        say(line)
    print(json.dumps(report))
    return 0


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _fmt(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{value:.3g}{unit}" if value < 10 else f"{value:.1f}{unit}"


def _table(results: dict[int, dict[str, Any]], ceiling: float) -> list[str]:
    lines = [f"{'batch':>5} {'tokens/s':>10} {'ttft s':>8} {'decode tok/s':>13} {'ms/step':>8}"]
    for b, r in results.items():
        lines.append(f"{b:>5} {r['tokens_per_s']:>10.1f} {r['ttft_s'] or 0:>8.3f} "
                     f"{r['decode_tokens_per_s'] or 0:>13.1f} {r['decode_step_ms'] or 0:>8.2f}")
    lines.append(f"batch-1 ceiling {ceiling:.1f} tokens/s (target: batch-1 decode >= {TARGET_BATCH1_VS_CEILING} of it; "
                 f"batch 32 >= {TARGET_BATCH32_TOKENS_PER_S:.0f} tokens/s)")
    return lines


if __name__ == "__main__":
    sys.exit(main())

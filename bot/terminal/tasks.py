"""The guide's tasks as one-shot terminal commands: caption, ask, classify, story, fewshot.

Everything the user gave is checked before the model loads; `--dry-run` prints the prompts and stops.
"""

from __future__ import annotations

import argparse
import asyncio

from bot.images.check import CheckedImage
from bot.images.fetch import ImageFetcher
from bot.pipeline.services import model_info_without_weights, open_executor
from bot.settings import Settings
from bot.terminal.inputs import UsageError, load_images, progress
from model_server.types import RANKED_BY_GENERATION, GenerationResult, Prompt


def task_prompts(args: argparse.Namespace, images: list[CheckedImage]) -> list[Prompt]:
    from model_server import tasks

    pictures = [i.image for i in images]
    match args.command:
        case "caption":
            if args.prompt is not None:
                return [tasks.prompted_caption(p, args.prompt) for p in pictures]
            return [tasks.caption(p) for p in pictures]
        case "ask":
            return [tasks.vqa(pictures[0], args.question)]
        case "classify":
            return [tasks.classify_prompt(pictures[0], tasks.validate_categories(args.categories))]
        case "story":
            return [tasks.story(pictures)]
        case "fewshot":
            examples = list(zip(pictures[1:], [answer for _, answer in args.example], strict=True))
            return [tasks.fewshot(examples, pictures[0], instruction=args.instruction)]
    raise AssertionError(args.command)


def image_sources(args: argparse.Namespace) -> list[str]:
    if args.command in ("caption", "story"):
        return list(args.images)
    if args.command == "fewshot":
        return [args.image, *(image for image, _ in args.example)]
    return [args.image]


async def run_task(args: argparse.Namespace, settings: Settings) -> int:
    from model_server.tasks import validate_categories

    # A bad category list fails before any image is read.
    categories = validate_categories(args.categories) if args.command == "classify" else []
    if getattr(args, "top", None) is not None and args.top < 1:
        raise UsageError("--top must be at least 1")
    # Everything the user gave is checked before the model loads (minutes for a real checkpoint).
    limits = settings.image_limits()
    async with ImageFetcher.open(limits) as fetcher:
        images = await load_images(image_sources(args), fetcher, limits)
    prompts = task_prompts(args, images)
    if args.show_prompt or args.dry_run:
        # The model's own text: IDEFICS v1's, or the chat template's of Idefics2/Idefics3/SmolVLM.
        info = await asyncio.to_thread(model_info_without_weights, args.model or settings.idefics_model)
        for prompt in prompts:
            print(info.show(prompt))
        if args.dry_run:
            return 0
    async with open_executor(settings, args.model, progress) as (executor, _info):
        if args.command == "classify" and not args.generate:
            ranked = await executor.rank(prompts[0], categories)
            width = max(len(r.category) for r in ranked)
            for r in ranked[: args.top or len(ranked)]:
                print(f"{r.category.ljust(width)}  {r.probability * 100:5.1f}%")
            if ranked and ranked[0].by_generation:
                print(f"({RANKED_BY_GENERATION})")
            return 0
        results = await asyncio.gather(*(executor.generate(p) for p in prompts))
        sources = image_sources(args)
        for index, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
            text = answer_text(args, prompt, result)
            print(f"{sources[index]}: {text}" if args.command == "caption" and len(prompts) > 1 else text)
    return 0


def answer_text(args: argparse.Namespace, prompt: Prompt, result: GenerationResult) -> str:
    if args.command == "caption" and args.prompt:
        # A prompted caption continues the prompt: show the sentence whole, as the guide does.
        return f"{args.prompt.strip()} {result.text}".strip()
    return result.text

"""`idefics-bot`: the Discord bot, a terminal chat, and the guide's tasks as one-shot commands.

User mistakes (a missing file, a non-image, an empty question, a bad setting) end with exit status 2
and one line on stderr; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from bot.errors import ImageTooLarge, UserInputError
from bot.images.check import CheckedImage, ImageLimits, check_image
from bot.images.fetch import ImageFetcher
from bot.ops.log_format import use_log_format
from bot.pipeline.conversation import IncomingMessage, Reply
from bot.pipeline.services import open_executor, open_services
from bot.settings import Settings
from model_server.errors import ModelServerError
from model_server.prompt import PromptError, prompt_text
from model_server.types import GenerationResult, Prompt
from storage import StorageError

CONSOLE_CHANNEL = "console"
CONSOLE_USER = "console-user"


class UsageError(Exception):
    """A mistake on the command line or in its inputs: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage first; one line that says what was wrong is enough.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="idefics-bot", description="IDEFICS, the open vision-language model, in Discord.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def generating(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--model", help="hub id or local folder (default: IDEFICS_MODEL)")
        p.add_argument("--show-prompt", action="store_true",
                       help="print the exact prompt text the model gets, each image as <image>")
        p.add_argument("--dry-run", action="store_true", help="print the prompt and stop; no model is loaded")
        return p

    sub.add_parser("run", help="run the Discord bot", description="Run the Discord bot (needs DISCORD_TOKEN).")
    generating("chat", "chat in the terminal, with the bot's storage (channel 'console'); "
                       "/image PATH_OR_URL attaches an image, /reset clears, /quit leaves")
    p = generating("caption", "caption one or more images (several are captioned as one batch)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="local path or http(s) URL")
    p.add_argument("--prompt", help='text the caption continues, e.g. "This is an image of "')
    p = generating("ask", "answer a question about an image (visual question answering)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("question", metavar="QUESTION")
    p = generating("classify", "rank an image's categories by likelihood")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--categories", required=True, help='comma-separated, e.g. "animals, vegetables, cars"')
    p.add_argument("--top", type=int, default=None, help="show only the N most likely")
    p.add_argument("--generate", action="store_true", help="let the model write the category (the guide's way)")
    p = generating("story", "write a story guided by one or more images (beam search, 200 tokens)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p = generating("fewshot", "answer in the format of worked examples (few-shot prompting)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--example", nargs=2, action="append", required=True, metavar=("IMAGE", "ANSWER"),
                   help="an example image and its answer; repeat for more examples")
    p.add_argument("--instruction", default="Describe this image.", help='default: "Describe this image."')
    return parser


# -- inputs ---------------------------------------------------------------------------------------
async def load_image(source: str, fetcher: ImageFetcher, limits: ImageLimits) -> CheckedImage:
    """A local file or an http(s) link, checked like any attachment."""
    if source.startswith(("http://", "https://")):
        data = await fetcher.fetch(source)
    else:
        data = await asyncio.to_thread(_read_local, Path(source), limits)
    try:
        return await asyncio.to_thread(check_image, data, limits)
    except UserInputError as exc:
        raise UsageError(f"{source}: {exc.user_message}") from exc


def _read_local(path: Path, limits: ImageLimits) -> bytes:
    if not path.is_file():
        raise UsageError(f"no such image file: {path}")
    size = path.stat().st_size
    if size > limits.max_bytes:
        # Refused from its size alone: a 60 MB file is never read.
        raise ImageTooLarge(limits.max_bytes, detail=f"{size} bytes")
    return path.read_bytes()


async def load_images(sources: Sequence[str], fetcher: ImageFetcher, limits: ImageLimits) -> list[CheckedImage]:
    return list(await asyncio.gather(*(load_image(s, fetcher, limits) for s in sources)))


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


# -- one-shot tasks -------------------------------------------------------------------------------
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
        for prompt in prompts:
            print(prompt_text(prompt.items, display=True))
        if args.dry_run:
            return 0
    async with open_executor(settings, args.model, _progress) as (executor, _info):
        if args.command == "classify" and not args.generate:
            ranked = await executor.rank(prompts[0], categories)
            width = max(len(r.category) for r in ranked)
            for r in ranked[: args.top or len(ranked)]:
                print(f"{r.category.ljust(width)}  {r.probability * 100:5.1f}%")
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


# -- terminal chat --------------------------------------------------------------------------------
class ConsoleSink:
    """Streams the answer to stdout as it is generated."""

    def __init__(self) -> None:
        self.started = False

    async def queued(self, ahead: int) -> None:
        print(f"(queued, {ahead} ahead)", file=sys.stderr)

    async def delta(self, text: str) -> None:
        if not self.started:
            print("idefics> ", end="")
            self.started = True
        print(text, end="", flush=True)

    async def finish(self, text: str, result: GenerationResult) -> Reply | None:
        if not self.started:
            print(f"idefics> {text}", end="")
        print()
        return Reply(platform_id=f"console-{uuid.uuid4().hex}", text=text)

    async def failed(self, user_message: str) -> None:
        print(f"idefics> ({user_message})", file=sys.stderr)


async def run_chat(args: argparse.Namespace, settings: Settings) -> int:
    async with open_services(settings, model=args.model, dry_run=args.dry_run, progress=_progress) as services:
        conversation = services.conversation
        pending: list[CheckedImage] = []
        interactive = sys.stdin.isatty()
        if interactive:
            print("Chat with IDEFICS. /image PATH_OR_URL attaches an image, /reset clears, /quit leaves.")
        while True:
            line = await asyncio.to_thread(_read_line, "you> " if interactive else "")
            if line is None or line.strip() == "/quit":
                return 0
            line = line.strip()
            if not line:
                continue
            if line == "/reset":
                removed = await services.database.store.clear_channel(CONSOLE_CHANNEL)
                print(f"(history cleared: {removed} messages)")
                continue
            if line.startswith("/image"):
                source = line.removeprefix("/image").strip()
                try:
                    pending.append(await load_image(source, services.fetcher, settings.image_limits()))
                    print(f"(image attached: {len(pending)} pending)")
                except (UsageError, UserInputError) as exc:
                    print(f"({_message(exc)})", file=sys.stderr)
                continue
            message = IncomingMessage(
                platform_id=f"console-{uuid.uuid4().hex}", channel_key=CONSOLE_CHANNEL, author_id=CONSOLE_USER,
                author_name="you", text=line, images=tuple(pending),
            )
            pending = []
            if args.show_prompt or args.dry_run:
                stored = await conversation.record(message, request=not args.dry_run)
                if stored is not None:
                    print(prompt_text((await conversation.prompt_for(stored)).items, display=True))
                if args.dry_run or stored is None:
                    continue
                await conversation.respond(stored, ConsoleSink())
            else:
                await conversation.handle(message, ConsoleSink())


def _read_line(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


# -- entry point ----------------------------------------------------------------------------------
def _progress(line: str) -> None:
    print(f"[idefics-bot] {line}", file=sys.stderr, flush=True)


def _message(exc: BaseException) -> str:
    return getattr(exc, "user_message", None) or str(exc)


def _settings_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    name = str(first["loc"][0]).upper() if first.get("loc") else "a setting"
    return f"invalid setting {name}: {first['msg']}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"idefics-bot: error: {_settings_error(exc)}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(settings.log_level if args.command == "run" else logging.WARNING)
    use_log_format(settings.log_format)
    try:
        if args.command == "run":
            from bot.discord_app.app import serve

            return asyncio.run(serve(settings))
        if args.command == "chat":
            return asyncio.run(run_chat(args, settings))
        return asyncio.run(run_task(args, settings))
    except (UsageError, UserInputError, PromptError, ModelServerError, StorageError) as exc:
        print(f"idefics-bot: error: {_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The terminal chat: the Discord pipeline on stdin and stdout, with the bot's storage (channel "console").

`/image PATH_OR_URL` attaches an image to the next message, `/reset` clears the history, `/quit` leaves.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

from bot.errors import UserInputError, user_message
from bot.images.check import CheckedImage
from bot.pipeline.conversation import IncomingMessage, Reply
from bot.pipeline.services import open_services
from bot.settings import Settings
from bot.terminal.inputs import load_image, progress
from model_server.types import GenerationResult

CONSOLE_CHANNEL = "console"
CONSOLE_USER = "console-user"


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
    async with open_services(settings, model=args.model, dry_run=args.dry_run, progress=progress) as services:
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
                except UserInputError as exc:
                    print(f"({user_message(exc)})", file=sys.stderr)
                continue
            message = IncomingMessage(
                platform_id=f"console-{uuid.uuid4().hex}", channel_key=CONSOLE_CHANNEL, author_id=CONSOLE_USER,
                author_name="you", text=line, images=tuple(pending),
            )
            pending = []
            if args.show_prompt or args.dry_run:
                stored = await conversation.record(message, request=not args.dry_run)
                if stored is not None:
                    print(conversation.model.show(await conversation.prompt_for(stored)))
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

"""`idefics-bot`: the Discord bot, a terminal chat, and the guide's tasks as one-shot commands.

User mistakes (a missing file, a non-image, an empty question, a bad setting) end with exit status 2
and one line on stderr; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from pydantic import ValidationError

from bot.errors import UserInputError, user_message
from bot.ops.log_format import use_log_format
from bot.settings import Settings
from bot.terminal.chat import run_chat
from bot.terminal.tasks import run_task
from model_server.errors import ModelServerError
from model_server.prompt import PromptError
from storage import StorageError


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


# -- entry point ----------------------------------------------------------------------------------
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
    except (UserInputError, PromptError, ModelServerError, StorageError) as exc:
        print(f"idefics-bot: error: {user_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

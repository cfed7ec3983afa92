"""What the terminal commands read: images from local paths or links, checked like any attachment.

A mistake in what was given (a missing file, a non-image) is a `UsageError`: one line, exit status 2.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from bot.errors import ImageTooLarge, UserInputError
from bot.images.check import CheckedImage, ImageLimits, check_image
from bot.images.fetch import ImageFetcher


class UsageError(UserInputError):
    """A mistake on the command line or in its inputs: one line, exit status 2."""

    default_user_message = "that command line could not be used"


def progress(line: str) -> None:
    """Slow steps (loading a model, connecting to a server), told on stderr so stdout stays the answer."""
    print(f"[idefics-bot] {line}", file=sys.stderr, flush=True)


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

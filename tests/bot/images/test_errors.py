"""The error hierarchy: one root, user message apart from log detail."""

from __future__ import annotations

import pytest

from bot import errors
from bot.errors import (
    CorruptImage,
    FetchError,
    FetchFailed,
    FetchTimeout,
    ImageError,
    ImageTooLarge,
    NotAnImage,
    TooManyImages,
    TooManyPixels,
    UnsafeUrl,
    UserInputError,
)


@pytest.mark.parametrize(
    ("err", "parent", "message"),
    [
        (NotAnImage(), ImageError, "that file is not an image"),
        (ImageTooLarge(20 * 1024 * 1024), ImageError, "the image is too large (max 20 MB)"),
        (ImageTooLarge(1536 * 1024), ImageError, "the image is too large (max 1.5 MB)"),
        (TooManyPixels(40_000_000), ImageError, "the image has too many pixels (max 40 megapixels)"),
        (CorruptImage(), ImageError, "the image file is damaged or incomplete"),
        (TooManyImages(4), ImageError, "too many images (max 4 per message)"),
        (UnsafeUrl(), FetchError, "that link is not allowed"),
        (FetchTimeout(), FetchError, "the image download took too long"),
        (FetchFailed(status=403), FetchError, "the image could not be downloaded (HTTP 403)"),
        (FetchFailed(), FetchError, "the image could not be downloaded"),
    ],
)
def test_messages(err: UserInputError, parent: type, message: str) -> None:
    assert isinstance(err, parent) and isinstance(err, UserInputError)
    assert err.user_message == message
    assert len(message) <= 80


def test_detail_kept_apart_from_user_message() -> None:
    err = CorruptImage(detail="OSError: image file is truncated (3 bytes not processed)")
    assert err.user_message == "the image file is damaged or incomplete"
    assert "truncated" in err.detail and "truncated" in str(err)
    assert "truncated" not in err.user_message


def test_no_discord_or_torch_imports() -> None:
    import subprocess
    import sys

    code = (
        "import sys, bot.errors, bot.images.check, bot.images.fetch;"
        "bad = [m for m in ('discord', 'torch', 'transformers') if m in sys.modules];"
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
    assert errors.UserInputError.__mro__[1] is Exception

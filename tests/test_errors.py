"""One error convention across the packages, and one way from any error to the line a user reads."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from bot.discord_app.cogs.channel import _NotAllowed
from bot.errors import (
    INTERNAL_ERROR,
    FetchFailed,
    ImageTooLarge,
    NotAnImage,
    RateLimited,
    TooManyImages,
    UserInputError,
    user_message,
)
from bot.terminal.inputs import UsageError
from model_server.errors import Busy, ExecutorClosed, ModelServerError, ModelStuck
from model_server.prompt import PromptError
from storage.errors import DatabaseBusy, DatabaseUnavailable, InvalidSetting, StorageError
from storage.errors import ImageTooLarge as StoredImageTooLarge

ROOTS = [UserInputError, StorageError, ModelServerError]


@pytest.mark.parametrize("root", ROOTS)
def test_package_roots_share_one_constructor(root: type[BaseException]) -> None:
    signature = inspect.signature(root.__init__)
    assert signature == inspect.signature(UserInputError.__init__)
    assert [(p.name, p.kind, p.default) for p in signature.parameters.values()] == [
        ("self", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
        ("user_message", inspect.Parameter.POSITIONAL_OR_KEYWORD, None),
        ("detail", inspect.Parameter.KEYWORD_ONLY, ""),
    ]
    assert isinstance(root.default_user_message, str) and root.default_user_message  # type: ignore[attr-defined]


@pytest.mark.parametrize("root", ROOTS)
def test_str_is_the_detail_when_given_else_the_user_message(root: type[BaseException]) -> None:
    plain = root()
    assert plain.user_message == root.default_user_message  # type: ignore[attr-defined]
    assert plain.detail == "" and str(plain) == plain.user_message  # type: ignore[attr-defined]
    told = root("shown to the user", detail="request 12: 3 bytes")
    assert told.user_message == "shown to the user" and told.detail == "request 12: 3 bytes"  # type: ignore[attr-defined]
    assert str(told) == "request 12: 3 bytes"


@pytest.mark.parametrize(
    ("exc", "shown"),
    [
        (NotAnImage(detail="attachment 7: 12 bytes"), "that file is not an image"),
        (ImageTooLarge(20 * 1024 * 1024), "the image is too large (max 20 MB)"),
        (TooManyImages(4), "too many images (max 4 per message)"),
        (FetchFailed(status=404, detail="host example.org"), "the image could not be downloaded (HTTP 404)"),
        (RateLimited(retry_after_s=3.0), "you are sending requests too fast; try again in a minute"),
        (_NotAllowed(), "you need the Manage Channels permission to do that here"),
        (UsageError("no such image file: photo.png"), "no such image file: photo.png"),
        (ModelServerError(user_message="no model is loaded", detail="no executor"), "no model is loaded"),
        (Busy(3, 16), "the model is busy (3 requests waiting), try again in a minute"),
        (ExecutorClosed(), "the bot is restarting, please ask again in a minute"),
        (ModelStuck(), "the model stopped responding; the bot is restarting it, please ask again in a few minutes"),
        (PromptError("too many images for one prompt"), "too many images for one prompt"),
        (DatabaseBusy(detail="append: locked after 4 attempts"),
         "The conversation database is busy; please try again in a minute."),
        (DatabaseUnavailable(), "The conversation database is not available right now."),
        (InvalidSetting("The system prompt must be text.", detail="system_prompt: not a string"),
         "The system prompt must be text."),
        (StoredImageTooLarge(4096, 2048), "That image is too large to keep (the limit is 2 KiB)."),
        (ValueError("a bug, with internals: /srv/model/config.json"), INTERNAL_ERROR),
        (KeyError("channel"), INTERNAL_ERROR),
        (RuntimeError(), INTERNAL_ERROR),
        (asyncio.CancelledError(), INTERNAL_ERROR),
    ],
)
def test_user_message(exc: BaseException, shown: str) -> None:
    assert user_message(exc) == shown

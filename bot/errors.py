"""Errors caused by what a user sent, each carrying a short message that is safe to show them.

Hierarchy:

    UserInputError            the user sent something we cannot use; `user_message` is shown as is
    ├── ImageError            the bytes of an image (or how many there are) are unusable
    │   ├── NotAnImage        content is not PNG, JPEG, GIF, WebP or BMP
    │   ├── ImageTooLarge     more bytes than the limit
    │   ├── TooManyPixels     width x height over the limit (decompression bombs)
    │   ├── CorruptImage      truncated or damaged file
    │   └── TooManyImages     more images in one message than the limit
    ├── FetchError            a link could not be downloaded
    │   ├── UnsafeUrl         scheme, host or a resolved address is not allowed (private, loopback, ...)
    │   ├── FetchTimeout      the download took longer than the limit
    │   └── FetchFailed       HTTP error status, too many redirects, connection failure
    └── RateLimited           the user has too many requests running or sent too many in the last minute

`user_message` is short, plain and free of URLs or internals: the Discord layer and the terminal commands
show it without further wrapping. `detail` is for logs only (it may name a host or a library error, never a
full URL with its query string).

The three packages' roots (`UserInputError`, `model_server.errors.ModelServerError`,
`storage.errors.StorageError`) share one constructor, `(user_message=None, *, detail="")`, and a class
attribute `default_user_message`; `str(error)` is the detail when there is one, else the user message.
`user_message(exc)` below is the one place any exception becomes the line a user reads.
"""

from __future__ import annotations

from model_server.errors import ModelServerError
from storage.errors import StorageError

_MB = 1024 * 1024


class UserInputError(Exception):
    """Root of all errors that are the user's input, not our bug."""

    default_user_message: str = "that input could not be used"

    def __init__(self, user_message: str | None = None, *, detail: str = "") -> None:
        self.user_message: str = user_message or self.default_user_message
        """Shown to the user as is: short, lower-case start, no trailing period."""
        self.detail: str = detail
        """For logs only: ids, sizes, hosts, never message text."""
        super().__init__(detail or self.user_message)


class ImageError(UserInputError):
    default_user_message = "that image could not be used"


class NotAnImage(ImageError):
    default_user_message = "that file is not an image"


class ImageTooLarge(ImageError):
    def __init__(self, max_bytes: int, *, detail: str = "") -> None:
        self.max_bytes = max_bytes
        super().__init__(f"the image is too large (max {_format_mb(max_bytes)} MB)", detail=detail)


class TooManyPixels(ImageError):
    def __init__(self, max_pixels: int, *, detail: str = "") -> None:
        self.max_pixels = max_pixels
        megapixels = max_pixels / 1_000_000
        shown = f"{megapixels:.0f}" if megapixels >= 1 else f"{megapixels:.1f}"
        super().__init__(f"the image has too many pixels (max {shown} megapixels)", detail=detail)


class CorruptImage(ImageError):
    default_user_message = "the image file is damaged or incomplete"


class TooManyImages(ImageError):
    def __init__(self, max_count: int, *, detail: str = "") -> None:
        self.max_count = max_count
        super().__init__(f"too many images (max {max_count} per message)", detail=detail)


class FetchError(UserInputError):
    default_user_message = "the image could not be downloaded"


class UnsafeUrl(FetchError):
    default_user_message = "that link is not allowed"


class FetchTimeout(FetchError):
    default_user_message = "the image download took too long"


class FetchFailed(FetchError):
    def __init__(
        self, user_message: str | None = None, *, status: int | None = None, detail: str = ""
    ) -> None:
        self.status = status
        """HTTP status when the server answered with an error, else None."""
        if user_message is None and status is not None:
            user_message = f"the image could not be downloaded (HTTP {status})"
        super().__init__(user_message, detail=detail)


class RateLimited(UserInputError):
    default_user_message = "you are sending requests too fast; try again in a minute"

    def __init__(self, user_message: str | None = None, *, retry_after_s: float | None = None,
                 detail: str = "") -> None:
        self.retry_after_s = retry_after_s
        """Seconds until a new request would be accepted; None when it depends on running requests."""
        super().__init__(user_message, detail=detail)


def _format_mb(n_bytes: int) -> str:
    # 20 MiB reads "20", 1.5 MiB reads "1.5": users think in round numbers.
    mb = n_bytes / _MB
    return f"{mb:.0f}" if mb == int(mb) else f"{mb:.1f}"


INTERNAL_ERROR = "something went wrong on my side; please try again"
"""What a user reads for an error no package raised on purpose (a bug): the log has the traceback."""


def user_message(exc: BaseException) -> str:
    """The one short line a user reads for `exc`; the detail goes to the log separately.

    The roots of the bot's, the model server's and the storage's errors carry a message written for the user;
    anything else is a bug, and the user gets `INTERNAL_ERROR`.
    """
    if isinstance(exc, UserInputError | ModelServerError | StorageError):
        return exc.user_message
    return INTERNAL_ERROR

"""Every error `storage/` raises on purpose, under one root.

    StorageError            root; `user_message` is safe to show, `detail` (also `str(error)`) is for the log
    ├── DatabaseUnavailable  the database could not be opened or migrated (bad URL, missing driver, I/O), or
    │                        its server could not be reached during a call (stopped, restarting: `storage.retry`)
    ├── DatabaseBusy         a write found the database locked, still after a few retries (`storage.retry`)
    ├── ImageTooLarge        an image blob is over the store's byte bound
    ├── InvalidMessage       a `NewMessage` with a value the schema cannot hold (role, state, naive time)
    └── InvalidSetting       a channel setting with an unknown name or an out-of-range value

The log detail may name ids and sizes; neither part ever carries message text. The constructor is the one every
package root shares: `StorageError(user_message=None, *, detail="")`, the class's `default_user_message` when no
user message is given; `str(error)` is the detail when there is one, else the user message.
"""

from __future__ import annotations


class StorageError(Exception):
    """Root of the storage errors. `user_message` is what a person in the channel may read."""

    default_user_message: str = "Something went wrong while saving or loading the conversation."

    def __init__(self, user_message: str | None = None, *, detail: str = "") -> None:
        self.user_message: str = user_message or self.default_user_message
        """Shown to the user as is."""
        self.detail: str = detail
        """For logs only: ids and sizes, never message text."""
        super().__init__(detail or self.user_message)


UNREACHABLE_MESSAGE = "The conversation database is unreachable right now; please try again in a minute."
"""The user message of a `DatabaseUnavailable` raised when the server was lost mid-run (it usually comes back)."""


class DatabaseUnavailable(StorageError):
    default_user_message = "The conversation database is not available right now."


class DatabaseBusy(StorageError):
    default_user_message = "The conversation database is busy; please try again in a minute."


class ImageTooLarge(StorageError):
    default_user_message = "That image is too large to keep."

    def __init__(self, byte_size: int, max_bytes: int) -> None:
        super().__init__(
            f"That image is too large to keep (the limit is {max_bytes // 1024} KiB).",
            detail=f"image of {byte_size} bytes is over the bound of {max_bytes} bytes",
        )
        self.byte_size = byte_size
        self.max_bytes = max_bytes


class InvalidMessage(StorageError):
    default_user_message = "That message could not be saved."


class InvalidSetting(StorageError):
    default_user_message = "That setting value is not valid."

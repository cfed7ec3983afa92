"""The model server's exceptions: one root, a few meaningful kinds.

Every package's root error takes the same arguments: `user_message` (short, safe to show to a Discord user
or on a terminal; the class's `default_user_message` when not given) and the keyword `detail` (for the log
only: ids, sizes, devices, never message text). `str(exc)` is the detail when given, else the user message.

    ModelServerError
    ├── ModelLoadError          the checkpoint, device, dtype or quantization could not be used
    ├── PromptError             the request cannot become a prompt (its message is written for the user)
    ├── Busy                    the queue is full; carries the queue length and the limit
    ├── RequestTimeout          a request did not finish within its deadline
    ├── GenerationFailed        the model raised (including out-of-memory on a single request)
    │   ├── ModelStuck          the model thread made no progress past the watchdog's deadline
    │   ├── RequestRejected     text-generation-inference refused the request (422); never retried
    │   ├── ServerUnavailable   text-generation-inference unreachable or overloaded through every retry
    │   └── StreamBroken        the stream from text-generation-inference broke after tokens were sent
    └── ExecutorClosed          the executor is stopping or stopped
"""

from __future__ import annotations


class ModelServerError(Exception):
    default_user_message: str = "the model could not answer, please try again"

    def __init__(self, user_message: str | None = None, *, detail: str = "") -> None:
        self.user_message: str = user_message if user_message is not None else self.default_user_message
        self.detail: str = detail
        super().__init__(detail or self.user_message)


class ModelLoadError(ModelServerError):
    default_user_message = "the model could not be loaded"


class PromptError(ModelServerError, ValueError):
    """The request cannot become a prompt. Its user message says why; it never quotes the user's text, so it
    is also safe to log."""

    default_user_message = "this request cannot be turned into a prompt"


class Busy(ModelServerError):
    def __init__(self, queue_length: int, limit: int) -> None:
        super().__init__(f"the model is busy ({queue_length} requests waiting), try again in a minute",
                         detail=f"queue full: {queue_length} waiting, limit {limit}")
        self.queue_length = queue_length
        self.limit = limit


class RequestTimeout(ModelServerError):
    default_user_message = "the model took too long to answer, please try again"


class GenerationFailed(ModelServerError):
    default_user_message = "the model failed on this request, please try again"


class ModelStuck(GenerationFailed):
    default_user_message = ("the model stopped responding; the bot is restarting it, please ask again in a few "
                            "minutes")


class RequestRejected(GenerationFailed):
    """TGI answered 422: the request is invalid (often: prompt too long). Never retried."""


class ServerUnavailable(GenerationFailed):
    """TGI could not be reached, or stayed overloaded / not ready, through every retry."""


class StreamBroken(GenerationFailed):
    """The stream broke after tokens were already streamed: not retried (the user saw them)."""


class ExecutorClosed(ModelServerError):
    default_user_message = "the bot is restarting, please ask again in a minute"

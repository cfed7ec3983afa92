"""The model server's exceptions: one root, a few meaningful kinds.

Each carries `user_message`, short and safe to show to a Discord user or on a terminal; the exception's
own text (str(exc)) is the log detail and may name files, devices or sizes.

    ModelServerError
    ├── ModelLoadError          the checkpoint, device, dtype or quantization could not be used
    ├── Busy                    the queue is full; carries the queue length
    ├── RequestTimeout          a request did not finish within its deadline
    ├── GenerationFailed        the model raised (including out-of-memory on a single request)
    │   └── ModelStuck          the model thread made no progress past the watchdog's deadline
    └── ExecutorClosed          the executor is stopping or stopped
"""

from __future__ import annotations


class ModelServerError(Exception):
    user_message = "the model could not answer, please try again"

    def __init__(self, detail: str = "", *, user_message: str | None = None) -> None:
        super().__init__(detail or self.user_message)
        if user_message is not None:
            self.user_message = user_message


class ModelLoadError(ModelServerError):
    user_message = "the model could not be loaded"


class Busy(ModelServerError):
    def __init__(self, queue_length: int, limit: int) -> None:
        super().__init__(
            f"queue full: {queue_length} waiting, limit {limit}",
            user_message=f"the model is busy ({queue_length} requests waiting), try again in a minute",
        )
        self.queue_length = queue_length
        self.limit = limit


class RequestTimeout(ModelServerError):
    user_message = "the model took too long to answer, please try again"


class GenerationFailed(ModelServerError):
    user_message = "the model failed on this request, please try again"


class ModelStuck(GenerationFailed):
    user_message = "the model stopped responding; the bot is restarting it, please ask again in a few minutes"


class ExecutorClosed(ModelServerError):
    user_message = "the bot is restarting, please ask again in a minute"

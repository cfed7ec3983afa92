"""The values that cross the model server's boundary: turns in, prompts, requests, results out.

Nothing here imports torch: the bot and the terminal commands build these, the executor consumes them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

PromptItem = str | Image.Image
"""One element of the processor's prompt list: verbatim text or an already-decoded image."""

Role = Literal["user", "assistant"]
Decoding = Literal["greedy", "sample", "beam"]


@dataclass(frozen=True)
class ChatTurn:
    """One stored message as the prompt renderer sees it (untrusted text, checked images)."""

    role: Role
    text: str
    author: str | None = None
    """Display name of a user turn's author; shown when several users speak in one User turn."""
    images: tuple[Image.Image, ...] = ()


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 256
    decoding: Decoding = "greedy"
    temperature: float = 0.7
    """Used only with `decoding="sample"`."""
    top_p: float = 0.9
    """Used only with `decoding="sample"`."""
    num_beams: int = 1
    """Used only with `decoding="beam"` (the guide's story uses 2)."""
    repetition_penalty: float = 1.0
    seed: int | None = None
    """Makes sampling repeatable for one request, whatever else shares its batch."""
    stop_strings: tuple[str, ...] = ()
    """Text that ends the answer (not included in it); `<end_of_utterance>` is handled as a token."""

    def batch_key(self) -> tuple[object, ...]:
        """Requests with equal keys may share a batch (same decoding loop and processors)."""
        if self.decoding == "beam":
            return ("beam", self.num_beams, self.repetition_penalty)
        if self.decoding == "sample":
            return ("sample", self.temperature, self.top_p, self.repetition_penalty)
        return ("greedy", self.repetition_penalty)


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt: the processor's list of text and images, in order."""

    items: tuple[PromptItem, ...]
    params: GenerationParams = field(default_factory=GenerationParams)

    @property
    def images(self) -> list[Image.Image]:
        return [item for item in self.items if isinstance(item, Image.Image)]


class FinishReason(enum.StrEnum):
    END_OF_UTTERANCE = "end_of_utterance"
    """The model wrote `<end_of_utterance>` (instruct) or `</s>`."""
    STOP_STRING = "stop_string"
    """The answer reached a stop string such as `"\\nUser:"`; it is cut before it."""
    LENGTH = "length"
    """`max_new_tokens` was reached."""
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    ERROR = "error"


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    queued_s: float
    """Seconds from submission to the start of its batch."""
    first_token_s: float | None
    """Seconds from submission to the first generated token (None when nothing was generated)."""
    total_s: float
    """Seconds from submission to the result."""
    batch_size: int
    """Rows in the batch this request ran in."""


@dataclass(frozen=True)
class RankedCategory:
    category: str
    probability: float
    """Normalised over the given categories (they sum to 1)."""
    logprob: float
    """Sum of the category's token log-probabilities after the prompt."""
    by_generation: bool = False
    """The server gives no prompt log-probabilities: the model's generated answer picked this ranking (the
    category it named first gets probability 1), nothing was scored. Front ends say so (`RANKED_BY_GENERATION`)."""


RANKED_BY_GENERATION = ("this model server gives no prompt log-probabilities, so the model answered in words and "
                        "the category it named is shown; the other categories were not scored")
"""What front ends add to a ranking whose `by_generation` is set."""

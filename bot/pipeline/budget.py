"""How long an answer the loaded model can give in a channel: its context, less what every prompt needs there.

A prompt and its answer share the model's context (`ModelInfo.max_positions` tokens). Whatever a channel's
history holds, its prompt carries the channel's system prompt, the chat layout, up to `max_images` images and
at least a short message; `answer_room` is what is left for the answer. `/settings` refuses a `max_new_tokens`
above it (else every request of the channel would fail with "the prompt does not fit").
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from bot.pipeline.conversation import ChatDefaults, ModelInfo
from model_server.prompt import estimate_tokens, prompt_text, render_chat
from model_server.types import ChatTurn

MIN_MESSAGE_TOKENS = 32
"""Room kept for the message itself: a question of a few words, with its author's name."""


@dataclass(frozen=True)
class AnswerRoom:
    max_positions: int
    """The model's whole context, in tokens."""
    prompt_needs: int
    """Tokens every prompt of the channel needs at least (system prompt, layout, images, a short message)."""

    @property
    def max_new_tokens(self) -> int:
        """The longest answer that still fits (0 or less: none does)."""
        return self.max_positions - self.prompt_needs


def answer_room(model: ModelInfo, defaults: ChatDefaults, system_prompt: str | None) -> AnswerRoom:
    """The room for answers in a channel whose system prompt is `system_prompt` (None: the default one)."""
    count = model.count_tokens or estimate_tokens
    images = tuple(Image.new("RGB", (1, 1)) for _ in range(defaults.max_images))
    turn = ChatTurn(role="user", text="", author="someone", images=images)
    prompt = render_chat([turn], instruct=model.instruct, system_prompt=system_prompt or defaults.system_prompt,
                         max_images=defaults.max_images, max_prompt_tokens=10**9, count_tokens=count)
    return AnswerRoom(model.max_positions, count(prompt_text(prompt.items)) + MIN_MESSAGE_TOKENS)

"""A rendered `Prompt` -> the chat-completions request: messages with image parts, and the sampling fields.

The prompt renderer (`model_server.prompt`, `model_server.tasks`) writes the IDEFICS chat layout, and the turns
are read back from it here: a turn starts where a line starts with `User:` or `Assistant:`. Untrusted text can
never start a line that way (`neutralize` breaks role lines and special strings), so every such line is one of
ours. What comes before the first `User:` is the system prompt; our `<end_of_utterance>` markers go (the server's
chat template writes the model's own); the final empty `Assistant:` is the turn to answer, which the server
opens itself. A task prompt without turns (a caption, VQA's `Question: ... Answer:`) becomes one user message.

Images become `{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}}` parts, in their
place among the user's text; they are re-encoded and shrunk until the body fits (`remote.images`). A message
without images has plain string content, which every server reads (some read nothing else for assistant and
system messages).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from model_server.config import DEFAULT_MAX_BODY_BYTES
from model_server.prompt import END_OF_UTTERANCE
from model_server.remote.images import fit_body
from model_server.types import GenerationParams, PromptItem

MAX_STOP_SEQUENCES = 4
"""OpenAI's limit on `stop`; the rest are applied on our side while the answer streams."""
_ROLE_LINE = re.compile(r"(?:^|\n)(User|Assistant):[ ]?")
_ROLES = {"User": "user", "Assistant": "assistant"}

Part = str | int
"""Text, or the index of an image in the prompt."""


@dataclass
class Turn:
    role: str
    """"system", "user" or "assistant"."""
    parts: list[Part]


def turns_of(items: Sequence[PromptItem]) -> list[Turn]:
    """The prompt's turns, in order; the last one is the user turn to answer (or the prompt's only turn)."""
    turns: list[Turn] = [Turn("system", [])]
    image_index = 0
    for item in items:
        if not isinstance(item, str):
            turns[-1].parts.append(image_index)
            image_index += 1
            continue
        text = item.strip(" ").replace(END_OF_UTTERANCE, "")
        position = 0
        for match in _ROLE_LINE.finditer(text):
            turns[-1].parts.append(text[position:match.start()])
            turns.append(Turn(_ROLES[match[1]], []))
            position = match.end()
        turns[-1].parts.append(text[position:])
    if all(turn.role == "system" for turn in turns):
        return [Turn("user", turns[0].parts)]  # a task prompt: no turns of its own
    if turns[-1].role == "assistant" and not _text(turns[-1].parts).strip() and not _images(turns[-1].parts):
        turns.pop()  # the open "Assistant:" the server adds itself
    out: list[Turn] = []
    for turn in turns:
        if not _text(turn.parts).strip() and not _images(turn.parts):
            continue
        if out and out[-1].role == turn.role:
            out[-1].parts += ["\n", *turn.parts]
        else:
            out.append(turn)
    return out


def _text(parts: Sequence[Part]) -> str:
    return "".join(p for p in parts if isinstance(p, str))


def _images(parts: Sequence[Part]) -> list[int]:
    return [p for p in parts if isinstance(p, int)]


def message(turn: Turn, urls: Sequence[str]) -> dict[str, Any]:
    if not _images(turn.parts):
        return {"role": turn.role, "content": _text(turn.parts).strip()}
    content: list[dict[str, Any]] = []
    pending = ""
    for part in turn.parts:
        if isinstance(part, str):
            pending += part
            continue
        if pending.strip():
            content.append({"type": "text", "text": pending.strip()})
        pending = ""
        content.append({"type": "image_url", "image_url": {"url": urls[part]}})
    if pending.strip():
        content.append({"type": "text", "text": pending.strip()})
    return {"role": turn.role, "content": content}


def messages_of(items: Sequence[PromptItem], urls: Sequence[str]) -> list[dict[str, Any]]:
    """The chat-completions `messages` for `items`; `urls[i]` is the i-th image's data URL."""
    return [message(turn, urls) for turn in turns_of(items)]


def data_url(jpeg: bytes) -> str:
    return f"data:image/jpeg;base64,{base64.b64encode(jpeg).decode('ascii')}"


def sampling_fields(params: GenerationParams) -> dict[str, Any]:
    """The request fields for `params` that every OpenAI-compatible server reads.

    Greedy is `temperature: 0`. Beam search has no chat-completions field that every server reads (vLLM's
    `use_beam_search` is its own), so `decoding="beam"` runs greedy. `repetition_penalty` is sent only when it is
    set: it is an extension (vLLM, SGLang, llama.cpp read it; OpenAI itself would refuse the request).
    """
    fields: dict[str, Any] = {"max_tokens": params.max_new_tokens}
    if params.decoding == "sample":
        fields["temperature"] = params.temperature
        fields["top_p"] = params.top_p
    else:
        fields["temperature"] = 0.0
    if params.seed is not None:
        fields["seed"] = params.seed
    if params.repetition_penalty != 1.0:
        fields["repetition_penalty"] = params.repetition_penalty
    stops = [s for s in params.stop_strings if s][:MAX_STOP_SEQUENCES]
    if stops:
        fields["stop"] = stops
    return fields


@dataclass(frozen=True)
class RequestBody:
    body: bytes
    """The JSON to POST, under the byte limit."""
    messages: list[dict[str, Any]]
    image_bytes: tuple[int, ...]
    """Size of each JPEG sent, for logs."""


def build_body(items: Sequence[PromptItem], fields: dict[str, Any], *,
               final: dict[str, Any] | None = None, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> RequestBody:
    """The request body: `fields` (model, stream, sampling...) and the messages of `items`, then `final` (a
    message to continue, for ranking) when given; images shrunk until the body is under `max_bytes`.

    Runs image encoding: call it off the event loop. Raises `GenerationFailed` when even tiny images do not fit.
    """
    images = [item for item in items if isinstance(item, Image.Image)]
    built: list[list[dict[str, Any]]] = []

    def render(jpegs: list[bytes]) -> bytes:
        messages = messages_of(items, [data_url(j) for j in jpegs]) + ([final] if final else [])
        built[:] = [messages]
        return json.dumps({**fields, "messages": messages}).encode("utf-8")

    fitted = fit_body(images, render, max_bytes)
    return RequestBody(fitted.body, built[0], fitted.image_bytes)

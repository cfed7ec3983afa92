"""Our prompts -> the chat messages of Idefics2, Idefics3 and SmolVLM, rendered by the processor's own template.

Pure functions (no torch). A `Prompt` holds the processor list of IDEFICS v1 (`prompt.render_chat`, `tasks`): text
with our own turn markers (`User:`, `\\nAssistant:`, `<end_of_utterance>`) and images. Untrusted text in it was
neutralised for IDEFICS v1 already, so a marker found in it is ours: a user line that reads `User:` carries a
U+200B (`neutralize.neutralize_role_lines`), and a user's `<end_of_utterance>` is broken. `to_messages` splits the
list at those markers into chat messages:

- `User:` at the start of a text item or of a line opens a user message; `\\nAssistant:` an assistant one;
  `<end_of_utterance>` is dropped (the template writes its own); text before the first marker is a system message.
- A list without markers (the guide's tasks: caption, VQA, classification, story) is one user message.
- The list ends with an empty assistant turn, the generation prompt; an assistant turn with text at the end is
  the start of the answer, written after the generation prompt.

Each text part is neutralised once more against *this* model's special strings, read from its tokenizer's added
tokens at load (`<global-img>`, `<row_1_col_1>`, `<|im_start|>`, ...), so no user text becomes one of them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image

from model_server.neutralize import neutralize_strings
from model_server.prompt import END_OF_UTTERANCE, FAKE_TOKEN, IMAGE_TOKEN
from model_server.types import PromptItem

Message = dict[str, object]
"""`{"role": ..., "content": [{"type": "text", "text": ...} | {"type": "image"}]}`, as chat templates read."""
RenderTemplate = Callable[[list[Message], bool], str]
"""`processor.apply_chat_template(messages, add_generation_prompt=..., tokenize=False)`."""

_MARKER = re.compile(r"(?:(?<=\n)|^)User:|\nAssistant:|" + re.escape(END_OF_UTTERANCE))
_V1_IMAGE = re.compile(f"(?:{re.escape(FAKE_TOKEN)})?{re.escape(IMAGE_TOKEN)}{re.escape(FAKE_TOKEN)}")


class ImageSlot:
    """Stands for an image where only the layout matters (token counting)."""


@dataclass
class _Turn:
    role: str
    parts: list[PromptItem | ImageSlot] = field(default_factory=list)

    def content(self, specials: Sequence[str]) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for part in self.parts:
            if isinstance(part, str):
                text = neutralize_strings(part, specials)
                if out and out[-1]["type"] == "text":
                    out[-1]["text"] += text
                elif text:
                    out.append({"type": "text", "text": text})
            else:
                out.append({"type": "image"})
        # Spaces at item edges go, as the v1 processor strips them; line breaks only at the message's two ends.
        for k, part_ in enumerate(out):
            if part_["type"] == "text":
                text = part_["text"].strip(" ")
                text = text.lstrip() if k == 0 else text
                part_["text"] = text.rstrip() if k == len(out) - 1 else text
        return [p for p in out if p["type"] == "image" or p["text"]]


def _turns(items: Sequence[PromptItem | ImageSlot]) -> list[_Turn]:
    turns: list[_Turn] = []
    current = _Turn("system")
    marked = False
    for item in items:
        if not isinstance(item, str):
            current.parts.append(item)
            continue
        pos = 0
        for match in _MARKER.finditer(item):
            current.parts.append(item[pos:match.start()])
            pos = match.end()
            marker = match[0]
            if marker == END_OF_UTTERANCE:
                continue
            marked = True
            turns.append(current)
            current = _Turn("user" if marker == "User:" else "assistant")
        current.parts.append(item[pos:])
    turns.append(current)
    if not marked:
        only = turns[0]
        only.role = "user"
        return [only, _Turn("assistant")]
    return turns


def to_messages(items: Sequence[PromptItem | ImageSlot], specials: Sequence[str]) -> tuple[list[Message], str]:
    """The chat messages of `items`, and the text the answer starts with (after the generation prompt)."""
    turns = [t for t in _turns(items) if t.role != "system" or t.content(specials)]
    lead = ""
    if turns and turns[-1].role == "assistant":
        last = turns.pop()
        lead = " ".join(p["text"] for p in last.content(specials) if p["type"] == "text")
    messages: list[Message] = []
    for turn in turns:
        content = turn.content(specials)
        if not content:
            content = [{"type": "text", "text": ""}]
        messages.append({"role": turn.role, "content": content})
    return messages, lead


def render(items: Sequence[PromptItem | ImageSlot], template: RenderTemplate, specials: Sequence[str]) -> str:
    """The exact text the processor gets (each image one `<image>`, expanded by the processor)."""
    messages, lead = to_messages(items, specials)
    text = template(messages, True)
    return f"{text} {lead}" if lead else text


def items_from_v1_text(text: str, bos: str) -> list[PromptItem | ImageSlot]:
    """Invert `prompt.prompt_text`: the rendered v1 text back into text items and image slots (for counting)."""
    text = text.removeprefix(bos)
    out: list[PromptItem | ImageSlot] = []
    pos = 0
    for match in _V1_IMAGE.finditer(text):
        out.append(text[pos:match.start()])
        out.append(ImageSlot())
        pos = match.end()
    out.append(text[pos:])
    return out


def image_count(items: Sequence[PromptItem | ImageSlot]) -> int:
    return sum(1 for item in items if isinstance(item, Image.Image | ImageSlot))

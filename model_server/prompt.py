"""Chat history -> the IDEFICS processor's prompt list, and that list -> the exact text the model reads.

Pure functions: no torch, no transformers, no discord, no database. Every piece of untrusted text (messages,
author names, stored assistant replies, the system prompt) goes through `neutralize` before it is placed.

Instruct checkpoints (DESIGN.md, the guide's last example), with `<end_of_utterance>` written by us:

    "User:" <image> "What is in this image?<end_of_utterance>"
    "\\nAssistant: This picture depicts ...<end_of_utterance>"
    "\\nUser:" <image> "And who is that?<end_of_utterance>"
    "\\nAssistant:"

Base checkpoints (no `<end_of_utterance>` token) use the guide's plain few-shot layout instead:

    "User:" <image> "What is in this image?"
    "\\nAssistant: This picture depicts ...\\n"
    "User:" <image> "And who is that?"
    "\\nAssistant:"

Both stop at `"\\nUser:"`, the point where the model starts writing the next user turn itself.

An optional system prompt comes first, as its own paragraph: `system_prompt + "\\n\\n"`, then "User:".
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

from PIL import Image

from model_server.errors import PromptError as PromptError  # raised here; callers may import it from here
from model_server.neutralize import neutralize, neutralize_role_lines
from model_server.types import ChatTurn, GenerationParams, Prompt, PromptItem, Role

BOS = "<s>"
IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
END_OF_UTTERANCE = "<end_of_utterance>"
CHAT_STOP = "\nUser:"
"""Stop string of every chat prompt: the model has finished its answer and begins the next user turn."""
IMAGE_MARKER = "[image]"
"""Stands in for an image too old to be kept as pixels, so the text still says one was there."""
CUT_MARKER = "…"
"""Starts a message whose beginning was cut to fit the token budget."""
UNNAMED_AUTHOR = "someone"

DEFAULT_MAX_PROMPT_TOKENS = 2048 - 256
"""IDEFICS saw at most 2048 tokens; 256 are left for the answer (callers pass 2048 - max_new_tokens)."""


# ---------------------------------------------------------------------------------------------------------
# Items -> text


def is_image(item: PromptItem) -> bool:
    return isinstance(item, Image.Image)


def image_count(items: Sequence[PromptItem]) -> int:
    """How many images the prompt holds (each becomes 64 perceiver latents, none of them text tokens)."""
    return sum(1 for item in items if is_image(item))


def prompt_text(items: Sequence[PromptItem], *, bos: str = BOS, display: bool = False) -> str:
    """The text `IdeficsProcessor` builds from `items` (with `add_end_of_utterance_token=False`).

    Starts with `bos`; each text item is `strip(" ")`-ed (spaces only, as the processor does); an image is
    `<fake_token_around_image><image><fake_token_around_image>`, or `<image><fake_token_around_image>` right
    after another image, since the closing fake token of the first also opens the second.

    `display=True` is what `--show-prompt` prints: each image as a plain `<image>`, and the BOS shown too,
    because it is part of what the model reads. Neutralized text keeps its invisible U+200B there as well, so
    the display is exactly the model's text apart from the images.
    """
    out = [bos]
    last_was_image = False
    for item in items:
        if isinstance(item, str):
            out.append(item.strip(" "))
            last_was_image = False
        else:
            if display:
                out.append(IMAGE_TOKEN)
            elif last_was_image:
                out.append(IMAGE_TOKEN + FAKE_TOKEN)
            else:
                out.append(FAKE_TOKEN + IMAGE_TOKEN + FAKE_TOKEN)
            last_was_image = True
    return "".join(out)


# ---------------------------------------------------------------------------------------------------------
# Keeping text items from being mistaken for image URLs


def looks_like_url(text: str) -> bool:
    """Whether the processor would take this text item for an image URL and fetch it.

    Same test as transformers' `is_url` (after its `strip(" ")`): no space, and `urlparse` finds a scheme and
    a host. Text that makes `urlparse` raise counts too: the processor would crash on it.
    """
    text = text.strip(" ")
    if " " in text:
        return False
    try:
        parsed = urlparse(text)
    except ValueError:
        return True
    return bool(parsed.scheme and parsed.netloc)


def defuse_urls(items: Sequence[PromptItem]) -> tuple[PromptItem, ...]:
    """Split every URL-looking text item so that no item is fetched, without changing `prompt_text`.

    `urlparse` only finds a host after `//`, so pieces that never contain `//` are never URLs (and never make
    it raise). Such an item has no space, so `strip(" ")` leaves the pieces alone and they join back into the
    same text; several text items in a row are simply concatenated.
    """
    out: list[PromptItem] = []
    for item in items:
        if isinstance(item, str) and looks_like_url(item):
            out.extend(re.split(r"(?<=/)(?=/)", item.strip(" ")))
        else:
            out.append(item)
    return tuple(out)


def _coalesce(parts: Sequence[PromptItem]) -> list[PromptItem]:
    """Join neighbouring text parts into one item and drop empty ones.

    Parts are written as the text should read; the processor strips spaces at item edges, so fewer edges
    means fewer places where that could change the text (edges remain only next to images).
    """
    out: list[PromptItem] = []
    for part in parts:
        if isinstance(part, str):
            if not part:
                continue
            if out and isinstance(out[-1], str):
                out[-1] = out[-1] + part
                continue
        out.append(part)
    return out


def finish_items(parts: Sequence[PromptItem]) -> tuple[PromptItem, ...]:
    """Parts as written -> the processor's items: joined text, and no item that looks like a URL."""
    return defuse_urls(_coalesce(parts))


# ---------------------------------------------------------------------------------------------------------
# Token counting


_ADDED_TOKENS = ("<s>", "</s>", "<unk>", "<image>", "<fake_token_around_image>")
"""Strings every IDEFICS v1 tokenizer turns into one token of their own. Not `<end_of_utterance>`: base
checkpoints read it as text, and counted as text (18 bytes) it also covers the instruct case (see below)."""
_ADDED_RE = re.compile("|".join(re.escape(s) for s in _ADDED_TOKENS))


def estimate_tokens(text: str) -> int:
    """An upper bound on the LLaMA-1 (IDEFICS v1) token count of `text`, for when no tokenizer is at hand.

    The tokenizer splits `text` at its k added tokens (1 token each) into at most k + 1 stretches, and gives each
    stretch a leading "▁" (at most 1 token more). Within a stretch every token covers at least one character, and
    a character that is not a piece of its own falls back to its UTF-8 bytes, one token each; a space becomes the
    piece "▁". So a stretch of b UTF-8 bytes costs at most 1 + b tokens, and

        tokens(text) <= 2k + 1 + (UTF-8 bytes of text outside the added tokens)       (0 for empty text)

    Anything else read as special (`<end_of_utterance>` of instruct checkpoints) costs 1 token plus one more
    stretch: 2, less than its bytes. The bound is tight for digits, hex and symbols (one token each) and about
    four times the real count for English prose; `tests/model_server/prompt/test_estimate_tokens.py` checks it
    against the real tokenizer with hypothesis. Over-counting only trims more history than needed; under-counting would
    overflow the model's 2048 positions.
    """
    if not text:
        return 0
    added = len(_ADDED_RE.findall(text))
    rest = _ADDED_RE.sub("", text)
    return 2 * added + 1 + len(rest.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------
# Chat rendering


@dataclass
class _Block:
    """Consecutive turns of one role, merged: what becomes one "User:" or "Assistant:" turn."""

    role: Role
    parts: list[PromptItem]
    """User: each message's images then its line, messages separated by "\\n". Assistant: one text."""


def _author_name(author: str | None) -> str:
    # Names are shown as "name: text" on one line, so no line breaks, and a missing name gets a neutral one.
    name = " ".join(neutralize(author or "").split())
    return name or UNNAMED_AUTHOR


def _merge_turns(turns: Sequence[ChatTurn], *, named: bool) -> list[_Block]:
    blocks: list[_Block] = []
    for turn in turns:
        text = neutralize(turn.text).strip()
        if blocks and blocks[-1].role == turn.role:
            block = blocks[-1]
            block.parts.append("\n")
        else:
            block = _Block(turn.role, [])
            blocks.append(block)
        if turn.role == "assistant":
            # The bot never sends images, so a stored reply's images (if any) are not shown to the model.
            block.parts.append(text)
            continue
        block.parts.extend(turn.images)
        if named:
            name = _author_name(turn.author)
            # A name such as "User" would open a role line here: the line is neutralized as a whole.
            block.parts.append(neutralize_role_lines(f"{name}: {text}" if text else f"{name}:"))
        else:
            block.parts.append(text)
    # An answer whose question is not shown only confuses the model: a window starts with a user turn.
    while blocks and blocks[0].role == "assistant":
        blocks.pop(0)
    return blocks


def _cap_images(blocks: Sequence[_Block], max_images: int) -> list[_Block]:
    """Keep the `max_images` newest images; older ones become `[image]` (many images confuse the model)."""
    kept = 0
    out: list[_Block] = []
    for block in reversed(blocks):
        parts: list[PromptItem] = []
        for part in reversed(block.parts):
            if is_image(part):
                if kept < max_images:
                    kept += 1
                else:
                    part = IMAGE_MARKER
            parts.append(part)
        parts.reverse()
        out.append(_Block(block.role, parts))
    out.reverse()
    return out


def _keep_text_tail(parts: Sequence[PromptItem], keep: int) -> list[PromptItem]:
    """Keep the last `keep` characters of the text parts, with `…` where the cut is; images all stay.

    The newest words are the ones being answered; the images of the turn are worth more than its oldest text.
    """
    out: list[PromptItem] = []
    left = keep
    cut = False
    for part in reversed(parts):
        if not isinstance(part, str):
            out.append(part)
        elif cut:
            continue
        elif len(part) <= left:
            out.append(part)
            left -= len(part)
        else:
            out.append(CUT_MARKER + part[len(part) - left :])
            cut = True
    out.reverse()
    return out


def _layout(blocks: Sequence[_Block], *, instruct: bool, system: str) -> tuple[PromptItem, ...]:
    parts: list[PromptItem] = []
    if system:
        parts.append(system + "\n\n")
    for i, block in enumerate(blocks):
        if block.role == "user":
            # Base turns start a fresh line already: the previous answer ends with "\n", as in the guide.
            parts.append("\nUser:" if instruct and i > 0 else "User:")
            parts.extend(block.parts)
            if instruct:
                parts.append(END_OF_UTTERANCE)
        else:
            parts.append("\nAssistant: ")
            parts.extend(block.parts)
            parts.append(END_OF_UTTERANCE if instruct else "\n")
    parts.append("\nAssistant:")
    return finish_items(parts)


def render_chat(
    turns: Sequence[ChatTurn],
    *,
    instruct: bool,
    system_prompt: str | None = None,
    max_images: int = 4,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    count_tokens: Callable[[str], int] | None = None,
    params: GenerationParams | None = None,
) -> Prompt:
    """Render a channel's window (oldest first, ending with the user turn to answer) as one prompt.

    - Consecutive turns of one role merge into one turn, one message per line. When the window has more than
      one distinct user author, each user line reads "name: text"; a message's images come before its line.
    - Only the `max_images` newest images stay images; older ones become `[image]`.
    - `count_tokens(prompt_text(items)) <= max_prompt_tokens`: the oldest turns go first; the last user turn
      always stays, and if it alone is too long its text keeps its end, behind a `…`.
      `count_tokens=None` uses `estimate_tokens` (an upper bound).
    - `params` (default `GenerationParams()`) gets the stop string "\\nUser:".
    """
    if not turns:
        raise PromptError("there is no message to answer")
    if turns[-1].role != "user":
        raise PromptError("the last message is not a user message")
    if max_images < 0:
        raise ValueError("max_images must be >= 0")
    count = count_tokens or estimate_tokens
    system = neutralize(system_prompt or "").strip()
    named = len({turn.author for turn in turns if turn.role == "user"}) > 1
    blocks = _merge_turns(turns, named=named)

    def fits(items: Sequence[PromptItem]) -> bool:
        return count(prompt_text(items)) <= max_prompt_tokens

    def done(items: tuple[PromptItem, ...]) -> Prompt:
        base = params or GenerationParams()
        stops = base.stop_strings if CHAT_STOP in base.stop_strings else (*base.stop_strings, CHAT_STOP)
        return Prompt(items=items, params=dataclasses.replace(base, stop_strings=stops))

    # The earliest start that fits keeps the most history; each window starts at a user turn. A later start
    # renders fewer of the same turns, so whether it fits only changes once along the starts: after the whole
    # window, a binary search, so a long window costs a few token counts, not one per turn.
    starts = [start for start, block in enumerate(blocks) if block.role == "user"]

    def from_start(index: int) -> tuple[PromptItem, ...]:
        return _layout(_cap_images(blocks[starts[index]:], max_images), instruct=instruct, system=system)

    items = from_start(0)
    if fits(items):
        return done(items)
    found, lo, hi = None, 1, len(starts)
    while lo < hi:
        mid = (lo + hi) // 2
        items = from_start(mid)
        if fits(items):
            found, hi = items, mid
        else:
            lo = mid + 1
    if found is not None:
        return done(found)

    # The last user turn alone is too long: keep as much of its end as fits (binary search on characters).
    last = _cap_images(blocks[-1:], max_images)[0]
    total = sum(len(part) for part in last.parts if isinstance(part, str))

    def trimmed(keep: int) -> tuple[PromptItem, ...]:
        return _layout([_Block("user", _keep_text_tail(last.parts, keep))], instruct=instruct, system=system)

    best = trimmed(0)
    if not fits(best):
        raise PromptError("the prompt does not fit the model's context, even with the message cut short")
    lo, hi = 0, total - 1  # `total` itself was tried above and did not fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        items = trimmed(mid)
        if fits(items):
            lo, best = mid, items
        else:
            hi = mid - 1
    return done(best)

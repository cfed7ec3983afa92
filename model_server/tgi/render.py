"""A rendered `Prompt` -> the JSON body TGI reads: text with inline images, and TGI's parameters.

The text is exactly `prompt_text(items)` with two differences:

- no `<s>`: TGI tokenizes with special tokens, so it adds the BOS itself (ours would make two);
- each image is written as markdown, `![](data:image/jpeg;base64,...)`, where `prompt_text` writes the image
  tokens: TGI's IDEFICS support cuts the text at those images and lets the IDEFICS processor place
  `<fake_token_around_image><image>...` itself, exactly as the local processor does.

Markdown image syntax in the *text* would make TGI fetch that URL (or decode that data) as an image, so text
is defused first: every `![](` gets a zero-width space after its `!`, the way `neutralize` breaks special
tokens. Only our own images remain markdown.

TGI's IDEFICS shard hands the text between two images to transformers' `IdeficsProcessor` as one item, which
brings two more rules (see `LEADING_TEXT` and `defuse_url`): the text sent begins with text, and no stretch
between images may look like a bare URL (the processor would fetch it from the TGI machine).

Images are re-encoded as JPEG and scaled down until the body fits TGI's `--payload-limit` (`remote.images`).
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
from model_server.neutralize import ZERO_WIDTH_SPACE
from model_server.prompt import CHAT_STOP, END_OF_UTTERANCE, FAKE_TOKEN, IMAGE_TOKEN, looks_like_url
from model_server.remote.images import fit_body
from model_server.types import GenerationParams, PromptItem

MARKDOWN_IMAGE = "!" + "[]("
DEFAULT_MAX_STOP_SEQUENCES = 4
"""TGI's default `--max-stop-sequences`; `/info` says the server's own."""


def defuse_markdown(text: str) -> str:
    """Break every `![](` so TGI never reads user text as an image to fetch."""
    return text.replace(MARKDOWN_IMAGE, "!" + ZERO_WIDTH_SPACE + "[](")


def image_markdown(jpeg: bytes) -> str:
    return f"![](data:image/jpeg;base64,{base64.b64encode(jpeg).decode('ascii')})"


LEADING_TEXT = " "
"""Put before a prompt that begins with an image: TGI's IDEFICS shard calls `processor(prompts)` positionally,
and the processor of transformers 4.x swaps its arguments back only when the first item of the first prompt
of the batch is text (`_validate_images_text_input_order`); a batch led by an image-first prompt fails as a
whole. The processor strips spaces from every text item, so this chunk becomes no token at all."""
DEFUSED_SLASHES = "/" + ZERO_WIDTH_SPACE + "/"


def defuse_url(chunk: str) -> str:
    """`chunk`, changed as little as needed so that the processor's `is_url` never takes it for an image URL.

    The shard gets the text between two images as one item, and the processor fetches an item that is a bare
    URL (no space, a scheme and a host: only found after `//`) with `requests`, from the TGI machine, with no
    timeout. A U+200B inside each `//` leaves `urlparse` no host to find; it reads the same to a person.
    """
    return chunk.replace("//", DEFUSED_SLASHES) if looks_like_url(chunk) else chunk


def inputs_text(items: Sequence[PromptItem], images: Sequence[str], suffix: str = "") -> str:
    """The text TGI reads: `prompt_text` without BOS, `images[i]` (markdown) where the i-th image is, then
    `suffix`; every text chunk (what lies between images) defused, and text first (`LEADING_TEXT`)."""
    chunks: list[str | int] = []
    text_run: list[str] = []
    for item in items:
        if isinstance(item, str):
            text_run.append(item.strip(" "))
            continue
        chunks.append("".join(text_run))
        text_run = []
        chunks.append(len([c for c in chunks if isinstance(c, int)]))
    chunks.append("".join(text_run) + suffix)
    out: list[str] = []
    for chunk in chunks:
        if isinstance(chunk, int):
            out.append(images[chunk])
        else:
            # Defuse whole runs: `!` at the end of one item and `[](` at the start of the next would join.
            out.append(defuse_url(defuse_markdown(chunk)))
    if out[0] == "" and len(out) > 1:
        out[0] = LEADING_TEXT
    return "".join(out)


def tokenized_text(text: str) -> str:
    """What TGI tokenizes for a prompt whose `prompt_text` (without BOS) is `text`: each stretch between image
    tokens defused as `inputs_text` defuses it, so `/tokenize` counts the tokens the shard builds."""
    pieces = re.split(f"({re.escape(FAKE_TOKEN)}|{re.escape(IMAGE_TOKEN)})", text)
    return "".join(piece if piece in (FAKE_TOKEN, IMAGE_TOKEN) else defuse_url(defuse_markdown(piece))
                   for piece in pieces)


def shard_token_surplus(items: Sequence[PromptItem]) -> int:
    """Tokens TGI's IDEFICS shard builds beyond the router's count (its `input_length`).

    The router counts an image as one `<image>` (`validation.rs`, `image_tokens`), the shard's processor writes
    `<fake_token_around_image><image><fake_token_around_image>` (or two tokens right after another image); the
    router also counts `LEADING_TEXT` as one token, which the processor strips to nothing.
    """
    surplus = 0
    last_was_image = False
    for index, item in enumerate(items):
        if isinstance(item, str):
            last_was_image = False
            continue
        if index == 0:
            surplus -= 1
        surplus += 1 if last_was_image else 2
        last_was_image = True
    return surplus


def stop_sequences(params: GenerationParams, limit: int = DEFAULT_MAX_STOP_SEQUENCES) -> list[str]:
    """`<end_of_utterance>` and the prompt's own stop strings (chat prompts carry `"\\nUser:"`), at most `limit`.

    Exactly the stop strings the local engine applies, and the ones `stream.read_answer` withholds: a stop
    string TGI stops at is part of the tokens it streams, so one sent here but not withheld there would end the
    answer. Any left out are still applied on our side while the answer streams (the stream is closed there).
    """
    stops: list[str] = []
    chat_first = (CHAT_STOP,) if CHAT_STOP in params.stop_strings else ()  # the one that ends a chat turn
    for stop in (END_OF_UTTERANCE, *chat_first, *params.stop_strings):
        if stop and stop not in stops:
            stops.append(stop)
    return stops[:max(1, limit)]


def tgi_parameters(params: GenerationParams, *, max_stop_sequences: int = DEFAULT_MAX_STOP_SEQUENCES
                   ) -> dict[str, Any]:
    """TGI's `parameters` for a generation.

    Beam search has no TGI parameter (`best_of` picks among *sampled* sequences), so `decoding="beam"` runs
    greedy on TGI. `top_p` must lie strictly between 0 and 1 for TGI, so 1.0 (no nucleus cut) is left out.
    """
    out: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "stop": stop_sequences(params, max_stop_sequences),
        "details": True,
        "do_sample": params.decoding == "sample",
    }
    if params.decoding == "sample":
        out["temperature"] = params.temperature
        if 0 < params.top_p < 1:
            out["top_p"] = params.top_p
    if params.repetition_penalty != 1.0:
        out["repetition_penalty"] = params.repetition_penalty
    if params.seed is not None:
        out["seed"] = params.seed
    return out


@dataclass(frozen=True)
class RequestBody:
    body: bytes
    """The JSON to POST, under the byte limit."""
    inputs: str
    image_bytes: tuple[int, ...]
    """Size of each JPEG sent, for logs."""


def build_body(items: Sequence[PromptItem], parameters: dict[str, Any], *, suffix: str = "",
               max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> RequestBody:
    """The request body for `items` (then `suffix`, verbatim), images shrunk until it is under `max_bytes`.

    Runs image encoding: call it off the event loop. Raises `GenerationFailed` when even tiny images do not
    fit (then the text alone is too large).
    """
    images = [item for item in items if isinstance(item, Image.Image)]
    texts: list[str] = []

    def render(jpegs: list[bytes]) -> bytes:
        texts[:] = [inputs_text(items, [image_markdown(j) for j in jpegs], suffix)]
        return json.dumps({"inputs": texts[0], "parameters": parameters}).encode("utf-8")

    fitted = fit_body(images, render, max_bytes)
    return RequestBody(fitted.body, texts[0], fitted.image_bytes)

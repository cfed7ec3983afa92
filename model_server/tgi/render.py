"""A rendered `Prompt` -> the JSON body TGI reads: text with inline images, and TGI's parameters.

The text is exactly `prompt_text(items)` with two differences:

- no `<s>`: TGI tokenizes with special tokens, so it adds the BOS itself (ours would make two);
- each image is written as markdown, `![](data:image/jpeg;base64,...)`, where `prompt_text` writes the image
  tokens: TGI's IDEFICS support cuts the text at those images and lets the IDEFICS processor place
  `<fake_token_around_image><image>...` itself, exactly as the local processor does.

Markdown image syntax in the *text* would make TGI fetch that URL (or decode that data) as an image, so text
is defused first: every `![](` gets a zero-width space after its `!`, the way `neutralize` breaks special
tokens. Only our own images remain markdown.

Images are re-encoded as JPEG and scaled down until the body fits TGI's `--payload-limit` (`remote.images`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from model_server.config import DEFAULT_MAX_BODY_BYTES
from model_server.neutralize import ZERO_WIDTH_SPACE
from model_server.prompt import CHAT_STOP, END_OF_UTTERANCE
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


def inputs_text(items: Sequence[PromptItem], images: Sequence[str]) -> str:
    """The text TGI reads: `prompt_text` without BOS, `images[i]` (markdown) where the i-th image is."""
    out: list[str] = []
    text_run: list[str] = []
    index = 0
    for item in items:
        if isinstance(item, str):
            text_run.append(item.strip(" "))
            continue
        # Defuse whole runs: `!` at the end of one item and `[](` at the start of the next would join.
        out.append(defuse_markdown("".join(text_run)))
        text_run = []
        out.append(images[index])
        index += 1
    out.append(defuse_markdown("".join(text_run)))
    return "".join(out)


def stop_sequences(params: GenerationParams, limit: int = DEFAULT_MAX_STOP_SEQUENCES) -> list[str]:
    """`<end_of_utterance>`, `"\\nUser:"` and the prompt's own stop strings, at most `limit` of them.

    Any left out are still applied on our side while the answer streams (the stream is closed there).
    """
    stops: list[str] = []
    for stop in (END_OF_UTTERANCE, CHAT_STOP, *params.stop_strings):
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
        texts[:] = [inputs_text(items, [image_markdown(j) for j in jpegs]) + defuse_markdown(suffix)]
        return json.dumps({"inputs": texts[0], "parameters": parameters}).encode("utf-8")

    fitted = fit_body(images, render, max_bytes)
    return RequestBody(fitted.body, texts[0], fitted.image_bytes)

"""The IDEFICS shard of the fake TGI: how text-generation-inference's Python server builds, batches and scores
an IDEFICS v1 prompt, reproduced from its source (text-generation-inference at db931fc, and transformers
4.51.3, the version its `server/requirements_cuda.txt` pins).

What is reproduced, with where it comes from:

- Chunks. The router cuts `inputs` at every `![](...)` (`router/src/validation.rs` 823-847, `prepare_input`):
  the text between two images is one text chunk, verbatim; an image is one image chunk.
- The processor call. `IdeficsCausalLMBatch.from_pb_processor`
  (`server/text_generation_server/models/idefics_causal_lm.py` 137-164) turns every request of the prefill
  batch into a list of `str` and `PIL.Image` and calls `processor(prompts, return_tensors="pt", padding=True,
  truncation=True, max_length=max_truncation)`: the prompts go in *positionally*, as `images`. transformers'
  `IdeficsProcessor.__call__` (`src/transformers/models/idefics/processing_idefics.py`, `images, text =
  _validate_images_text_input_order(images, text)`) swaps them back only when `_validate_images_text_input_order`
  (`src/transformers/processing_utils.py`) finds `images` to be text, and its text test looks at the *first item
  of the first prompt* only (`for t_s in t: return _is_valid_text_input_for_processor(t_s)`). A batch whose
  first prompt begins with an image raises `ValueError("Invalid input type...")`: every request prefilled in
  that batch fails. `validate_order` below is that function.
- URL fetching. For every text item the processor does `item = item.strip(" ")` and, when `is_url(item)` (no
  space; `urlparse` finds a scheme and a host), `self.image_processor.fetch_images(item)`: `requests.get` with
  no timeout, from the TGI machine. `fetched` records every such URL; the fetch fails here (there is no
  network), and the exception fails the whole prefill batch, as it would for an unreachable host.
- The text built: `<s>`, then each item (`strip(" ")`), an image as `<fake_token_around_image><image>
  <fake_token_around_image>`, or `<image><fake_token_around_image>` right after another image; with an instruct
  tokenizer `<end_of_utterance>` between two text items in a row (`add_end_of_utterance_token` defaults to the
  tokenizer having that token; TGI's call leaves it commented out, `idefics_causal_lm.py` 162). So an image
  costs the shard three tokens where the router counted one (`validation.rs` 648: `Idefics => "<image>"`).
- Tokenizer: the real LLaMA-1 vocabulary with IDEFICS's added tokens (`tests/fakes/tiny_idefics.py`), padding
  and truncation on the left (`idefics_causal_lm.py` 627-640): a prompt over `max_truncation` loses its start.
- Prefill log-probabilities (`idefics_causal_lm.py` 779, 824-842): `[nan] + log_softmax(logits).gather(1,
  all_input_ids[1:])[-new_input_length:-1]` with `new_input_length = input_length + 1`, paired with the ids
  `all_input_ids[-new_input_length:-1]`; the router zips ids, logprobs and texts (`backends/v2/src/backend.rs`
  398-412), so the longer list is cut. For the longest row of the batch the slice start falls before the list
  and is clamped: values line up. For a row padded on the left, the slice takes one value more (the first real
  token scored after a pad): every token is reported with the log-probability of the token *before* it, and the
  last token's own value is lost. `padded_prefills` counts such rows.

The "model" is deterministic: the log-probability of a token after a context depends on the token and the two
tokens before it (or is `logprobs[text]` when the test set one for the token's stripped text), the same for the
prompt's prefill and for generated tokens, so a request that re-sends a generated token sees the same value.
"""

from __future__ import annotations

import asyncio
import functools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from PIL import Image

BOS_ID, EOS_ID = 1, 2
FAKE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE = "<fake_token_around_image>", "<image>", "<end_of_utterance>"

Item = str | Image.Image


@functools.cache
def tokenizer() -> Any:
    """The IDEFICS instruct tokenizer (real LLaMA-1 vocabulary), built once per test session."""
    from tests.fakes.tiny_idefics import build_tokenizer

    return build_tokenizer(end_of_utterance=True)


def encode(text: str) -> list[int]:
    """Token ids of `text` as TGI's tokenizer gives them (special tokens parsed, no BOS added)."""
    return list(tokenizer()(text, add_special_tokens=False).input_ids)


def token_text(token_id: int) -> str:
    """What TGI reports as one prompt token's text (`tokenizer.batch_decode` of that id alone)."""
    return str(tokenizer().decode([token_id], clean_up_tokenization_spaces=False, skip_special_tokens=False))


def piece_id(text: str, special: bool) -> int:
    """The vocabulary id of one generated token written as `text` (" This" is "▁This")."""
    tok = tokenizer()
    if text == "\n":
        return int(tok.convert_tokens_to_ids("<0x0A>"))
    found = tok.convert_tokens_to_ids(text if special else text.replace(" ", "\u2581"))
    if isinstance(found, int) and found != tok.unk_token_id:
        return found
    return 40000 + zlib.crc32(text.encode()) % 10000  # not in the vocabulary: a stable id of its own


# -- transformers 4.51.3, processing_utils.py / processing_idefics.py ------------------------------------------


def is_url(string: str) -> bool:
    """`processing_idefics.is_url`: no space, and `urlparse` finds a scheme and a host."""
    if " " in string:
        return False
    result = urlparse(string)
    return all([result.scheme, result.netloc])


def validate_order(images: Any, text: Any) -> tuple[Any, Any]:
    """`processing_utils._validate_images_text_input_order`, as in transformers 4.51.3."""

    def url(val: Any) -> bool:
        return isinstance(val, str) and val.startswith("http")

    def valid_images(imgs: Any) -> bool:
        if isinstance(imgs, (list, tuple)):
            return all(valid_images(img) for img in imgs)
        return isinstance(imgs, Image.Image) or url(imgs)

    def valid_text(t: Any) -> bool:
        if isinstance(t, str):
            return True
        if isinstance(t, (list, tuple)):
            if len(t) == 0:
                return False
            for t_s in t:  # the original returns on the first element
                return valid_text(t_s)
        return False

    images_is_valid = valid_images(images) or images is None
    images_is_text = valid_text(images)
    text_is_valid = valid_text(text) or text is None
    text_is_images = valid_images(text)
    if images_is_valid and text_is_valid:
        return images, text
    if (images is None and text_is_images) or (text is None and images_is_text) or (images_is_text and text_is_images):
        return text, images
    raise ValueError("Invalid input type. Check that `images` and/or `text` are valid inputs.")


class FetchError(Exception):
    """`requests.get` of a URL-looking text item failed (no network here)."""


def processor_text(prompt: Sequence[Item], fetched: list[str]) -> tuple[str, int]:
    """`IdeficsProcessor.__call__`'s loop for one prompt: the full text (from `<s>`) and its image count."""
    full_text = "<s>"
    last_was_image = last_was_text = False
    images = 0

    def image_tokens() -> str:
        return IMAGE_TOKEN + FAKE_TOKEN if last_was_image else FAKE_TOKEN + IMAGE_TOKEN + FAKE_TOKEN

    for i, item in enumerate(prompt):
        if i > 0:
            last_was_text = not last_was_image
        if isinstance(item, str):
            item = item.strip(" ")
            if is_url(item):
                fetched.append(item)
                raise FetchError(f"HTTPConnectionPool: Max retries exceeded with url: {item}")
            if last_was_text:
                full_text += END_OF_UTTERANCE
            full_text += item
            last_was_image = False
        else:
            full_text += image_tokens()
            images += 1
            last_was_image = True
    return full_text, images


# -- the shard's batches --------------------------------------------------------------------------------------


@dataclass
class Prefilled:
    """One request after its prefill: the ids the shard built and the prefill it reports."""

    ids: list[int]
    prefill: list[dict[str, Any]]
    truncated: bool = False


@dataclass
class _Pending:
    prompt: list[Item]
    future: asyncio.Future[Prefilled]


@dataclass
class Shard:
    """Prefills requests in batches: those that arrive within `window_s` of the first are prefilled together."""

    max_truncation: int = 1024
    window_s: float = 0.05
    logprobs: dict[str, float] = field(default_factory=dict)
    fetched: list[str] = field(default_factory=list)
    """URLs the processor tried to fetch."""
    batches: list[int] = field(default_factory=list)
    """Size of each prefill batch."""
    padded_prefills: int = 0
    failed_batches: list[str] = field(default_factory=list)
    """The exception of each prefill batch that failed."""
    _pending: list[_Pending] = field(default_factory=list)

    def logprob(self, context: Sequence[int], token_id: int) -> float:
        text = token_text(token_id).strip()
        if text in self.logprobs:
            return self.logprobs[text]
        key = f"{tuple(context[-2:])}->{token_id}".encode()
        return -0.05 - (zlib.crc32(key) % 900) / 100.0

    async def prefill(self, prompt: list[Item]) -> Prefilled:
        """Wait for this request's prefill batch; raises what the batch raised."""
        future: asyncio.Future[Prefilled] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(prompt, future))
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_later(self.window_s, self._run_batch)
        return await future

    def _run_batch(self) -> None:
        batch, self._pending = self._pending, []
        self.batches.append(len(batch))
        try:
            results = self._prefill_batch([p.prompt for p in batch])
        except Exception as exc:  # the shard's exception fails every request of the batch
            self.failed_batches.append(f"{type(exc).__name__}: {exc}")
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)

    def _prefill_batch(self, prompts: list[list[Item]]) -> list[Prefilled]:
        # processor(prompts, ...): `prompts` arrive as `images`, `text` is None.
        _images, text = validate_order(prompts, None)
        if text is None:  # no swap: `prompts = text` is never assigned in the processor
            raise UnboundLocalError("cannot access local variable 'prompts' where it is not associated with a value")
        rows: list[tuple[list[int], bool]] = []
        for prompt in text:
            full_text, _ = processor_text(prompt, self.fetched)
            ids = [BOS_ID, *encode(full_text[len("<s>"):])]
            truncated = len(ids) > self.max_truncation
            rows.append((ids[-self.max_truncation:], truncated))
        longest = max(len(ids) for ids, _ in rows)
        out = []
        for ids, truncated in rows:
            n = len(ids)
            true = [self.logprob(ids[:k], ids[k]) for k in range(1, n)]
            if n < longest:  # left-padded: the slice takes the first token scored after a pad, and shifts
                self.padded_prefills += 1
                values: list[float | None] = [None, self.logprob([0], ids[0]), *true[:-1]]
            else:
                values = [None, *true]
            prefill = [{"id": i, "text": token_text(i), "logprob": v} for i, v in zip(ids, values[:n], strict=True)]
            out.append(Prefilled(ids, prefill, truncated))
        return out

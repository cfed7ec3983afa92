"""Reading one answer from TGI's token stream: text deltas through a `TextAssembler`, and the finish reason.

Token texts go through the same `TextAssembler` as the local engine, so deltas never show a stop string or half of
one, and the deltas concatenate to the answer's text; special tokens (`</s>`, `<end_of_utterance>`) are not text.
TGI's finish reasons map to ours: `length` -> LENGTH, `eos_token` -> END_OF_UTTERANCE, `stop_sequence` ->
STOP_STRING, except that a stop on `<end_of_utterance>` (which TGI handles as a stop sequence, since the
checkpoint's EOS is `</s>`) is the model ending its turn: END_OF_UTTERANCE, as on the local engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from model_server.errors import GenerationFailed
from model_server.prompt import END_OF_UTTERANCE
from model_server.remote.backend import StreamProgress, stop_reason
from model_server.remote.http import FAILED_MESSAGE
from model_server.streaming import TextAssembler
from model_server.types import FinishReason

FINISH_REASONS = {
    "length": FinishReason.LENGTH,
    "eos_token": FinishReason.END_OF_UTTERANCE,
    "stop_sequence": FinishReason.STOP_STRING,
}


async def read_answer(events: AsyncIterator[dict[str, Any]], stop_strings: Sequence[str],
                      on_delta: Callable[[str], None], progress: StreamProgress) -> tuple[str, FinishReason]:
    """Read `events` to the answer's end (or to a stop string TGI missed): the answer's text and why it ended.

    Each text delta goes to `on_delta` as it arrives; `progress` counts tokens as they come. Leaving early (a
    stop string) is the caller's cue to close the stream.
    """
    stops = (END_OF_UTTERANCE, *stop_strings)
    pieces: list[str] = []
    assembler = TextAssembler(lambda ids: "".join(pieces[:len(ids)]), stops)
    reason: FinishReason | None = None
    last_text = ""
    async for event in events:
        token = event.get("token") or {}
        if token:
            progress.completion_tokens += 1
            if progress.first_token_at is None:
                progress.first_token_at = asyncio.get_running_loop().time()
            last_text = str(token.get("text") or "")
            if not token.get("special"):
                pieces.append(last_text)
                _send(on_delta, assembler.add(len(pieces) - 1))
        details = event.get("details")
        if isinstance(details, dict):
            progress.completion_tokens = int(details.get("generated_tokens") or progress.completion_tokens)
            if isinstance(details.get("input_length"), int):
                progress.prompt_tokens = details["input_length"]
            reason = FINISH_REASONS.get(str(details.get("finish_reason")), FinishReason.END_OF_UTTERANCE)
            if reason is FinishReason.STOP_STRING and last_text.endswith(END_OF_UTTERANCE):
                reason = FinishReason.END_OF_UTTERANCE
        if assembler.stopped:
            # A stop string TGI was not told about (past its `max_stop_sequences`), or one split so that it
            # matched here first.
            reason = stop_reason("".join(pieces), stops)
            break
        if event.get("generated_text") is not None and reason is None:
            reason = FinishReason.END_OF_UTTERANCE
    if reason is None:
        raise GenerationFailed(FAILED_MESSAGE, detail="TGI stream ended without a final event")
    _send(on_delta, assembler.finish())
    return assembler.text, reason


def _send(on_delta: Callable[[str], None], delta: str) -> None:
    if delta:
        on_delta(delta)

"""Reading one answer from a chat-completions stream: text deltas through a `TextAssembler`, and the finish reason.

Content deltas go through the same `TextAssembler` as the local engine and TGI, so deltas never show a stop string
or half of one, and the deltas concatenate to the answer's text. Chunks without choices (vLLM's usage chunk,
`stream_options.include_usage`), a first chunk with only the role, and empty contents are all normal.
Finish reasons: `length` -> LENGTH; `stop` -> END_OF_UTTERANCE (the model ended its turn), or STOP_STRING where
the server says a stop string matched (vLLM's extra `stop_reason` is then that string; it is a token id, or
absent, when the model ended its turn).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from model_server.errors import StreamBroken
from model_server.prompt import END_OF_UTTERANCE
from model_server.remote.backend import StreamProgress, stop_reason
from model_server.remote.http import CUT_MESSAGE
from model_server.streaming import TextAssembler
from model_server.types import FinishReason


def finish_reason(choice: dict[str, Any]) -> FinishReason:
    reason = choice.get("finish_reason")
    if reason == "length":
        return FinishReason.LENGTH
    stopped_by = choice.get("stop_reason")
    if isinstance(stopped_by, str) and stopped_by and stopped_by != END_OF_UTTERANCE:
        return FinishReason.STOP_STRING
    return FinishReason.END_OF_UTTERANCE


async def read_answer(events: AsyncIterator[dict[str, Any]], stop_strings: Sequence[str],
                      on_delta: Callable[[str], None], progress: StreamProgress) -> tuple[str, FinishReason]:
    """Read `events` to the answer's end (or to a stop string the server missed): the text and why it ended.

    Each text delta goes to `on_delta` as it arrives; `progress` counts content chunks as tokens until the usage
    chunk gives the server's counts. Leaving early (a stop string) is the caller's cue to close the stream.
    """
    stops = (END_OF_UTTERANCE, *stop_strings)
    pieces: list[str] = []
    assembler = TextAssembler(lambda ids: "".join(pieces[:len(ids)]), stops)
    reason: FinishReason | None = None
    async for event in events:
        usage = event.get("usage")
        if isinstance(usage, dict):
            progress.prompt_tokens = int(usage.get("prompt_tokens") or progress.prompt_tokens)
            progress.completion_tokens = int(usage.get("completion_tokens") or progress.completion_tokens)
        for choice in event.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            content = (choice.get("delta") or {}).get("content")
            if isinstance(content, str) and content:
                if progress.first_token_at is None:
                    progress.first_token_at = asyncio.get_running_loop().time()
                if not isinstance(usage, dict):
                    progress.completion_tokens += 1
                pieces.append(content)
                _send(on_delta, assembler.add(len(pieces) - 1))
            if choice.get("finish_reason"):
                reason = finish_reason(choice)
        if assembler.stopped:
            # A stop string the server was not told about (past `MAX_STOP_SEQUENCES`), or split so that it
            # matched here first.
            reason = stop_reason("".join(pieces), stops)
            break
    if reason is None:
        # `[DONE]` with no finish reason: the server dropped the answer (llama.cpp's server does so to an answer
        # when another request comes, unless started with `--interrupt_requests false`).
        raise StreamBroken(CUT_MESSAGE, detail="OpenAI-compatible stream ended without a finish reason")
    _send(on_delta, assembler.finish())
    return assembler.text, reason


def _send(on_delta: Callable[[str], None], delta: str) -> None:
    if delta:
        on_delta(delta)

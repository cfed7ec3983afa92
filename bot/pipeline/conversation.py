"""The conversation pipeline shared by Discord and the terminal: store, render, generate, store.

Nothing here knows Discord. A front end turns its events into `IncomingMessage`s and gives a
`ReplySink` that knows how to show queue positions, stream text and deliver the answer.

Order: the user's message is stored before anything can fail. Requests of one channel run one at a
time (a lock per channel), so each sees the answers before it; requests of different channels run
concurrently and share the executor's batches.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from PIL import Image

from bot.errors import user_message
from bot.images.check import CheckedImage
from bot.pipeline.decoded_images import DecodedImages
from model_server.backend import GenerationBackend, RequestHandle
from model_server.errors import Busy, ModelServerError
from model_server.prompt import PromptError, render_chat
from model_server.types import ChatTurn, Decoding, FinishReason, GenerationParams, GenerationResult, Prompt
from storage import ChannelSettings, ImageBlob, NewMessage, StorageError, Store, StoredMessage

log = logging.getLogger(__name__)

EMPTY_ANSWER = "(the model gave an empty answer; try rephrasing)"


@dataclass(frozen=True)
class ChatDefaults:
    """Defaults a channel's own settings override (from the settings object)."""

    system_prompt: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.7
    decoding: Decoding = "greedy"
    max_images: int = 4
    """Most recent images kept as images in a prompt; older ones become a text marker."""
    history_messages: int = 40
    """Messages loaded from the channel's history before the token budget trims it."""
    channel_backlog: int = 8
    """Most requests of one channel running or waiting their turn; past it the user is told the model is busy,
    so a flooded channel cannot build an unbounded line (the executor's queue only bounds requests whose
    turn has come)."""


@dataclass(frozen=True)
class ModelInfo:
    """What rendering needs to know about the model, without the model itself."""

    name: str
    instruct: bool
    max_positions: int = 2048
    """Prompt plus answer."""
    max_input_tokens: int | None = None
    """The most prompt tokens the server takes whatever the answer's length (TGI's `max_input_tokens`)."""
    count_tokens: Callable[[str], int] | None = None
    """The tokenizer's count; None uses a safe over-estimate."""
    count_blocks: bool = False
    """`count_tokens` waits on the event loop (a remote tokenizer): render on a worker thread."""

    def prompt_budget(self, max_new_tokens: int) -> int:
        """The most prompt tokens for an answer of `max_new_tokens` (the channel's own)."""
        budget = self.max_positions - max_new_tokens
        return min(budget, self.max_input_tokens) if self.max_input_tokens else budget


@dataclass(frozen=True)
class IncomingMessage:
    platform_id: str
    channel_key: str
    author_id: str
    author_name: str
    text: str
    images: tuple[CheckedImage, ...] = ()
    reply_to: str | None = None
    created_at: datetime | None = None


@dataclass(frozen=True)
class Reply:
    """What a front end answered with, so the assistant turn can be stored."""

    platform_id: str
    """Id of the (first) message carrying the answer."""
    text: str


class ReplySink(Protocol):
    """How one front end shows the progress and the end of one answer."""

    async def queued(self, ahead: int) -> None:
        """The request waits; `ahead` requests start before it. Called when the number changes."""

    async def delta(self, text: str) -> None:
        """More answer text (append it)."""

    async def finish(self, text: str, result: GenerationResult) -> Reply | None:
        """Deliver the whole answer; return where it went (None: nothing was sent)."""

    async def failed(self, user_message: str) -> None:
        """Tell the user, briefly, that no answer will come."""


@dataclass
class _ChannelTurn:
    """One channel's lock and how many requests hold it or wait for it (dropped when none do)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class Conversation:
    def __init__(self, store: Store, executor: GenerationBackend | None, model: ModelInfo, defaults: ChatDefaults, *,
                 assistant_id: str = "assistant", assistant_name: str = "Assistant") -> None:
        self.store = store
        self.executor = executor
        self.model = model
        self.defaults = defaults
        self.assistant_id = assistant_id
        self.assistant_name = assistant_name
        self._locks: dict[str, _ChannelTurn] = {}
        self.images = DecodedImages()
        self._owed: dict[str, str] = {}
        """Request states that could not be written (database away): written with the next success, so an
        answered request is never left "pending" for a restart to answer again."""

    # -- storing --------------------------------------------------------------------------------
    async def record(self, msg: IncomingMessage, *, request: bool) -> StoredMessage | None:
        """Store a user's message (None: this platform id was stored before, a duplicate event)."""
        if self._owed:
            await self.settle_owed_states()
        stored = await self.store.append_message(NewMessage(
            platform_id=msg.platform_id, channel_key=msg.channel_key, role="user", author_id=msg.author_id,
            author_name=msg.author_name, text=msg.text, reply_to=msg.reply_to,
            request_state="pending" if request else None, created_at=msg.created_at,
            images=tuple(ImageBlob(i.data, i.mime, i.width, i.height) for i in msg.images),
        ))
        if stored is None:
            log.info("message %s in channel %s already stored: duplicate event", msg.platform_id, msg.channel_key)
        return stored

    # -- prompting ------------------------------------------------------------------------------
    def params_for(self, settings: ChannelSettings) -> GenerationParams:
        decoding: Decoding = settings.decoding or self.defaults.decoding
        return GenerationParams(
            max_new_tokens=settings.max_new_tokens or self.defaults.max_new_tokens,
            decoding=decoding,
            temperature=settings.temperature if settings.temperature is not None else self.defaults.temperature,
            num_beams=2 if decoding == "beam" else 1,
        )

    async def prompt_for(self, request: StoredMessage) -> Prompt:
        settings = await self.store.channel_settings(request.channel_key)
        params = self.params_for(settings)
        window = await self.store.recent_window(request.channel_key, self.defaults.history_messages)
        turns = self.turns(conversation_order(window, request))
        render = functools.partial(
            render_chat, turns, instruct=self.model.instruct,
            system_prompt=settings.system_prompt or self.defaults.system_prompt,
            max_images=self.defaults.max_images,
            max_prompt_tokens=self.model.prompt_budget(params.max_new_tokens),
            count_tokens=self.model.count_tokens, params=params,
        )
        if self.model.count_blocks:
            return await asyncio.to_thread(render)
        return render()

    def turns(self, messages: Sequence[StoredMessage]) -> list[ChatTurn]:
        # Only the newest `max_images` images are shown to the model; older ones become a text marker,
        # so they are not decoded at all (a 1x1 stand-in keeps their place).
        keep = self.defaults.max_images
        turns: list[ChatTurn] = []
        for message in reversed(messages):
            images = []
            for stored in reversed(message.images):
                if keep > 0:
                    images.append(self.images.get(stored))
                    keep -= 1
                else:
                    images.append(Image.new("RGB", (1, 1)))
            images.reverse()
            turns.append(ChatTurn(role=message.role, text=message.text, author=message.author_name,
                                  images=tuple(images) if message.role == "user" else ()))
        turns.reverse()
        return turns

    # -- answering ------------------------------------------------------------------------------

    async def handle(self, msg: IncomingMessage, sink: ReplySink) -> Reply | None:
        """Store `msg` as a request and answer it (nothing for a duplicate)."""
        stored = await self.record(msg, request=True)
        if stored is None:
            return None
        return await self.respond(stored, sink)

    async def respond(self, request: StoredMessage, sink: ReplySink) -> Reply | None:
        """Answer a stored request in its channel's turn; failures reach the user through `sink`."""
        key = request.channel_key
        turn = self._locks.setdefault(key, _ChannelTurn())
        if turn.users >= self.defaults.channel_backlog:
            log.info("request %s refused: channel %s has %d requests in line", request.platform_id, key, turn.users)
            await self._mark(request, "failed")
            await sink.failed(Busy(turn.users, self.defaults.channel_backlog).user_message)
            return None
        # Counted, not `lock.locked()`: between a release and the next waiter waking the lock reads as free,
        # and dropping it then would let a later request of the channel take a new lock and overtake.
        turn.users += 1
        try:
            async with turn.lock:
                return await self._respond(request, sink)
        finally:
            turn.users -= 1
            if turn.users == 0 and self._locks.get(key) is turn:
                del self._locks[key]

    async def _respond(self, request: StoredMessage, sink: ReplySink) -> Reply | None:
        started = time.monotonic()
        try:
            prompt = await self.prompt_for(request)
            if self.executor is None:
                raise ModelServerError(user_message="no model is loaded", detail="no executor")
            handle = self.executor.submit(prompt)
            try:
                await report_queue(handle, sink)
                async for delta in handle:
                    await sink.delta(delta)
                result = await handle.result()
            except BaseException:
                handle.cancel()
                raise
            text = result.text if result.text.strip() else EMPTY_ANSWER
            if result.finish_reason is FinishReason.CANCELLED:
                await self._mark(request, "failed")
                return None
            reply = await sink.finish(text, result)
        except (PromptError, ModelServerError, StorageError) as exc:
            log.warning("request %s in channel %s not answered: %s", request.platform_id, request.channel_key,
                        type(exc).__name__)
            await self._mark(request, "failed")
            await sink.failed(user_message(exc))
            return None
        except Exception as exc:
            log.exception("request %s in channel %s failed", request.platform_id, request.channel_key)
            await self._mark(request, "failed")
            await sink.failed(user_message(exc))
            return None
        await self.store_answer(request, reply)
        log.info("request %s answered: %d chars, %s, %.2fs", request.platform_id, len(text),
                 result.finish_reason.value, time.monotonic() - started)
        return reply

    async def store_answer(self, request: StoredMessage, reply: Reply | None) -> None:
        """After delivery: store the answer as the assistant turn (if one was sent), mark the request answered.

        Both in one transaction when they can be. The answer is out: the request is marked answered even if its
        text cannot be stored, so a restart never answers it a second time.
        """
        if reply is not None:
            try:
                stored = await self.store.append_answer(NewMessage(
                    platform_id=reply.platform_id, channel_key=request.channel_key, role="assistant",
                    author_id=self.assistant_id, author_name=self.assistant_name, text=reply.text,
                    reply_to=request.platform_id,
                ))
            except StorageError:
                log.warning("answer %s to request %s delivered but not stored", reply.platform_id,
                            request.platform_id)
            else:
                if stored is not None:  # marked "answered" with it
                    self._owed.pop(request.platform_id, None)
                    if self._owed:
                        await self.settle_owed_states()
                    return
        await self._mark(request, "answered")

    async def _mark(self, request: StoredMessage, state: str) -> None:
        self._owed[request.platform_id] = state
        await self.settle_owed_states()

    async def settle_owed_states(self) -> None:
        """Write the request states still owed, oldest first; stop at the first failure."""
        for platform_id, state in list(self._owed.items()):
            try:
                await self.store.set_request_state(platform_id, state)  # type: ignore[arg-type]
            except StorageError:
                log.warning("could not mark request %s %s (%d owed)", platform_id, state, len(self._owed))
                return
            if self._owed.get(platform_id) == state:
                del self._owed[platform_id]


async def report_queue(handle: RequestHandle, sink: ReplySink) -> None:
    """Show "queued, N ahead" while the request waits, updated when N changes."""
    last = -1
    while not await handle.wait_started(1.0 if last >= 0 else 0.3):
        ahead = handle.ahead()
        if ahead != last:
            await sink.queued(ahead)
            last = ahead


def conversation_order(window: Sequence[StoredMessage], request: StoredMessage) -> list[StoredMessage]:
    """The window as the request saw it, each answer right after the message it answers.

    Answers are stored when they finish, so by id an answer can land after later user messages;
    the model must see question, answer, next question. Messages after the request are left out.
    """
    answers: dict[str, list[StoredMessage]] = {}
    for message in window:
        if message.role == "assistant" and message.reply_to:
            answers.setdefault(message.reply_to, []).append(message)
    present = {m.platform_id for m in window}
    ordered: list[StoredMessage] = []
    for message in window:
        if message.role == "assistant" and message.reply_to in present:
            continue
        if message.id > request.id and message.role == "user":
            continue
        ordered.append(message)
        if message.id == request.id:
            break
        ordered.extend(answers.get(message.platform_id, []))
    return ordered

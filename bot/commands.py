"""The slash commands and the "Caption image" message menu: the guide's tasks, channel admin, status.

    /caption image [prompt] [image2] [image3] [image4]   captions, several images as one batch
    /ask image question                                  visual question answering
    /classify image categories [top]                     rank classification, with percentages
    /story image [image2] [image3]                       an image-guided story (beam search)
    /fewshot example_image example_answer image [instruction] [example_image2] [example_answer2]
    /reset                                               clear this channel's history (Manage Channels)
    /settings [answer_mode] [record_mode] [system_prompt] [max_new_tokens] [temperature] [decoding] [clear]
                                                         no option: show; options: set, then show
                                                         (Manage Channels)
    /status                                              model, backend, queue, latency, errors, fault
    /forget-me                                           delete what the bot stored about the caller
    "Caption image" (message menu)                       caption the first image of a message

A thin layer: each command turns its options into checked images and strings, builds the guide's prompt
with `model_server.tasks`, runs it on the executor and hands the text to the reply sink. Every command
defers first (Discord's 3-second limit) and answers every failure with one short message; the detail
goes to the log, never a traceback to the user. No command reads or writes the conversation history except
/reset and /forget-me: task answers are one-off and do not enter the channel's chat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.attachments import embed_image_urls, image_from_attachment, image_from_url
from bot.conversation import EMPTY_ANSWER, INTERNAL_ERROR, ReplySink, report_queue
from bot.errors import UserInputError
from bot.images import CheckedImage
from bot.replies import NO_MENTIONS, InteractionReplySink, split_message
from bot.triggers import DEFAULT_ANSWER_MODE, DEFAULT_RECORD_MODE
from model_server import tasks
from model_server.backend import GenerationBackend, RequestHandle
from model_server.errors import Busy, ModelServerError
from model_server.prompt import PromptError
from model_server.types import FinishReason, GenerationResult, Prompt, RankedCategory
from storage import ChannelSettings, StorageError

if TYPE_CHECKING:
    from bot.client import IdeficsBot

log = logging.getLogger(__name__)

BUSY_MESSAGE = "the model is busy, try again in a minute"
NO_MODEL_MESSAGE = "no model is loaded"
NEEDS_MANAGE_CHANNELS = "you need the Manage Channels permission to do that here"
NO_IMAGE_IN_MESSAGE = "that message has no image"
INCOMPLETE_EXAMPLE = "give both example_image2 and example_answer2, or neither"
CANCELLED_MESSAGE = "the request was cancelled"

DEFAULT_TOP = 5
SHOWN_SYSTEM_PROMPT_CHARS = 300
"""/settings shows at most this much of a system prompt: enough to recognise it, short enough to read."""
CLEAR_WORDS = frozenset({"none", "default", "clear", ""})
"""A `system_prompt` option equal to one of these (any case) removes the channel's own system prompt."""

_SETTING_NAMES = ("answer_mode", "record_mode", "system_prompt", "max_new_tokens", "temperature", "decoding")


class _NotAllowed(UserInputError):
    default_message = NEEDS_MANAGE_CHANNELS


def _choices(*values: str) -> list[app_commands.Choice[str]]:
    return [app_commands.Choice(name=v, value=v) for v in values]


def user_message_for(exc: BaseException) -> str:
    """The one short line a user sees for `exc` (the log gets the detail separately)."""
    if isinstance(exc, Busy):
        return BUSY_MESSAGE
    if isinstance(exc, UserInputError | ModelServerError | StorageError):
        return exc.user_message
    if isinstance(exc, PromptError):
        return str(exc)  # PromptError messages are written for the user and never quote their text
    return INTERNAL_ERROR


def format_ranking(ranked: Sequence[RankedCategory], top: int) -> str:
    """"1. vegetables — 62%" lines, most likely first, the first `top` of them.

    Percentages are rounded with the largest-remainder method so that the full list sums to exactly 100.
    """
    raw = [r.probability * 100 for r in ranked]
    floors = [int(p) for p in raw]
    missing = max(0, round(sum(raw)) - sum(floors))
    by_remainder = sorted(range(len(raw)), key=lambda i: raw[i] - floors[i], reverse=True)
    for i in by_remainder[:missing]:
        floors[i] += 1
    lines = [f"{n}. {r.category} — {pct}%" for n, (r, pct) in enumerate(zip(ranked, floors, strict=True), 1)]
    shown = lines[:top]
    if len(lines) > top:
        shown.append(f"(and {len(lines) - top} more)")
    return "\n".join(shown)


def _shown_model_name(name: str) -> str:
    # A local checkpoint folder would show the server's file layout; its last part names the model as well.
    path = PurePath(name)
    if path.is_absolute() or name.startswith("."):
        return path.name or name
    return name


def _answer_text(text: str) -> str:
    return text if text.strip() else EMPTY_ANSWER


def _continue(lead: str, text: str) -> str:
    """`lead` (a caption prompt, trailing spaces removed) followed by the model's continuation `text`.

    The processor strips the prompt's trailing space, so whether the continuation starts with one depends on
    the tokenizer: add it only where words would otherwise run together.
    """
    if not lead or not text or text[0].isspace() or text[0] in ",.;:!?'\"":
        return lead + text
    return f"{lead} {text}"


def _context(interaction: discord.Interaction) -> str:
    """Ids that locate one interaction in the log (never option text)."""
    return f"interaction={interaction.id} channel={interaction.channel_id} user={interaction.user.id}"


def _checked(result: GenerationResult) -> GenerationResult:
    if result.finish_reason is FinishReason.CANCELLED:
        raise ModelServerError(CANCELLED_MESSAGE, detail="request cancelled")
    return result


class TaskCommands(commands.Cog):
    """The guide's tasks and the channel's admin commands, as application commands."""

    def __init__(self, bot: IdeficsBot) -> None:
        self.bot = bot
        self.services = bot.services
        self.limits = bot.services.settings.image_limits()
        self.caption_menu = app_commands.ContextMenu(name="Caption image", callback=self.caption_message)

    async def cog_load(self) -> None:
        # Message menus cannot be declared inside a cog; they join the same tree by hand.
        self.bot.tree.add_command(self.caption_menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.caption_menu.name, type=self.caption_menu.type)

    # -- the shared frame of every command -----------------------------------------------------------
    async def _run(self, interaction: discord.Interaction, command: str,
                   work: Callable[[InteractionReplySink], Awaitable[None]], *, ephemeral: bool = False) -> None:
        """Defer, run `work` with a sink for this interaction, and turn every failure into one message."""
        started = time.monotonic()
        await interaction.response.defer(thinking=True, ephemeral=ephemeral)
        sink = InteractionReplySink(interaction, ephemeral=ephemeral,
                                    edit_interval_s=self.services.settings.stream_edit_interval_s)
        try:
            await work(sink)
        except (UserInputError, PromptError, ModelServerError, StorageError) as exc:
            # `detail` (user errors, storage) and PromptError texts hold ids and sizes, never the user's text.
            log.info("/%s not answered: %s %s: %s", command, _context(interaction), type(exc).__name__,
                     getattr(exc, "detail", "") or exc)
            await self._fail(sink, user_message_for(exc))
        except Exception:
            log.exception("/%s failed: %s", command, _context(interaction))
            await self._fail(sink, INTERNAL_ERROR)
        else:
            log.info("/%s answered: %s %.2fs", command, _context(interaction), time.monotonic() - started)

    async def _fail(self, sink: ReplySink, message: str) -> None:
        try:
            await sink.failed(message)
        except discord.HTTPException as exc:
            # The interaction token may have expired (15 minutes); nothing more can reach the user.
            log.warning("could not deliver an error message: HTTP %s", exc.status)

    async def _send(self, interaction: discord.Interaction, text: str, *, ephemeral: bool = False) -> None:
        """A finished, non-streamed answer: the deferred original, then followups past 2000 characters."""
        parts = split_message(text) or [EMPTY_ANSWER]
        await interaction.edit_original_response(content=parts[0], allowed_mentions=NO_MENTIONS)
        for part in parts[1:]:
            await interaction.followup.send(part, allowed_mentions=NO_MENTIONS, ephemeral=ephemeral)

    def _executor(self) -> GenerationBackend:
        if self.services.executor is None:
            raise ModelServerError(NO_MODEL_MESSAGE, detail="no executor")
        return self.services.executor

    async def _images(self, attachments: Sequence[discord.Attachment | None]) -> list[CheckedImage]:
        given = [a for a in attachments if a is not None]
        return list(await asyncio.gather(*(image_from_attachment(a, self.limits) for a in given)))

    async def _generate(self, sink: ReplySink, prompt: Prompt, *, stream: bool, lead: str = "") -> None:
        """Run one prompt, showing its place in the queue, streaming when asked; `lead` starts the answer."""
        handle = self._executor().submit(prompt)
        try:
            await report_queue(handle, sink)
            if stream:
                shown = lead
                if lead:
                    await sink.delta(lead)
                async for delta in handle:
                    grown = _continue(lead, shown[len(lead):] + delta)
                    await sink.delta(grown[len(shown):])
                    shown = grown
            result = _checked(await handle.result())
        except BaseException:
            handle.cancel()
            raise
        await sink.finish(_continue(lead, _answer_text(result.text)), result)

    async def _generate_many(self, sink: ReplySink, prompts: Sequence[Prompt],
                             render: Callable[[list[GenerationResult]], str]) -> None:
        """Submit every prompt at once (so the executor batches them), then answer with all results."""
        executor = self._executor()
        handles: list[RequestHandle] = []
        try:
            for prompt in prompts:
                handles.append(executor.submit(prompt))
            await report_queue(handles[0], sink)
            results = [_checked(r) for r in await asyncio.gather(*(h.result() for h in handles))]
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        await sink.finish(render(results), results[-1])

    def _limited(self, interaction: discord.Interaction) -> contextlib.AbstractContextManager[None]:
        return self.bot.limiter.acquire(str(interaction.user.id))

    # -- the guide's tasks ---------------------------------------------------------------------------
    @app_commands.command(name="caption", description="Caption one or more images (up to 4, run as one batch)")
    @app_commands.describe(
        image="The image to caption",
        prompt="Text for the model to continue, e.g. \"This is an image of \"",
        image2="A second image to caption",
        image3="A third image to caption",
        image4="A fourth image to caption",
    )
    async def caption(self, interaction: discord.Interaction, image: discord.Attachment,
                      prompt: app_commands.Range[str, 1, tasks.MAX_TEXT_CHARS] | None = None,
                      image2: discord.Attachment | None = None, image3: discord.Attachment | None = None,
                      image4: discord.Attachment | None = None) -> None:
        async def work(sink: InteractionReplySink) -> None:
            with self._limited(interaction):
                images = [c.image for c in await self._images([image, image2, image3, image4])]
                prompts = [tasks.caption(i) if prompt is None else tasks.prompted_caption(i, prompt)
                           for i in images]
                lead = "" if prompt is None else prompt.rstrip()
                if len(prompts) == 1:
                    await self._generate(sink, prompts[0], stream=True, lead=lead)
                    return

                def render(results: list[GenerationResult]) -> str:
                    return "\n".join(f"**{n}.** {_continue(lead, _answer_text(r.text)).strip()}"
                                      for n, r in enumerate(results, 1))

                await self._generate_many(sink, prompts, render)

        await self._run(interaction, "caption", work)

    @app_commands.command(name="ask", description="Ask a question about an image")
    @app_commands.describe(image="The image the question is about", question="Your question about the image")
    async def ask(self, interaction: discord.Interaction, image: discord.Attachment,
                  question: app_commands.Range[str, 1, tasks.MAX_TEXT_CHARS]) -> None:
        async def work(sink: InteractionReplySink) -> None:
            with self._limited(interaction):
                (checked,) = await self._images([image])
                await self._generate(sink, tasks.vqa(checked.image, question), stream=True)

        await self._run(interaction, "ask", work)

    @app_commands.command(name="classify", description="Rank an image against your categories")
    @app_commands.describe(
        image="The image to classify",
        categories=f"Comma-separated categories, at most {tasks.MAX_CATEGORIES}, e.g. \"animals, vegetables, cars\"",
        top=f"How many of the best categories to show (default {DEFAULT_TOP})",
    )
    async def classify(self, interaction: discord.Interaction, image: discord.Attachment, categories: str,
                       top: app_commands.Range[int, 1, tasks.MAX_CATEGORIES] = DEFAULT_TOP) -> None:
        async def work(sink: InteractionReplySink) -> None:
            # Checked before the download: a bad list needs no image to be refused.
            names = tasks.validate_categories(categories)
            with self._limited(interaction):
                (checked,) = await self._images([image])
                ranked = await self._executor().rank(tasks.classify_prompt(checked.image, names), names)
            await self._send(interaction, format_ranking(ranked, max(1, top)))

        await self._run(interaction, "classify", work)

    @app_commands.command(name="story", description="Write a story from one to three images")
    @app_commands.describe(image="The image the story starts from", image2="A second image for the story",
                           image3="A third image for the story")
    async def story(self, interaction: discord.Interaction, image: discord.Attachment,
                    image2: discord.Attachment | None = None, image3: discord.Attachment | None = None) -> None:
        async def work(sink: InteractionReplySink) -> None:
            with self._limited(interaction):
                images = [c.image for c in await self._images([image, image2, image3])]
                # Beam search yields its text only at the end: nothing to stream.
                await self._generate(sink, tasks.story(images), stream=False)

        await self._run(interaction, "story", work)

    @app_commands.command(name="fewshot", description="Show the model an example answer, then ask about your image")
    @app_commands.describe(
        example_image="An example image",
        example_answer="The answer you want for the example image (the format the model copies)",
        image="The image to answer about",
        instruction=f"The instruction for every image (default \"{tasks.DEFAULT_FEWSHOT_INSTRUCTION}\")",
        example_image2="A second example image (needs example_answer2)",
        example_answer2="The answer for the second example image (needs example_image2)",
    )
    async def fewshot(self, interaction: discord.Interaction, example_image: discord.Attachment,
                      example_answer: app_commands.Range[str, 1, tasks.MAX_TEXT_CHARS],
                      image: discord.Attachment,
                      instruction: app_commands.Range[str, 1, tasks.MAX_TEXT_CHARS] | None = None,
                      example_image2: discord.Attachment | None = None,
                      example_answer2: app_commands.Range[str, 1, tasks.MAX_TEXT_CHARS] | None = None) -> None:
        async def work(sink: InteractionReplySink) -> None:
            if (example_image2 is None) != (example_answer2 is None):
                raise UserInputError(INCOMPLETE_EXAMPLE)
            with self._limited(interaction):
                checked = await self._images([example_image, example_image2, image])
                answers = [example_answer] + ([example_answer2] if example_answer2 is not None else [])
                examples = [(c.image, a) for c, a in zip(checked[:-1], answers, strict=True)]
                prompt = tasks.fewshot(examples, checked[-1].image,
                                       instruction or tasks.DEFAULT_FEWSHOT_INSTRUCTION)
                await self._generate(sink, prompt, stream=True)

        await self._run(interaction, "fewshot", work)

    async def caption_message(self, interaction: discord.Interaction, message: discord.Message) -> None:
        """The "Caption image" menu: the first image attached to (or embedded in) the message."""
        async def work(sink: InteractionReplySink) -> None:
            with self._limited(interaction):
                checked = await self._first_image(message)
                await self._generate(sink, tasks.caption(checked.image), stream=True)

        await self._run(interaction, "Caption image", work)

    async def _first_image(self, message: discord.Message) -> CheckedImage:
        for attachment in message.attachments:
            # The declared type only picks the candidate; the bytes are still checked by content.
            if attachment.content_type is None or attachment.content_type.startswith("image/"):
                return await image_from_attachment(attachment, self.limits)
        for url in embed_image_urls(message)[:1]:
            # Discord's own CDN link, still fetched by our downloader with its address and size checks.
            return await image_from_url(url, self.services.fetcher, self.limits)
        raise UserInputError(NO_IMAGE_IN_MESSAGE)

    # -- the channel ---------------------------------------------------------------------------------
    @staticmethod
    def _may_manage(interaction: discord.Interaction) -> bool:
        # `default_permissions` is only a default that server admins can change, so it is checked again.
        # Outside a server (a DM) the channel is the user's own.
        return interaction.guild_id is None or interaction.permissions.manage_channels

    @app_commands.command(name="reset", description="Clear this channel's conversation history")
    @app_commands.default_permissions(manage_channels=True)
    async def reset(self, interaction: discord.Interaction) -> None:
        async def work(sink: InteractionReplySink) -> None:
            if not self._may_manage(interaction):
                raise _NotAllowed()
            removed = await self.services.database.store.clear_channel(str(interaction.channel_id))
            noun = "message" if removed == 1 else "messages"
            await self._send(interaction, f"History cleared: {removed} {noun} removed.")

        await self._run(interaction, "reset", work)

    @app_commands.command(name="settings",
                          description="Show this channel's settings; give options to change them")
    @app_commands.default_permissions(manage_channels=True)
    @app_commands.describe(
        answer_mode="mention: answer when mentioned or replied to; always: answer every message",
        record_mode="all: remember every message as context; addressed: only messages to and from the bot",
        system_prompt="Text given to the model before the conversation (\"none\" removes it)",
        max_new_tokens="Longest answer, in tokens (1 to 1024)",
        temperature="Randomness when decoding is sample (0.01 to 2)",
        decoding="greedy: most likely words; sample: varied; beam: careful, slower",
        clear="Put one setting (or all) back to the bot's default",
    )
    @app_commands.choices(
        answer_mode=_choices("mention", "always"),
        record_mode=_choices("all", "addressed"),
        decoding=_choices("greedy", "sample", "beam"),
        clear=_choices(*_SETTING_NAMES, "all"),
    )
    async def settings(self, interaction: discord.Interaction,
                       answer_mode: app_commands.Choice[str] | None = None,
                       record_mode: app_commands.Choice[str] | None = None,
                       system_prompt: str | None = None,
                       max_new_tokens: app_commands.Range[int, 1, 1024] | None = None,
                       temperature: app_commands.Range[float, 0.01, 2.0] | None = None,
                       decoding: app_commands.Choice[str] | None = None,
                       clear: app_commands.Choice[str] | None = None) -> None:
        async def work(sink: InteractionReplySink) -> None:
            if not self._may_manage(interaction):
                raise _NotAllowed()
            changes: dict[str, Any] = {}
            if clear is not None:
                for name in _SETTING_NAMES if clear.value == "all" else (clear.value,):
                    changes[name] = None
            for name, choice in (("answer_mode", answer_mode), ("record_mode", record_mode),
                                 ("decoding", decoding)):
                if choice is not None:
                    changes[name] = choice.value
            if system_prompt is not None:
                changes["system_prompt"] = None if system_prompt.strip().lower() in CLEAR_WORDS else system_prompt
            if max_new_tokens is not None:
                changes["max_new_tokens"] = max_new_tokens
            if temperature is not None:
                changes["temperature"] = temperature
            store = self.services.database.store
            key = str(interaction.channel_id)
            if changes:
                # Checked by storage (`validate_setting`) before anything is written: Discord's own range
                # checks are client-side only.
                current = await store.update_channel_settings(key, **changes)
                head = f"Changed: {', '.join(sorted(changes))}."
            else:
                current = await store.channel_settings(key)
                head = "Settings of this channel:"
            await self._send(interaction, f"{head}\n{self.describe_settings(current)}", ephemeral=True)

        await self._run(interaction, "settings", work, ephemeral=True)

    def describe_settings(self, current: ChannelSettings) -> str:
        """One line per setting: the channel's value, or the default it falls back to."""
        defaults = self.services.settings.chat_defaults()
        fallback: dict[str, Any] = {
            "answer_mode": DEFAULT_ANSWER_MODE, "record_mode": DEFAULT_RECORD_MODE,
            "system_prompt": defaults.system_prompt, "max_new_tokens": defaults.max_new_tokens,
            "temperature": defaults.temperature, "decoding": defaults.decoding,
        }
        lines = []
        for name in _SETTING_NAMES:
            value = getattr(current, name)
            shown_default = _show_value(fallback[name])
            if value is None:
                lines.append(f"- {name}: {shown_default} (default)")
            else:
                lines.append(f"- {name}: {_show_value(value)} (default: {shown_default})")
        return "\n".join(lines)

    # -- the bot and the user ------------------------------------------------------------------------
    @app_commands.command(name="status", description="The model, its backend, queue and latency")
    async def status(self, interaction: discord.Interaction) -> None:
        async def work(sink: InteractionReplySink) -> None:
            await self._send(interaction, self.describe_status())

        await self._run(interaction, "status", work)

    def describe_status(self) -> str:
        model = self.services.model
        lines = [
            f"model: {_shown_model_name(model.name)}",
            f"backend: {self.services.settings.generation_backend}",
            f"type: {'instruct' if model.instruct else 'base'}",
        ]
        executor = self.services.executor
        if executor is None:
            lines.append("generation: off (no model loaded)")
        else:
            stats = executor.stats()
            latency = "n/a" if stats.median_latency_s is None else f"{stats.median_latency_s:.2f} s"
            lines += [
                f"queue: {stats.queue_length} waiting, {stats.running} running",
                f"median latency: {latency}",
                f"batches run: {stats.batches}",
                f"requests: {stats.completed} done, {stats.failed} failed",
            ]
            cache = stats.vision_cache
            if cache is not None:
                looked_up = cache.hits + cache.misses
                rate = f", {100 * cache.hits / looked_up:.0f}% hits" if looked_up else ""
                lines.append(f"image cache: {cache.entries} images, {cache.bytes / 2**20:.1f} of "
                             f"{cache.capacity_bytes / 2**20:.0f} MiB{rate}")
            seen = [f"{kind} {count}" for kind, count in stats.errors.items() if count]
            if seen:
                lines.append(f"errors: {', '.join(seen)}")
            if stats.fault is not None:
                lines.append(f"fault: {stats.fault}")
        return "```\n" + "\n".join(lines) + "\n```"

    @app_commands.command(name="forget-me", description="Delete everything this bot stored about you, everywhere")
    async def forget_me(self, interaction: discord.Interaction) -> None:
        async def work(sink: InteractionReplySink) -> None:
            removed = await self.services.database.store.forget_user(str(interaction.user.id))
            noun = "message" if removed == 1 else "messages"
            await self._send(interaction, f"Done: {removed} {noun} of yours (and the answers to them) deleted.",
                             ephemeral=True)

        await self._run(interaction, "forget-me", work, ephemeral=True)


def _show_value(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, str) and len(value) > SHOWN_SYSTEM_PROMPT_CHARS:
        return repr(value[:SHOWN_SYSTEM_PROMPT_CHARS] + "…")
    if isinstance(value, str) and " " in value:
        return repr(value)
    return str(value)


async def setup_commands(bot: IdeficsBot) -> None:
    """Register every application command on `bot.tree` (the caller syncs the tree)."""
    await bot.add_cog(TaskCommands(bot))

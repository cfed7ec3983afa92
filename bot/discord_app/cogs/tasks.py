"""The guide's tasks as application commands, and the "Caption image" message menu.

    /caption image [prompt] [image2] [image3] [image4]   captions, several images as one batch
    /ask image question                                  visual question answering
    /classify image categories [top]                     rank classification, with percentages
    /story image [image2] [image3]                       an image-guided story (beam search)
    /fewshot example_image example_answer image [instruction] [example_image2] [example_answer2]
    "Caption image" (message menu)                       caption the first image of a message

A thin layer: each command turns its options into checked images and strings, builds the guide's prompt
with `model_server.tasks`, runs it on the executor and hands the text to the reply sink (in the shared frame
of `cogs.frame`). Task answers are one-off: they do not read or enter the channel's conversation history.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_app.attachments import embed_image_urls, image_from_attachment, image_from_url
from bot.discord_app.cogs.frame import CommandCog, host_of
from bot.discord_app.protocol import CommandHost
from bot.discord_app.replies import InteractionReplySink
from bot.errors import UserInputError
from bot.images.check import CheckedImage
from bot.pipeline.conversation import EMPTY_ANSWER, ReplySink, report_queue
from model_server import tasks
from model_server.backend import GenerationBackend, RequestHandle
from model_server.errors import ModelServerError
from model_server.types import RANKED_BY_GENERATION, FinishReason, GenerationResult, Prompt, RankedCategory

NO_MODEL_MESSAGE = "no model is loaded"
NO_IMAGE_IN_MESSAGE = "that message has no image"
INCOMPLETE_EXAMPLE = "give both example_image2 and example_answer2, or neither"
CANCELLED_MESSAGE = "the request was cancelled"

DEFAULT_TOP = 5


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
    if ranked and ranked[0].by_generation:
        shown.append(f"({RANKED_BY_GENERATION})")
    return "\n".join(shown)


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


def _checked(result: GenerationResult) -> GenerationResult:
    if result.finish_reason is FinishReason.CANCELLED:
        raise ModelServerError(user_message=CANCELLED_MESSAGE, detail="request cancelled")
    return result


class TaskCommands(CommandCog):
    """/caption, /ask, /classify, /story, /fewshot and the "Caption image" message menu."""

    def __init__(self, host: CommandHost) -> None:
        super().__init__(host)
        self.limits = host.services.settings.image_limits()
        self.caption_menu = app_commands.ContextMenu(name="Caption image", callback=self.caption_message)

    async def cog_load(self) -> None:
        # Message menus cannot be declared inside a cog; they join the same tree by hand.
        self.host.tree.add_command(self.caption_menu)

    async def cog_unload(self) -> None:
        self.host.tree.remove_command(self.caption_menu.name, type=self.caption_menu.type)

    def _executor(self) -> GenerationBackend:
        if self.services.executor is None:
            raise ModelServerError(user_message=NO_MODEL_MESSAGE, detail="no executor")
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
        return self.host.limiter.acquire(str(interaction.user.id))

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

        await self.run_command(interaction, "caption", work)

    @app_commands.command(name="ask", description="Ask a question about an image")
    @app_commands.describe(image="The image the question is about", question="Your question about the image")
    async def ask(self, interaction: discord.Interaction, image: discord.Attachment,
                  question: app_commands.Range[str, 1, tasks.MAX_TEXT_CHARS]) -> None:
        async def work(sink: InteractionReplySink) -> None:
            with self._limited(interaction):
                (checked,) = await self._images([image])
                await self._generate(sink, tasks.vqa(checked.image, question), stream=True)

        await self.run_command(interaction, "ask", work)

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
            await self.send_text(interaction, format_ranking(ranked, max(1, top)))

        await self.run_command(interaction, "classify", work)

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

        await self.run_command(interaction, "story", work)

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

        await self.run_command(interaction, "fewshot", work)

    async def caption_message(self, interaction: discord.Interaction, message: discord.Message) -> None:
        """The "Caption image" menu: the first image attached to (or embedded in) the message."""
        async def work(sink: InteractionReplySink) -> None:
            with self._limited(interaction):
                checked = await self._first_image(message)
                await self._generate(sink, tasks.caption(checked.image), stream=True)

        await self.run_command(interaction, "Caption image", work)

    async def _first_image(self, message: discord.Message) -> CheckedImage:
        for attachment in message.attachments:
            # The declared type only picks the candidate; the bytes are still checked by content.
            if attachment.content_type is None or attachment.content_type.startswith("image/"):
                return await image_from_attachment(attachment, self.limits)
        for url in embed_image_urls(message)[:1]:
            # Discord's own CDN link, still fetched by our downloader with its address and size checks.
            return await image_from_url(url, self.services.fetcher, self.limits)
        raise UserInputError(NO_IMAGE_IN_MESSAGE)


async def setup(bot: commands.Bot) -> None:
    """The extension's entry point (`load_extension("bot.discord_app.cogs.tasks")`)."""
    await bot.add_cog(TaskCommands(host_of(bot)))

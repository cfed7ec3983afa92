"""The Discord bot on tiny Idefics2, Idefics3 and SmolVLM checkpoints, and a community moving between models."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from bot.images.addresses import create_session
from bot.images.fetch import ImageFetcher
from bot.pipeline.conversation import Conversation, ModelInfo
from bot.pipeline.services import Services, family_model_info
from bot.settings import Settings
from model_server.config import ModelConfig
from model_server.engine import engine_for
from model_server.executor import Executor
from storage import open_database
from tests.bot.discord_app.conftest import add_image_attachment, answer_to, run_bot, spy_prompts
from tests.bot.discord_app.test_commands import answered, ranking, slash


def info_of(loaded: Any) -> ModelInfo:
    """The `ModelInfo` `open_executor` builds for a loaded model."""
    if loaded.facts is not None:
        return family_model_info(loaded.name, loaded.facts)
    return ModelInfo(name=loaded.name, instruct=loaded.instruct, max_positions=loaded.max_positions,
                     count_tokens=loaded.count_tokens, architecture=loaded.architecture)


@contextlib.asynccontextmanager
async def services_for(settings: Settings, loaded: Any) -> AsyncIterator[Services]:
    """`open_services` for an already loaded model (the session's), with its own executor."""
    config = ModelConfig(model=loaded.name, device="cpu", max_batch_size=8, request_timeout_s=60.0)
    async with contextlib.AsyncExitStack() as stack:
        database = await stack.enter_async_context(open_database(settings.database_url,
                                                                 max_image_bytes=settings.max_image_bytes))
        session = create_session(allow_private=True)
        stack.push_async_callback(session.close)
        fetcher = ImageFetcher(session, settings.image_limits(), allow_private=True)
        executor = await stack.enter_async_context(Executor(engine_for(loaded, config), config,
                                                            batch_window_s=0.02))
        info = info_of(loaded)
        conversation = Conversation(database.store, executor, info, settings.chat_defaults())
        yield Services(settings, database, executor, info, fetcher, conversation)


async def test_bot_on_each_architecture(fake_discord, bot_settings, family_models, architecture) -> None:
    loaded = family_models[architecture]
    async with services_for(bot_settings, loaded) as services, run_bot(fake_discord, services) as running:
        fake, world = running.fake, running.world
        asked = await fake.send_message_as(world.member, world.general, "what is in this picture?",
                                           attachments=[add_image_attachment(fake, seed=3)], mentions_bot=True)
        answer = await answer_to(running, world.general, asked)
        window = await running.store.recent_window(str(world.general.id), 10)
        assert [m.role for m in window] == ["user", "assistant"] and window[1].text == answer.content

        assert answered(await slash(running, "caption", {"image": add_image_attachment(fake, seed=1)})).strip()
        assert answered(await slash(running, "ask", {"image": add_image_attachment(fake, seed=2),
                                                      "question": "What colour is it?"})).strip()
        rows = ranking(answered(await slash(running, "classify", {
            "image": add_image_attachment(fake, seed=4), "categories": "animals, cars, office", "top": 5})))
        assert sorted(r[1] for r in rows) == ["animals", "cars", "office"] and abs(sum(r[2] for r in rows) - 100) <= 1
        assert answered(await slash(running, "story", {"image": add_image_attachment(fake, seed=5)},
                                    wait_s=60)).strip()
        assert answered(await slash(running, "fewshot", {
            "example_image": add_image_attachment(fake, seed=6), "example_answer": "A red square.",
            "image": add_image_attachment(fake, seed=7)})).strip()
        status = answered(await slash(running, "status"))
        fields = dict(line.split(": ", 1) for line in status.strip("`\n").splitlines())
        assert fields["architecture"] == architecture and fields["type"] == "instruct"


async def test_switching_the_model_keeps_history_and_settings(fake_discord, bot_settings, loaded_model,
                                                              family_models) -> None:
    """IDEFICS v1, then SmolVLM, then Idefics2 on the same database: every channel keeps its past and settings."""
    channel_key = None
    for step, loaded in enumerate([loaded_model, family_models["smolvlm"], family_models["idefics2"]]):
        async with services_for(bot_settings, loaded) as services, run_bot(fake_discord, services) as running:
            fake, world = running.fake, running.world
            channel_key = str(world.general.id)
            store = running.store
            if step == 0:
                await store.update_channel_settings(channel_key, system_prompt="Answer like a pirate.",
                                                    max_new_tokens=7)
            settings = await store.channel_settings(channel_key)
            assert settings.system_prompt == "Answer like a pirate." and settings.max_new_tokens == 7
            prompts = spy_prompts(services)
            asked = await fake.send_message_as(world.member, world.general, f"question {step}", mentions_bot=True)
            await answer_to(running, world.general, asked)
            shown = services.model.show(prompts[-1])
            assert prompts[-1].params.max_new_tokens == 7
            assert "Answer like a pirate." in shown
            for earlier in range(step + 1):
                assert f"question {earlier}" in shown  # the history of the earlier models' time
            window = await store.recent_window(channel_key, 20)
            assert [m.role for m in window] == ["user", "assistant"] * (step + 1)

"""The bot end to end on `GENERATION_BACKEND=openai`: the real discord.py client against the fake Discord, services
opened by `open_services` (so `open_executor` picks the OpenAI-compatible backend), answers from the fake server."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.discord_app.cogs.tasks import format_ranking
from bot.pipeline.services import open_executor, open_services
from bot.settings import Settings
from model_server import tasks
from model_server.errors import ModelLoadError
from model_server.openai import OpenAIExecutor
from model_server.types import RANKED_BY_GENERATION
from tests.bot.discord_app.conftest import FAST_EDIT_INTERVAL_S, add_image_attachment, answer_to, run_bot
from tests.bot.discord_app.test_commands import answered, slash
from tests.conftest import noise_image
from tests.fakes.discord_api import FakeDiscord
from tests.fakes.openai_server import MAX_MODEL_LEN, MODEL_ID, FakeOpenAI
from tests.fakes.tgi import Plan, words


def openai_settings(tmp_path: Path, url: str | None, **overrides) -> Settings:
    values = dict(
        discord_token="fake-discord-token", database_url=f"sqlite+aiosqlite:///{tmp_path / 'bot.sqlite3'}",
        generation_backend="openai", openai_base_url=url, openai_model=MODEL_ID, tgi_stall_s=2.0,
        tgi_start_wait_s=0.0, max_new_tokens=40, stream_edit_interval_s=FAST_EDIT_INTERVAL_S,
        user_max_per_minute=30,
    )
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def test_a_mention_is_answered_through_the_openai_backend(tmp_path: Path, fake_discord: FakeDiscord,
                                                                fake_openai: FakeOpenAI):
    fake_openai.plans.append(Plan(tokens=[*words(" A noisy picture, @everyone."), ("<end_of_utterance>", True)],
                                  token_delay_s=0.02))
    settings = openai_settings(tmp_path, fake_openai.url)
    async with open_services(settings, allow_private_links=True) as services:
        assert isinstance(services.executor, OpenAIExecutor)
        assert services.model.name == MODEL_ID and services.model.instruct
        assert services.model.max_positions == MAX_MODEL_LEN  # the server's max_model_len
        async with run_bot(fake_discord, services) as running:
            world = fake_discord.world
            image = add_image_attachment(fake_discord, seed=3)
            asked = await fake_discord.send_message_as(world.member, world.general, "what is in this picture?",
                                                       attachments=[image], mentions_bot=True)
            answer = await answer_to(running, world.general, asked)
            assert answer.content == "A noisy picture, @everyone."
            assert answer.allowed_mentions == {"parse": []}
            window = await running.store.recent_window(str(world.general.id), 10)
            assert [(m.role, m.request_state) for m in window] == [("user", "answered"), ("assistant", None)]
            # The follow-up carries the history as turns.
            again = await fake_discord.send_message_as(world.member, world.general, "and the colours?",
                                                       mentions_bot=True)
            await answer_to(running, world.general, again)
    first, second = fake_openai.requests
    assert len(first.images) == 1 and first.images[0].size == (40, 30)
    assert [m["role"] for m in second.messages] == ["user", "assistant", "user"]
    assert second.messages[1]["content"] == "A noisy picture, @everyone."
    assert second.messages[2]["content"].endswith("and the colours?")
    assert first.body["max_tokens"] == 40 and first.body["stream"] is True


async def test_a_server_failure_reaches_the_user_briefly(tmp_path: Path, fake_discord: FakeDiscord,
                                                         fake_openai: FakeOpenAI):
    fake_openai.plans.append(Plan(status=400, error="This model's maximum context length is 4096 tokens",
                                  error_type="BadRequestError"))
    async with open_services(openai_settings(tmp_path, fake_openai.url), allow_private_links=True) as services:
        async with run_bot(fake_discord, services) as running:
            world = fake_discord.world
            asked = await fake_discord.send_message_as(world.member, world.general, "hello", mentions_bot=True)
            answer = await answer_to(running, world.general, asked)
            assert "too long for the model server" in answer.content
            stored = await running.store.get_message(str(asked.id))
            assert stored.request_state == "failed"
    assert len(fake_openai.requests) == 1


async def test_slash_commands_status_and_classify(tmp_path: Path, fake_discord: FakeDiscord,
                                                 fake_openai: FakeOpenAI):
    fake_openai.logprobs = {"cat": -0.1, "dog": -3.0}
    async with open_services(openai_settings(tmp_path, fake_openai.url), allow_private_links=True) as services:
        async with run_bot(fake_discord, services) as running:
            status = answered(await slash(running, "status"))
            assert "model: HuggingFaceM4/Idefics3-8B-Llama3" in status and "backend: openai" in status
            image = add_image_attachment(fake_discord, seed=6)
            ranked = answered(await slash(running, "classify", {"image": image, "categories": "dog, cat"}))
            assert ranked.startswith("1. cat — 95%\n2. dog — 5%") and RANKED_BY_GENERATION not in ranked
            caption = answered(await slash(running, "caption", {"image": add_image_attachment(fake_discord, seed=7)}))
            assert "This picture shows some noise." in caption


async def test_a_generated_ranking_says_so(tmp_path: Path):
    async with FakeOpenAI(flavour="openai") as fake:
        fake.default_plan = Plan(tokens=[*words(" cat"), ("</s>", True)])
        async with open_executor(openai_settings(tmp_path, fake.url)) as (executor, _info):
            ranked = await executor.rank(tasks.classify_prompt(noise_image(1), ["dog", "cat"]), ["dog", "cat"])
    shown = format_ranking(ranked, 5)
    assert shown.startswith("1. cat — 100%\n2. dog — 0%") and RANKED_BY_GENERATION in shown


async def test_openai_backend_needs_a_url(tmp_path: Path):
    with pytest.raises(ModelLoadError) as failed:
        async with open_executor(openai_settings(tmp_path, None)):
            pass
    assert "OPENAI_BASE_URL" in failed.value.user_message

"""Moving a community to another backend: the history and the settings of every channel live in the database, so
services reopened with `GENERATION_BACKEND=openai` over the same database answer from the same window, with the
same channel settings, as the in-process model did."""

from __future__ import annotations

from pathlib import Path

from bot.pipeline.services import open_services
from bot.settings import Settings
from model_server.neutralize import neutralize
from model_server.openai import OpenAIExecutor
from tests.bot.pipeline.test_pipeline import RecordingSink, message
from tests.fakes.openai_server import MODEL_ID, FakeOpenAI


def settings_for(tmp_path: Path, **values) -> Settings:
    base = dict(database_url=f"sqlite+aiosqlite:///{tmp_path / 'bot.sqlite3'}", max_new_tokens=12,
                tgi_start_wait_s=0.0)
    return Settings(_env_file=None, **{**base, **values})  # type: ignore[call-arg]


async def test_switching_to_the_openai_backend_keeps_history_and_settings(tmp_path: Path, tiny_model_path: Path):
    local = settings_for(tmp_path, generation_backend="local", idefics_model=str(tiny_model_path),
                         idefics_device="cpu")
    async with open_services(local) as services:
        store = services.database.store
        await store.update_channel_settings("c1", system_prompt="Answer like a pirate.", max_new_tokens=20)
        for pid, text, images in (("m1", "what is this?", (1,)), ("m2", "and the colours?", ())):
            sink = RecordingSink(f"answer-{pid}")
            await services.conversation.handle(message(pid, text, images=images), sink)
            assert sink.final is not None and not sink.failures
        before = [(m.role, m.text) for m in await store.recent_window("c1", 50)]
        settings_before = await store.channel_settings("c1")
    assert [role for role, _ in before] == ["user", "assistant", "user", "assistant"]

    async with FakeOpenAI() as fake_openai:
        await _answer_after_the_switch(tmp_path, fake_openai, before, settings_before)
        assert fake_openai.problems == []
    [got] = fake_openai.requests
    # The same window: the system prompt, both earlier exchanges (with the image), then the new message.
    assert [m["role"] for m in got.messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert got.messages[0]["content"] == "Answer like a pirate."
    # (The tiny model's random answers, as the prompt renderer places any stored text: neutralised.)
    shown = [neutralize(before[1][1]).strip(), neutralize(before[3][1]).strip()]
    assert [m["content"] for m in got.messages if m["role"] == "assistant"] == shown
    assert len(got.images) == 1 and got.body["max_tokens"] == 20


async def _answer_after_the_switch(tmp_path: Path, fake_openai: FakeOpenAI, before: list, settings_before) -> None:
    remote = settings_for(tmp_path, generation_backend="openai", openai_base_url=fake_openai.url,
                          openai_model=MODEL_ID)
    async with open_services(remote) as services:
        assert isinstance(services.executor, OpenAIExecutor)
        store = services.database.store
        assert [(m.role, m.text) for m in await store.recent_window("c1", 50)] == before
        assert await store.channel_settings("c1") == settings_before
        sink = RecordingSink("answer-m3")
        await services.conversation.handle(message("m3", "and now?"), sink)
        assert sink.final == "This picture shows some noise."

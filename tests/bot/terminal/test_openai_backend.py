"""The terminal commands through `GENERATION_BACKEND=openai`: `idefics-bot caption|ask|classify|story|fewshot|chat`
through their real entry point, answered by the fake OpenAI-compatible server (on its own thread: the commands run
their own event loop)."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.terminal.cli import main
from model_server.types import RANKED_BY_GENERATION
from tests.conftest import noise_image
from tests.fakes.openai_server import MODEL_ID, FakeOpenAI, serving_in_thread
from tests.fakes.tgi import Plan, words


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'bot.sqlite3'}")
    for name in ("IDEFICS_MODEL", "DISCORD_TOKEN", "SYSTEM_PROMPT", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    noise_image(1).save(tmp_path / "photo.png")
    noise_image(2).save(tmp_path / "photo2.png")
    with serving_in_thread() as fake:
        monkeypatch.setenv("GENERATION_BACKEND", "openai")
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
        monkeypatch.setenv("OPENAI_MODEL", MODEL_ID)
        yield fake
        assert fake.problems == []


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_caption_and_ask(server: FakeOpenAI, capsys):
    code, out, err = run(capsys, "caption", "photo.png")
    assert code == 0, err
    assert "This picture shows some noise." in out
    code, out, err = run(capsys, "ask", "photo.png", "What is in the picture?")
    assert code == 0, err
    assert out.strip() == "This picture shows some noise."
    caption, ask = server.requests
    assert len(caption.images) == 1 and len(ask.images) == 1
    assert ask.messages[0]["content"][-1]["text"].endswith("Question: What is in the picture? Answer:")


def test_classify_scored_and_by_generation(server: FakeOpenAI, capsys):
    server.logprobs = {"cars": -0.1, "animals": -2.5}
    code, out, err = run(capsys, "classify", "photo.png", "--categories", "animals, cars")
    assert code == 0, err
    assert out.splitlines()[0].startswith("cars") and RANKED_BY_GENERATION not in out
    server.flavour = "openai"  # now a server without prompt log-probabilities
    server.default_plan = Plan(tokens=[*words(" animals"), ("</s>", True)])
    code, out, err = run(capsys, "classify", "photo.png", "--categories", "animals, cars")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["animals", "100.0%"] and lines[-1] == f"({RANKED_BY_GENERATION})"


def test_story_and_fewshot(server: FakeOpenAI, capsys):
    code, out, err = run(capsys, "story", "photo.png", "photo2.png")
    assert code == 0, err
    assert out.strip()
    code, out, err = run(capsys, "fewshot", "photo.png", "--example", "photo2.png", "A noisy square.")
    assert code == 0, err
    story, fewshot = server.requests
    assert len(story.images) == 2 and story.body["temperature"] == 0.0  # beam runs greedy here
    assert [m["role"] for m in fewshot.messages] == ["user", "assistant", "user"]
    assert fewshot.messages[1]["content"] == "A noisy square."


def test_chat_keeps_history_across_runs(server: FakeOpenAI, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/image photo.png\nwhat is this?\n/quit\n"))
    code, out, err = run(capsys, "chat")
    assert code == 0, err
    assert out.count("This picture shows some noise.") == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO("and again?\n"))
    code, out, err = run(capsys, "chat")
    assert code == 0, err
    last = server.requests[-1]
    assert [m["role"] for m in last.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert last.messages[0]["content"] == "hello" and len(last.images) == 1

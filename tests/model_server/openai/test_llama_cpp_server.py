"""The OpenAI-compatible backend's text path against a real server: llama.cpp's, from `llama-cpp-python[server]`,
started here on loopback with a tiny random LLaMA written by `tests/fakes/tiny_gguf.py` (no download).

What this covers that the fake cannot: a real server's SSE framing, chunk shapes and `[DONE]`; its handling of
our request fields (`stream_options`, `stop`, `temperature: 0`, `seed`, `max_tokens`, the chat template applied to
system/user/assistant messages); stop strings and `max_tokens` stopping a real model; cancelling a stream
mid-answer (the server drops the request and serves the next); concurrent requests; ranking falling back to
generation on a server without `prompt_logprobs`; the bot's conversation pipeline storing real answers, and
`idefics-bot chat`.
Images, `prompt_logprobs` scoring and the failure modes (retries, stalls, cut streams) are the fake's.

`llama-cpp-python` compiles llama.cpp when installed (long on a small machine), so it is not a required test
dependency: without it these tests are skipped, saying why.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.pipeline.services import open_services
from bot.settings import Settings
from model_server import tasks
from model_server.openai import OpenAIExecutor
from model_server.prompt import render_chat
from model_server.types import ChatTurn, FinishReason, GenerationParams
from tests.bot.pipeline.test_pipeline import RecordingSink, message
from tests.conftest import noise_image
from tests.fakes.tiny_gguf import write_tiny_llama_gguf
from tests.model_server.openai.conftest import short_config

try:
    import llama_cpp.server  # noqa: F401
except ImportError:
    pytest.skip("llama-cpp-python[server] is not installed (pip install 'llama-cpp-python[server]'; it compiles "
                "llama.cpp): the real OpenAI-compatible server tests are skipped", allow_module_level=True)

MODEL_ALIAS = "tiny-random-llama"
START_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server's base URL (with `/v1`); the process is stopped after the module."""
    model = write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")
    port = _free_port()
    log = (tmp_path_factory.mktemp("llama-server") / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", MODEL_ALIAS,
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--n_threads", "2", "--verbose", "false",
         # Its default drops a streaming answer when the next request comes; the bot sends several at once.
         "--interrupt_requests", "false"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "no_proxy": "127.0.0.1"},
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise AssertionError(f"llama.cpp server exited with {process.returncode}: see {log.name}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"llama.cpp server not ready after {START_TIMEOUT_S:g}s: see {log.name}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


@pytest.fixture
async def real(llama_server: str) -> AsyncIterator[OpenAIExecutor]:
    async with OpenAIExecutor(short_config(llama_server, model="", stall_s=30.0, request_timeout_s=60.0)) as backend:
        yield backend


def conversation(max_new_tokens: int = 6, **params) -> object:
    turns = [ChatTurn("user", "hello there", "alice"), ChatTurn("assistant", "Hi! How can I help?"),
             ChatTurn("user", "name an animal", "alice")]
    return render_chat(turns, instruct=True, system_prompt="Be brief.",
                       params=GenerationParams(max_new_tokens=max_new_tokens, **params))


async def test_the_model_is_listed(real: OpenAIExecutor):
    assert real.server is not None and real.server.model_id == MODEL_ALIAS
    assert await real.health() is None


async def test_a_streamed_answer(real: OpenAIExecutor):
    handle = real.submit(conversation())
    deltas = [delta async for delta in handle]
    result = await handle.result()
    assert "".join(deltas) == result.text and "cat" in result.text
    assert result.finish_reason is FinishReason.LENGTH
    assert result.completion_tokens >= 1 and result.prompt_tokens >= 1 and result.first_token_s is not None


async def test_sampling_with_a_seed_repeats(real: OpenAIExecutor):
    prompt = conversation(decoding="sample", temperature=0.9, top_p=0.95, seed=11)
    first, second = await real.generate(prompt), await real.generate(prompt)
    assert first.text == second.text


async def test_stop_strings_end_the_answer_on_the_server_and_here(real: OpenAIExecutor):
    # The model writes " cat cat cat ...", so each stop string below matches right after the first space.
    by_server = await real.generate(conversation(max_new_tokens=20, stop_strings=("cat cat cat",)))
    assert by_server.text == "" and by_server.completion_tokens < 20
    # Past the four stop strings a server is sent, ours applies while the answer streams, and closes the stream.
    here = await real.generate(conversation(max_new_tokens=200, stop_strings=("<<a", "<<b", "<<c", "<<d", "cat cat")))
    assert here.text == "" and here.finish_reason is FinishReason.STOP_STRING and here.completion_tokens < 200
    assert "cat" in (await real.generate(conversation())).text


async def test_cancelling_mid_answer_frees_the_server(real: OpenAIExecutor):
    # As long an answer as the 512 positions allow: the tiny model writes hundreds of tokens a second, and a busy
    # machine may read the whole stream at once before the first delta reaches this loop.
    # Up to three tries: once in a while the whole stream is read before the cancel can land.
    reasons = []
    for _ in range(3):
        handle = real.submit(conversation(max_new_tokens=440))
        async for _delta in handle:
            handle.cancel()
            break
        reasons.append((await handle.result()).finish_reason)
        # Cancelled or not, the server serves the next request.
        assert (await asyncio.wait_for(real.generate(conversation()), 30)).finish_reason is FinishReason.LENGTH
        if reasons[-1] is FinishReason.CANCELLED:
            break
    assert reasons[-1] is FinishReason.CANCELLED, reasons


async def test_concurrent_requests_all_complete(real: OpenAIExecutor):
    results = await asyncio.gather(*(real.generate(conversation()) for _ in range(3)))
    assert all("cat" in r.text for r in results)
    assert real.stats().completed >= 3


async def test_rank_falls_back_to_the_models_answer(real: OpenAIExecutor):
    prompt = tasks.classify_prompt(noise_image(1), ["dog", "cat"])
    text_only = type(prompt)(items=tuple(i for i in prompt.items if isinstance(i, str)), params=prompt.params)
    ranked = await real.rank(text_only, ["dog", "cat"])
    assert ranked[0].category == "cat" and ranked[0].probability == 1.0
    assert all(r.by_generation for r in ranked) and real.ranker.prompt_logprobs is False


async def test_the_conversation_pipeline_stores_real_answers(llama_server: str, tmp_path: Path):
    settings = Settings(_env_file=None, database_url=f"sqlite+aiosqlite:///{tmp_path / 'bot.sqlite3'}",  # type: ignore[call-arg]
                        generation_backend="openai", openai_base_url=llama_server, max_new_tokens=5,
                        tgi_start_wait_s=0.0)
    async with open_services(settings) as services:
        assert services.model.name == MODEL_ALIAS and services.model.instruct
        for pid, text in (("m1", "hello"), ("m2", "and again")):
            sink = RecordingSink(f"answer-{pid}")
            await services.conversation.handle(message(pid, text), sink)
            assert sink.final and "cat" in sink.final and not sink.failures
        window = await services.database.store.recent_window("c1", 10)
    assert [m.role for m in window] == ["user", "assistant", "user", "assistant"]


def test_the_terminal_chat_through_the_real_server(llama_server: str, tmp_path: Path, monkeypatch, capsys):
    from bot.terminal.cli import main

    monkeypatch.chdir(tmp_path)
    for name, value in {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cli.sqlite3'}",
                        "GENERATION_BACKEND": "openai", "OPENAI_BASE_URL": llama_server, "MAX_NEW_TOKENS": "4"}.items():
        monkeypatch.setenv(name, value)
    for name in ("IDEFICS_MODEL", "DISCORD_TOKEN", "SYSTEM_PROMPT", "OPENAI_MODEL", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nwhat now?\n"))
    assert main(["chat"]) == 0
    out = capsys.readouterr().out
    assert out.count("cat") >= 2

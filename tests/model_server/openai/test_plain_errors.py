"""Refusals in plain text, as a proxy in front of an OpenAI-compatible server writes them (nginx's 413 for a body
over `client_max_body_size`): the reason reaches the log, and a 413 is final, never "try again"."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from model_server.errors import RequestRejected
from model_server.openai import OpenAIExecutor
from model_server.prompt import render_chat
from model_server.remote.http import INVALID_MESSAGE, TOO_LARGE_MESSAGE
from model_server.types import ChatTurn, GenerationParams, Prompt
from tests.fakes.openai_server import MODEL_ID
from tests.model_server.openai.conftest import short_config


class PlainTextServer:
    """`/models` as vLLM answers it; every chat request refused with `status` and a plain-text body."""

    def __init__(self, status: int, text: str) -> None:
        self.status, self.text = status, text
        self.chat_requests = 0

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]})

    async def chat(self, request: web.Request) -> web.Response:
        await request.read()
        self.chat_requests += 1
        return web.Response(status=self.status, text=self.text, content_type="text/plain")


@pytest.fixture
async def serve() -> AsyncIterator[object]:
    runners: list[web.AppRunner] = []

    async def start(server: PlainTextServer) -> str:
        app = web.Application()
        app.router.add_get("/v1/models", server.models)
        app.router.add_post("/v1/chat/completions", server.chat)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}/v1"

    yield start
    for runner in runners:
        await runner.cleanup()


def prompt() -> Prompt:
    return render_chat([ChatTurn("user", "hello", "alice")], instruct=True,
                       params=GenerationParams(max_new_tokens=8))


async def test_a_plain_text_413_keeps_its_reason_and_is_not_retried(serve):
    server = PlainTextServer(413, "<html><body><h1>413 Request Entity Too Large</h1></body></html>")
    async with OpenAIExecutor(short_config(await serve(server))) as backend:
        with pytest.raises(RequestRejected) as failed:
            await backend.generate(prompt())
    assert failed.value.user_message == TOO_LARGE_MESSAGE and "try again" not in failed.value.user_message
    assert "413 Request Entity Too Large" in failed.value.detail
    assert server.chat_requests == 1


async def test_a_plain_text_422_keeps_its_reason(serve):
    server = PlainTextServer(422, "Failed to deserialize the JSON body into the target type")
    async with OpenAIExecutor(short_config(await serve(server))) as backend:
        with pytest.raises(RequestRejected) as failed:
            await backend.generate(prompt())
    assert failed.value.user_message == INVALID_MESSAGE
    assert "Failed to deserialize the JSON body" in failed.value.detail and server.chat_requests == 1

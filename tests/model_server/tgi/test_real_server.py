"""The TGI backend against what the real server does (the fake's router and IDEFICS shard follow TGI's source):
prompts that begin with an image, links the shard's processor would fetch, padded prefill batches, length
limits, stop strings, plain-text errors and the shard's token count."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from bot.pipeline.conversation import IncomingMessage
from bot.pipeline.services import open_services
from model_server import tasks
from model_server.errors import RequestRejected
from model_server.prompt import prompt_text, render_chat
from model_server.tgi import TgiConfig, TgiExecutor
from model_server.types import ChatTurn, FinishReason, GenerationParams, Prompt
from tests.conftest import noise_image
from tests.fakes import tgi_shard
from tests.fakes.tgi import EOS, EOU, FakeTgi, Plan, words
from tests.model_server.tgi.test_bot import tgi_settings


def shard_ids(prompt: Prompt) -> list[int]:
    """The ids the local processor builds for `prompt` (the same tokenizer as the fake shard's)."""
    return [tgi_shard.BOS_ID, *tgi_shard.encode(prompt_text(prompt.items, bos=""))]


# -- prompts that begin with an image ------------------------------------------------------------------------


async def test_captions_begin_with_text_and_keep_their_tokens(tgi: TgiExecutor, fake_tgi: FakeTgi):
    fake_tgi.shard.window_s = 0.2  # both requests in one prefill batch, the caption first
    caption = tasks.caption(noise_image(1))
    prompted = tasks.prompted_caption(noise_image(2), "This is a picture of ")
    chat = render_chat([ChatTurn("user", "hi", "alice", (noise_image(3),))], instruct=True)
    results = await asyncio.gather(tgi.generate(caption), tgi.generate(prompted), tgi.generate(chat))
    assert all(r.text for r in results)
    assert fake_tgi.shard.failed_batches == []
    assert fake_tgi.shard.batches[0] >= 2
    got = {r.inputs.split("![]")[0]: r for r in fake_tgi.generation_requests()}
    assert " " in got  # the image-first prompts start with a space the processor strips
    for prompt in (caption, prompted, chat):
        [sent] = [r for r in fake_tgi.generation_requests() if r.images and r.shard_ids == shard_ids(prompt)]
        assert isinstance(sent.chunks[0], str)


# -- links the shard's processor would fetch ---------------------------------------------------------------


@pytest.mark.parametrize("link", ["http://127.0.0.1:8080/admin", "https://example.com/a.png", "file://x/y"])
async def test_a_link_after_an_image_is_never_fetched(tgi: TgiExecutor, fake_tgi: FakeTgi, link: str):
    turns = [ChatTurn("user", "", "alice", (noise_image(1),)), ChatTurn("user", link, "alice")]  # image, then a link
    prompt = render_chat(turns, instruct=True)
    result = await tgi.generate(prompt)
    assert result.text and fake_tgi.shard.fetched == [] and fake_tgi.shard.failed_batches == []
    [sent] = fake_tgi.generation_requests()
    assert not any(isinstance(c, str) and tgi_shard.is_url(c.strip(" ")) for c in sent.chunks)
    assert link.replace("//", "/\u200b/") in sent.inputs  # reads the same to a person


async def test_a_category_that_is_a_link_is_never_fetched(tgi: TgiExecutor, fake_tgi: FakeTgi):
    prompt = Prompt(items=("Which?", noise_image(1)))  # ends with an image: a category is a chunk of its own
    await tgi.rank(prompt, ["http://127.0.0.1/x", "cat"])
    assert fake_tgi.shard.fetched == [] and fake_tgi.shard.failed_batches == []


# -- rank classification under concurrency -----------------------------------------------------------------


async def test_concurrent_classifications_rank_as_each_alone(tgi: TgiExecutor, fake_tgi: FakeTgi):
    fake_tgi.logprobs = {"dog": -2.0, "cat": -0.2, "bird": -1.0, "city": -0.5, "landscape": -0.4}
    jobs = [["dog", "cat"], ["bird", "dog", "cat"], ["city landscape", "dog"]]
    prompts = [tasks.classify_prompt(noise_image(k), names) for k, names in enumerate(jobs)]
    alone = [[r.category for r in await tgi.rank(p, names)] for p, names in zip(prompts, jobs, strict=True)]
    assert alone == [["cat", "dog"], ["cat", "bird", "dog"], ["city landscape", "dog"]]
    assert fake_tgi.shard.padded_prefills == 0

    tgi.ranker = type(tgi.ranker)(tgi.client)  # nothing cached: every prompt is anchored again
    fake_tgi.shard.window_s = 0.2  # the three classifications share their prefill batches
    together = await asyncio.gather(*(tgi.rank(p, names) for p, names in zip(prompts, jobs, strict=True)))
    assert fake_tgi.shard.padded_prefills > 0  # shorter requests were padded, and TGI shifted their values
    assert [[r.category for r in ranked] for ranked in together] == alone
    assert [r.logprob for r in together[0]] == pytest.approx([-0.2, -2.0])
    assert [r.logprob for r in together[2]] == pytest.approx([-0.9, -2.0])
    assert tgi.ranker.shifted_answers > 0


# -- the prompt budget ---------------------------------------------------------------------------------------


async def test_the_budget_follows_tgis_limits_and_the_channels_answer_length(tmp_path: Path, fake_tgi: FakeTgi):
    digits = "".join(str(k % 10) for k in range(150))  # LLaMA splits every digit: counts are nearly exact
    settings = tgi_settings(tmp_path, fake_tgi.url, max_new_tokens=256)
    async with open_services(settings) as services:
        conversation, store = services.conversation, services.database.store
        await store.update_channel_settings("c1", max_new_tokens=32)
        for k in range(20):
            await conversation.record(IncomingMessage(f"m{k}", "c1", "u1", "alice", f"{k} {digits}"),
                                              request=False)
        request = await conversation.record(IncomingMessage("q", "c1", "u1", "alice", "and now?"),
                                                    request=True)
        assert request is not None
        prompt = await conversation.prompt_for(request)
        result = await services.executor.generate(prompt)
    assert result.text and fake_tgi.refusals == []
    [sent] = fake_tgi.generation_requests()
    assert sent.parameters["max_new_tokens"] == 32
    assert 1024 - 160 < len(sent.shard_ids) <= 1024  # the budget is used, exactly counted by TGI's /tokenize
    assert any(r.path == "/tokenize" for r in fake_tgi.received)


# -- stop strings --------------------------------------------------------------------------------------------


async def test_a_task_answer_never_ends_with_the_chat_stop(tgi: TgiExecutor, fake_tgi: FakeTgi):
    # A task stops where the local engine stops: at its own stop strings, which are withheld.
    fake_tgi.plans.append(Plan(tokens=[*words(" A red bus.\nUser: and more\nQuestion: next"), EOS]))
    handle = tgi.submit(tasks.vqa(noise_image(1), "What is it?"))
    deltas = [d async for d in handle]
    result = await handle.result()
    assert result.text == "".join(deltas) == "A red bus.\nUser: and more"
    assert result.finish_reason is FinishReason.STOP_STRING
    sent = fake_tgi.generation_requests()[0].parameters["stop"]
    assert sent == ["<end_of_utterance>", "\nQuestion:", "\nInstruction:"]


async def test_a_space_before_a_stop_string_is_never_streamed(tgi: TgiExecutor, fake_tgi: FakeTgi):
    fake_tgi.plans.append(Plan(tokens=[*words(" A red bus."), (" ", False), ("\n", False), *words("User: more"), EOU]))
    prompt = render_chat([ChatTurn("user", "what?", "alice", (noise_image(1),))], instruct=True)
    handle = tgi.submit(prompt)
    deltas = [d async for d in handle]
    result = await handle.result()
    assert result.text == "".join(deltas) == "A red bus."
    assert result.finish_reason is FinishReason.STOP_STRING


# -- errors and counts ---------------------------------------------------------------------------------------


async def test_a_413_keeps_its_reason_and_is_not_try_again(fake_tgi: FakeTgi, tgi_config: TgiConfig,
                                                           caplog: pytest.LogCaptureFixture):
    config = TgiConfig(**{**tgi_config.__dict__, "max_body_bytes": 10_000_000})
    async with TgiExecutor(config) as tgi:
        with caplog.at_level(logging.WARNING, logger="model_server.tgi"), pytest.raises(RequestRejected) as failed:
            await tgi.generate(Prompt(items=("x" * 2_100_000,), params=GenerationParams(max_new_tokens=8)))
    assert "too large" in failed.value.user_message and "try again" not in failed.value.user_message
    assert "length limit exceeded" in failed.value.detail
    assert "length limit exceeded" in caplog.text
    assert len(fake_tgi.generation_requests()) == 1  # not retried
    fake_tgi.problems.clear()  # the oversized body was the point


async def test_a_plain_text_422_keeps_its_reason(tgi: TgiExecutor, fake_tgi: FakeTgi):
    async with tgi.client.session.post(fake_tgi.url + "/generate", data=b'{"inputs": 5}',
                                       headers={"Content-Type": "application/json"}) as response:
        error, error_type = await tgi.client.error_of(response)
        failed = tgi.client.rejection_for(response.status, error, error_type)
    assert isinstance(failed, RequestRejected)
    assert "Failed to deserialize the JSON body" in failed.detail
    fake_tgi.problems.clear()


async def test_prompt_tokens_count_what_the_shard_builds(tgi: TgiExecutor, fake_tgi: FakeTgi):
    turns = [ChatTurn("user", "two pictures", "alice", (noise_image(1), noise_image(2))),
             ChatTurn("assistant", "Both noise.", "bot"), ChatTurn("user", "and this?", "alice", (noise_image(3),))]
    for prompt in (render_chat(turns, instruct=True), tasks.caption(noise_image(4))):
        result = await tgi.generate(prompt)
        sent = fake_tgi.generation_requests()[-1]
        assert result.prompt_tokens == len(sent.shard_ids) == len(shard_ids(prompt))
        assert sent.input_length != result.prompt_tokens  # the router counts one token an image

"""`TgiExecutor` against the loopback fake TGI: streaming, parameters, finish reasons, images, rank, faults."""

from __future__ import annotations

import asyncio
import math
import re

import pytest

from model_server import tasks
from model_server.errors import Busy, ExecutorClosed, GenerationFailed, ModelLoadError, RequestRejected, RequestTimeout
from model_server.prompt import CHAT_STOP, END_OF_UTTERANCE, prompt_text, render_chat
from model_server.remote.http import CUT_MESSAGE, OVERLOADED_MESSAGE, TOO_LONG_MESSAGE
from model_server.tgi import TgiConfig, TgiExecutor
from model_server.types import ChatTurn, FinishReason, GenerationParams, Prompt
from tests.conftest import noise_image
from tests.fakes.tgi import EOS, EOU, FakeTgi, Plan, words


def chat(text: str = "what is this?", n_images: int = 1, size: tuple[int, int] = (40, 30),
         **params) -> Prompt:
    images = tuple(noise_image(k, size) for k in range(n_images))
    return render_chat([ChatTurn("user", text, "alice", images)], instruct=True,
                       params=GenerationParams(**{"max_new_tokens": 32, **params}))


async def collect(tgi: TgiExecutor, prompt: Prompt, **kwargs) -> tuple[list[str], object]:
    handle = tgi.submit(prompt, **kwargs)
    deltas = [delta async for delta in handle]
    return deltas, await handle.result()


# -- streaming and mapping ------------------------------------------------------------------------


async def test_streamed_answer_and_the_request_tgi_gets(tgi: TgiExecutor, fake_tgi: FakeTgi):
    prompt = chat(n_images=1)
    deltas, result = await collect(tgi, prompt)
    assert "".join(deltas) == result.text == "This picture shows some noise."
    assert len(deltas) > 1
    assert result.finish_reason is FinishReason.END_OF_UTTERANCE
    assert result.completion_tokens == 6 and result.prompt_tokens > 0 and result.batch_size == 1
    [got] = fake_tgi.generation_requests()
    assert got.path == "/generate_stream"
    assert got.parameters == {"max_new_tokens": 32, "stop": [END_OF_UTTERANCE, CHAT_STOP], "details": True,
                              "do_sample": False}
    # The same text as the local processor reads, without BOS, with the image inline.
    expected = prompt_text(prompt.items, bos="").replace("<fake_token_around_image><image><fake_token_around_image>",
                                                         "IMAGE")
    assert got.inputs.startswith("User:![](data:image/jpeg;base64,")
    assert re.sub(r"!\[\]\(data:image/jpeg;base64,[A-Za-z0-9+/=]+\)", "IMAGE", got.inputs) == expected
    assert len(got.images) == 1 and got.images[0].size == (40, 30)
    assert tgi.stats().completed == 1 and len(tgi.batches) == 1 and tgi.batches[0].size == 1


@pytest.mark.parametrize(("script", "max_new", "reason", "text"), [
    ([*words(" A dog."), EOS], 32, FinishReason.END_OF_UTTERANCE, "A dog."),
    ([*words(" A dog."), EOU], 32, FinishReason.END_OF_UTTERANCE, "A dog."),
    ([*words(" A dog.\nUser: and"), EOS], 32, FinishReason.STOP_STRING, "A dog."),
    ([*words(" one two three four five"), EOS], 3, FinishReason.LENGTH, "one two three"),
])
async def test_finish_reasons_are_mapped_and_stop_text_removed(tgi: TgiExecutor, fake_tgi: FakeTgi, script, max_new,
                                                                reason, text):
    fake_tgi.plans.append(Plan(tokens=script))
    deltas, result = await collect(tgi, chat(max_new_tokens=max_new))
    assert result.finish_reason is reason
    assert result.text == "".join(deltas) == text


async def test_sampling_parameters_are_mapped(tgi: TgiExecutor, fake_tgi: FakeTgi):
    await tgi.generate(chat(decoding="sample", temperature=0.5, top_p=0.8, seed=7, repetition_penalty=1.2,
                            max_new_tokens=20))
    await tgi.generate(chat(decoding="sample", top_p=1.0))
    await tgi.generate(chat(decoding="beam", num_beams=2))
    sample, full_p, beam = (r.parameters for r in fake_tgi.generation_requests())
    assert sample == {"max_new_tokens": 20, "stop": [END_OF_UTTERANCE, CHAT_STOP], "details": True,
                      "do_sample": True, "temperature": 0.5, "top_p": 0.8, "repetition_penalty": 1.2, "seed": 7}
    assert "top_p" not in full_p  # TGI refuses 1.0; leaving it out means no nucleus cut
    assert beam["do_sample"] is False and "num_beams" not in beam and "best_of" not in beam


async def test_stop_strings_past_tgis_limit_are_applied_here_and_close_the_stream(tgi: TgiExecutor,
                                                                                  fake_tgi: FakeTgi):
    fake_tgi.plans.append(Plan(tokens=[*words(" Once upon a time. THE END and more words"), EOS],
                               token_delay_s=0.01))
    prompt = chat(stop_strings=("Q:", "Answer:", "THE END"))
    deltas, result = await collect(tgi, prompt)
    [got] = fake_tgi.generation_requests()
    assert got.parameters["stop"] == [END_OF_UTTERANCE, CHAT_STOP, "Q:", "Answer:"]  # TGI allows 4
    assert result.finish_reason is FinishReason.STOP_STRING
    assert result.text == "".join(deltas) and result.text.strip() == "Once upon a time."
    await fake_tgi.wait_for(lambda: got.stream_closed_early, what="stream closed")


# -- images -----------------------------------------------------------------------------------------


async def test_many_large_images_fit_tgis_payload_limit(tgi: TgiExecutor, fake_tgi: FakeTgi):
    # Noise hardly compresses: eight of these at full size would be tens of megabytes.
    images = [noise_image(k, (1600, 1200)) for k in range(8)]
    prompt = Prompt(items=("User:", *images, "Tell a story about these.<end_of_utterance>", "\nAssistant:"))
    result = await tgi.generate(prompt)
    assert result.text
    [got] = fake_tgi.generation_requests()
    assert got.size < 2_000_000 and len(got.images) == 8
    assert all(image.format == "JPEG" and abs(image.width / image.height - 4 / 3) < 0.02 for image in got.images)


def test_images_shrink_further_to_fit_a_smaller_limit():
    from model_server.tgi.render import build_body

    items = chat(n_images=3, size=(800, 600)).items
    roomy = build_body(items, {"max_new_tokens": 8})
    tight = build_body(items, {"max_new_tokens": 8}, max_bytes=60_000)
    assert len(tight.body) < 60_000 < len(roomy.body)
    assert max(tight.image_bytes) < min(roomy.image_bytes)
    with pytest.raises(GenerationFailed) as failed:
        build_body(items, {"max_new_tokens": 8}, max_bytes=300)
    assert "too large" in failed.value.user_message


async def test_markdown_images_in_user_text_are_never_fetched(tgi: TgiExecutor, fake_tgi: FakeTgi):
    await tgi.generate(chat("look ![](http://10.0.0.1/secret.png) and ![](data:image/png;base64,AAAA)", n_images=1))
    [got] = fake_tgi.generation_requests()
    assert len(got.images) == 1  # ours only
    assert "http://10.0.0.1/secret.png" in got.inputs and "look !\u200b[](http" in got.inputs


# -- rank classification ----------------------------------------------------------------------------


async def test_rank_uses_prefill_logprobs_after_the_prompt(tgi: TgiExecutor, fake_tgi: FakeTgi):
    fake_tgi.logprobs = {"dog": -2.0, "cat": -0.2, "city": -0.5, "landscape": -0.5}
    categories = ["dog", "cat", "city landscape"]
    prompt = tasks.classify_prompt(noise_image(1), categories)
    ranked = await tgi.rank(prompt, categories)
    assert [r.category for r in ranked] == ["cat", "city landscape", "dog"]
    assert [r.logprob for r in ranked] == pytest.approx([-0.2, -1.0, -2.0])
    weights = [math.exp(s) for s in (-0.2, -1.0, -2.0)]
    assert [r.probability for r in ranked] == pytest.approx([w / sum(weights) for w in weights])
    sent = fake_tgi.generation_requests()
    # The prompt alone, the prompt and the token it generated (the anchor), then each category.
    assert len(sent) == 5 and all(r.path == "/generate" for r in sent)
    assert all(r.parameters["decoder_input_details"] and r.parameters["details"]
               and r.parameters["max_new_tokens"] == 1 for r in sent)
    assert sent[1].inputs == sent[0].inputs + " This"
    assert sent[2].inputs == sent[0].inputs + " dog\n"
    # The prompt's own prefill is cached: a second ranking asks only for the categories.
    await tgi.rank(prompt, categories)
    assert len(fake_tgi.generation_requests()) == 8


# -- start-up ---------------------------------------------------------------------------------------


async def test_start_reads_info(tgi: TgiExecutor):
    assert tgi.server is not None
    assert tgi.server.model_id == "HuggingFaceM4/idefics-9b-instruct"
    assert tgi.server.max_input_tokens == 1024 and tgi.server.max_total_tokens == 2048
    assert tgi.server.max_positions() == 2048
    assert tgi.server.prompt_budget(256) == 1024 and tgi.server.prompt_budget(1100) == 2048 - 1100


async def test_unhealthy_server_is_a_clear_error(fake_tgi: FakeTgi, tgi_config: TgiConfig):
    fake_tgi.healthy = False
    with pytest.raises(ModelLoadError) as failed:
        async with TgiExecutor(tgi_config):
            pass
    assert f"text-generation-inference at {fake_tgi.url} is not reachable / not ready" in failed.value.user_message


async def test_unreachable_server_is_a_clear_error(tgi_config: TgiConfig):
    import dataclasses
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = dataclasses.replace(tgi_config, url=f"http://127.0.0.1:{port}", start_wait_s=0.3)
    with pytest.raises(ModelLoadError) as failed:
        async with TgiExecutor(config):
            pass
    assert "is not reachable / not ready" in failed.value.user_message


# -- errors and retries -----------------------------------------------------------------------------


async def test_422_is_a_clear_message_and_not_retried(tgi: TgiExecutor, fake_tgi: FakeTgi):
    fake_tgi.plans.append(Plan(status=422, error_type="validation",
                               error="Input validation error: `inputs` tokens + `max_new_tokens` must be <= 2048. "
                                     "Given: 1900 `inputs` tokens and 256 `max_new_tokens`"))
    with pytest.raises(RequestRejected) as failed:
        await tgi.generate(chat())
    assert failed.value.user_message == TOO_LONG_MESSAGE
    assert len(fake_tgi.generation_requests()) == 1
    assert tgi.stats().failed == 1


async def test_429_is_retried_after_retry_after(tgi: TgiExecutor, fake_tgi: FakeTgi):
    fake_tgi.plans.append(Plan(status=429, error="Model is overloaded", error_type="overloaded", retry_after="1"))
    result = await tgi.generate(chat())
    assert result.text == "This picture shows some noise."
    first, second = fake_tgi.generation_requests()
    assert second.at - first.at >= 0.95


async def test_503_is_retried(tgi: TgiExecutor, fake_tgi: FakeTgi):
    fake_tgi.plans.append(Plan(status=503, error="not ready", error_type="unhealthy"))
    result = await tgi.generate(chat())
    assert result.finish_reason is FinishReason.END_OF_UTTERANCE
    assert len(fake_tgi.generation_requests()) == 2


async def test_retries_are_bounded(tgi: TgiExecutor, fake_tgi: FakeTgi):
    fake_tgi.plans.extend(Plan(status=429, error="Model is overloaded", error_type="overloaded") for _ in range(5))
    with pytest.raises(GenerationFailed) as failed:
        await tgi.generate(chat())
    assert failed.value.user_message == OVERLOADED_MESSAGE
    assert len(fake_tgi.generation_requests()) == 3  # max_retries=2


async def test_connection_cut_before_any_token_is_retried(tgi: TgiExecutor, fake_tgi: FakeTgi):
    fake_tgi.plans.append(Plan(cut_after=0))
    result = await tgi.generate(chat())
    assert result.text == "This picture shows some noise."
    assert len(fake_tgi.generation_requests()) == 2


async def test_connection_cut_mid_stream_fails_clearly_without_retry(tgi: TgiExecutor, fake_tgi: FakeTgi):
    fake_tgi.plans.append(Plan(cut_after=3))
    handle = tgi.submit(chat())
    deltas = [d async for d in handle]
    with pytest.raises(GenerationFailed) as failed:
        await handle.result()
    assert failed.value.user_message == CUT_MESSAGE
    assert "".join(deltas) == "This picture shows"
    assert len(fake_tgi.generation_requests()) == 1


async def test_error_event_mid_stream_fails(tgi: TgiExecutor, fake_tgi: FakeTgi):
    fake_tgi.plans.append(Plan(error_event_after=2))
    with pytest.raises(GenerationFailed) as failed:
        await tgi.generate(chat())
    assert "model server" in failed.value.user_message
    assert len(fake_tgi.generation_requests()) == 1


async def test_overloaded_error_event_before_any_token_is_retried(tgi: TgiExecutor, fake_tgi: FakeTgi):
    fake_tgi.plans.append(Plan(error_event_after=0, error_event_type="overloaded",
                               error_event_text="Model is overloaded"))
    result = await tgi.generate(chat())
    assert result.text == "This picture shows some noise."
    assert len(fake_tgi.generation_requests()) == 2


async def test_validation_error_event_is_a_clear_message_without_retry(tgi: TgiExecutor, fake_tgi: FakeTgi):
    fake_tgi.plans.append(Plan(error_event_after=0, error_event_type="validation",
                               error_event_text="Input validation error: `inputs` must have less than 1024 tokens. "
                                                "Given: 1500"))
    with pytest.raises(RequestRejected) as failed:
        await tgi.generate(chat())
    assert failed.value.user_message == TOO_LONG_MESSAGE
    assert len(fake_tgi.generation_requests()) == 1
    assert tgi.stats().errors["rejected"] == 1


async def test_a_stalled_stream_times_out_despite_keepalives(tgi: TgiExecutor, fake_tgi: FakeTgi):
    fake_tgi.plans.append(Plan(stall_after=2))
    handle = tgi.submit(chat())
    started = asyncio.get_running_loop().time()
    deltas = [d async for d in handle]
    with pytest.raises(RequestTimeout) as failed:
        await handle.result()
    assert 0.4 < asyncio.get_running_loop().time() - started < 3.0  # stall_s=0.5
    assert "stopped answering" in failed.value.user_message
    assert "".join(deltas) == "This picture"
    assert len(fake_tgi.generation_requests()) == 1
    await fake_tgi.wait_for(lambda: fake_tgi.streams_open == 0, what="stalled stream closed")


async def test_deadline_mid_stream_keeps_the_text_so_far(tgi: TgiExecutor, fake_tgi: FakeTgi):
    fake_tgi.plans.append(Plan(tokens=[*words(" slow" * 40), EOS], token_delay_s=0.05))
    result = await tgi.generate(chat(), timeout_s=0.4)
    assert result.finish_reason is FinishReason.TIMEOUT
    assert result.text.startswith("slow slow")


# -- SSE framing ------------------------------------------------------------------------------------


async def test_events_split_anywhere_across_chunks(tgi: TgiExecutor, fake_tgi: FakeTgi):
    fake_tgi.plans.append(Plan(tokens=[*words(" Un café 🙂 au lait,\nmerci."), EOS], chunk_bytes=7, keepalives=True))
    deltas, result = await collect(tgi, chat())
    assert result.text == "".join(deltas) == "Un café 🙂 au lait,\nmerci."
    assert result.finish_reason is FinishReason.END_OF_UTTERANCE


def test_sse_parser_framing():
    from model_server.remote.sse import SseParser

    stream = (b": hello\r\ndata: {\"a\": 1}\r\n\r\ndata:line one\ndata: line two\nid: 3\n\n"
              b"event: x\rdata: caf\xc3\xa9\r\r: only a comment\n\ndata: unfinished")
    expected = ['{"a": 1}', "line one\nline two", "café"]
    for size in (1, 2, 3, 5, len(stream)):
        parser = SseParser()
        events = []
        for start in range(0, len(stream), size):
            events += parser.feed(stream[start:start + size])
        assert events == expected, size
        assert parser.comments == 2


# -- queue, cancellation, closing -------------------------------------------------------------------


async def test_busy_past_the_queue_bound(fake_tgi: FakeTgi, tgi_config: TgiConfig):
    import dataclasses

    fake_tgi.default_plan = Plan(tokens=[*words(" slow " * 100), EOS], token_delay_s=0.05)
    config = dataclasses.replace(tgi_config, max_batch_size=1, max_queue=2)
    async with TgiExecutor(config) as tgi:
        running = tgi.submit(chat())
        assert await running.wait_started(1.0)
        queued = [tgi.submit(chat()), tgi.submit(chat())]
        assert [h.ahead() for h in queued] == [0, 1]
        assert not await queued[0].wait_started(0.1)
        with pytest.raises(Busy):
            tgi.submit(chat())
        stats = tgi.stats()
        assert (stats.queue_length, stats.running) == (2, 1)
        queued[0].cancel()
        assert (await queued[0].result()).finish_reason is FinishReason.CANCELLED
        await tgi.close()
        assert (await running.result()).finish_reason is FinishReason.CANCELLED
        with pytest.raises(ExecutorClosed):
            await queued[1].result()
        with pytest.raises(ExecutorClosed):
            tgi.submit(chat())


async def test_cancel_closes_the_stream(tgi: TgiExecutor, fake_tgi: FakeTgi):
    fake_tgi.plans.append(Plan(tokens=[*words(" word " * 100), EOS], token_delay_s=0.05))
    handle = tgi.submit(chat())
    async for _delta in handle:
        handle.cancel()
    result = await handle.result()
    assert result.finish_reason is FinishReason.CANCELLED and result.text.startswith("word")
    [got] = fake_tgi.generation_requests()
    await fake_tgi.wait_for(lambda: got.stream_closed_early, what="stream closed by the client")
    assert fake_tgi.streams_open == 0


async def test_requests_run_concurrently_up_to_the_batch_size(tgi: TgiExecutor, fake_tgi: FakeTgi):
    fake_tgi.default_plan = Plan(tokens=[*words(" a b c"), EOS], token_delay_s=0.1)
    results = await asyncio.gather(*(tgi.generate(chat()) for _ in range(6)))
    assert all(r.text == "a b c" for r in results)
    assert fake_tgi.max_streams_open == 4  # max_batch_size: TGI batches them, we only bound them
    assert sorted(r.queued_s > 0.2 for r in results) == [False] * 4 + [True] * 2
    stats = tgi.stats()
    assert (stats.completed, stats.batches, stats.queue_length, stats.running) == (6, 6, 0, 0)


async def test_an_unreachable_server_fails_requests_and_shows_a_fault(tgi_config: TgiConfig):
    import dataclasses

    async with FakeTgi() as fake:
        config = dataclasses.replace(tgi_config, url=fake.url)
        async with TgiExecutor(config) as tgi:
            await fake.stop()
            with pytest.raises(GenerationFailed) as failed:
                await tgi.generate(chat())
            assert "cannot be reached" in failed.value.user_message
            stats = tgi.stats()
            assert stats.errors["unavailable"] == 1
            assert stats.fault is not None and "text-generation-inference unavailable" in stats.fault

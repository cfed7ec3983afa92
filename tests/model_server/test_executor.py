"""The executor on the tiny IDEFICS: batching, streaming, stopping, queue bounds and faults."""

from __future__ import annotations

import asyncio

import pytest
import torch

from model_server.config import ModelConfig
from model_server.errors import Busy, GenerationFailed, RequestTimeout
from model_server.executor import Executor
from model_server.prompt import render_chat
from model_server.types import ChatTurn, FinishReason, GenerationParams, Prompt
from tests.conftest import noise_image
from tests.fakes.faults import stuck_forward


def chat(text: str, n_images: int, image_seed: int = 0, max_new_tokens: int = 16, **params) -> Prompt:
    images = tuple(noise_image(image_seed * 10 + k) for k in range(n_images))
    return render_chat([ChatTurn("user", text, "alice", images)], instruct=True,
                       params=GenerationParams(max_new_tokens=max_new_tokens, **params))


PROMPTS = [chat("hello there", 0, 1), chat("what is this?", 1, 2), chat("compare these two", 2, 3),
           chat("and this one", 1, 4), chat("no picture at all, a longer question here", 0, 5)]


async def test_batched_greedy_equals_one_by_one(executor: Executor):
    singles = [await executor.generate(p) for p in PROMPTS]
    assert all(r.batch_size == 1 for r in singles)
    batched = await asyncio.gather(*(executor.generate(p) for p in PROMPTS))
    assert [r.batch_size for r in batched] == [len(PROMPTS)] * len(PROMPTS)
    assert [r.text for r in batched] == [r.text for r in singles]
    assert [r.completion_tokens for r in batched] == [r.completion_tokens for r in singles]
    # Images matter: the same text with another picture gives another answer.
    other = await executor.generate(chat("what is this?", 1, 9))
    assert other.text != singles[1].text


async def test_decode_loop_matches_model_generate(executor: Executor, loaded_model):
    """Our loop and the guide's `model.generate` pick the same greedy tokens."""
    from model_server.encoding import encode

    prompt = PROMPTS[1]
    ours = await executor.generate(prompt)
    enc = encode(loaded_model.processor, [prompt])
    out = loaded_model.model.generate(
        input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=enc.pixel_values,
        image_attention_mask=enc.image_attention_mask, max_new_tokens=16, do_sample=False,
        bad_words_ids=loaded_model.bad_words_ids, eos_token_id=list(loaded_model.stop_token_ids),
        pad_token_id=loaded_model.tokenizer.pad_token_id,
    )
    theirs = loaded_model.tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert ours.text == theirs.strip()


async def test_stream_deltas_concatenate_to_the_result(executor: Executor):
    handle = executor.submit(PROMPTS[2])
    deltas = [d async for d in handle]
    result = await handle.result()
    assert len(deltas) > 1
    assert "".join(deltas) == result.text
    assert result.finish_reason in (FinishReason.LENGTH, FinishReason.END_OF_UTTERANCE, FinishReason.STOP_STRING)
    assert result.prompt_tokens > 0 and result.first_token_s is not None and result.total_s >= result.queued_s


async def test_cancelled_row_frees_its_slot(executor: Executor):
    long = executor.submit(chat("go on forever", 1, 6, max_new_tokens=400))
    short = executor.submit(chat("short one", 0, 7, max_new_tokens=8))
    async for _ in long:
        long.cancel()
        break
    cancelled = await long.result()
    assert cancelled.finish_reason is FinishReason.CANCELLED
    assert cancelled.completion_tokens < 400
    assert (await short.result()).finish_reason in (FinishReason.LENGTH, FinishReason.END_OF_UTTERANCE)


async def test_cancel_while_waiting(engine, model_config):
    with stuck_forward(engine) as gate:
        async with Executor(engine, model_config, batch_window_s=0) as ex:
            first = ex.submit(PROMPTS[0])
            await asyncio.sleep(0.1)
            queued = ex.submit(PROMPTS[1].__class__(PROMPTS[1].items, GenerationParams(decoding="sample")))
            assert queued.ahead() == 0 and ex.stats().queue_length == 1
            queued.cancel()
            assert (await queued.result()).finish_reason is FinishReason.CANCELLED
            gate.set()
            assert (await first.result()).completion_tokens > 0


async def test_busy_past_the_queue_bound(engine, model_config):
    config = ModelConfig(model=model_config.model, max_batch_size=1, max_queue=2)
    with stuck_forward(engine) as gate:
        async with Executor(engine, config, batch_window_s=0) as ex:
            running = ex.submit(PROMPTS[0])
            await asyncio.sleep(0.1)
            waiting = [ex.submit(PROMPTS[1]), ex.submit(PROMPTS[2])]
            assert [h.ahead() for h in waiting] == [0, 1]
            with pytest.raises(Busy) as refused:
                ex.submit(PROMPTS[3])
            assert refused.value.queue_length == 2
            assert "busy" in refused.value.user_message
            gate.set()
            for handle in [running, *waiting]:
                assert (await handle.result()).completion_tokens > 0


async def test_out_of_memory_splits_the_batch(engine, model_config):
    original = engine.forward
    sizes: list[int] = []

    def oom_when_large(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(**kwargs)

    async with Executor(engine, model_config, batch_window_s=0.05) as ex:
        expected = [(await ex.generate(p)).text for p in PROMPTS[:4]]
        engine.forward = oom_when_large
        try:
            results = await asyncio.gather(*(ex.generate(p) for p in PROMPTS[:4]))
        finally:
            engine.forward = original
        assert [r.text for r in results] == expected
        assert max(sizes) == 4 and 2 in sizes


async def test_single_request_that_fails_gets_an_error_and_the_executor_keeps_serving(engine, model_config):
    original = engine.forward

    def always_oom(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    async with Executor(engine, model_config) as ex:
        engine.forward = always_oom
        try:
            with pytest.raises(GenerationFailed) as failed:
                await ex.generate(PROMPTS[0])
        finally:
            engine.forward = original
        assert "out of memory" in failed.value.user_message
        assert (await ex.generate(PROMPTS[0])).completion_tokens > 0


async def test_a_poisonous_request_fails_alone(engine, model_config):
    original = engine.forward

    def fail_on_two_images(**kwargs):
        if "perceiver_embeddings" in kwargs and kwargs["input_ids"].shape[1] > 1:
            images = kwargs["image_attention_mask"].shape[-1]
            if images == 2:
                raise RuntimeError("boom")
        return original(**kwargs)

    async with Executor(engine, model_config, batch_window_s=0.05) as ex:
        engine.forward = fail_on_two_images
        try:
            outcomes = await asyncio.gather(*(ex.generate(p) for p in PROMPTS[:3]),
                                            return_exceptions=True)
        finally:
            engine.forward = original
    assert isinstance(outcomes[2], GenerationFailed)
    assert all(not isinstance(o, Exception) for o in outcomes[:2])


async def test_timeout(executor: Executor):
    result = await executor.generate(chat("long", 1, 8, max_new_tokens=1000), timeout_s=0.3)
    assert result.finish_reason is FinishReason.TIMEOUT


async def test_expired_in_queue(engine, model_config):
    config = ModelConfig(model=model_config.model, max_batch_size=1)
    with stuck_forward(engine) as gate:
        async with Executor(engine, config, batch_window_s=0) as ex:
            first = ex.submit(PROMPTS[0])
            await asyncio.sleep(0.05)
            late = ex.submit(PROMPTS[1], timeout_s=0.1)
            await asyncio.sleep(0.2)
            gate.set()
            await first.result()
            with pytest.raises(RequestTimeout):
                await late.result()


async def test_sampling_with_a_seed_is_repeatable(executor: Executor):
    prompt = chat("tell me", 1, 3, max_new_tokens=12, decoding="sample", temperature=1.0, seed=42)
    a, b = await asyncio.gather(executor.generate(prompt), executor.generate(prompt))
    assert a.text == b.text
    assert a.batch_size == 2


async def test_story_uses_beam_search(executor: Executor):
    from model_server import tasks

    prompt = tasks.story([noise_image(1)])
    assert prompt.params.num_beams == 2 and prompt.params.max_new_tokens == 200
    result = await executor.generate(prompt)
    assert result.completion_tokens > 0
    assert result.finish_reason in (FinishReason.LENGTH, FinishReason.END_OF_UTTERANCE, FinishReason.STOP_STRING)


async def test_rank_classification(executor: Executor, loaded_model):
    from model_server import tasks

    categories = ["animals", "vegetables", "city landscape", "cars", "office"]
    prompt = tasks.classify_prompt(noise_image(1), categories)
    ranked = await executor.rank(prompt, categories)
    assert sorted(r.category for r in ranked) == sorted(categories)
    assert abs(sum(r.probability for r in ranked) - 1.0) < 1e-6
    assert [r.probability for r in ranked] == sorted((r.probability for r in ranked), reverse=True)
    # The score of one category equals the log-likelihood computed by hand from one forward pass.
    from model_server.encoding import encode_texts
    from model_server.prompt import prompt_text

    base = prompt_text(prompt.items, bos=loaded_model.tokenizer.bos_token)
    best = ranked[0]
    enc = encode_texts(loaded_model.processor, [base + " " + best.category], [prompt.images])
    base_len = len(loaded_model.tokenizer(base, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logits = loaded_model.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                    pixel_values=enc.pixel_values,
                                    image_attention_mask=enc.image_attention_mask).logits
    logprobs = torch.log_softmax(logits[0].float(), dim=-1)
    ids = enc.input_ids[0].tolist()
    by_hand = sum(float(logprobs[k - 1, ids[k]]) for k in range(base_len, len(ids)))
    assert best.logprob == pytest.approx(by_hand, abs=1e-3)
    # Another picture ranks differently.
    other = await executor.rank(tasks.classify_prompt(noise_image(2), categories), categories)
    assert [r.logprob for r in other] != [r.logprob for r in ranked]


async def test_base_checkpoint_stops_on_eos_only(tiny_base_model_path):
    from model_server.engine import LocalEngine
    from model_server.loading import load_model

    config = ModelConfig(model=str(tiny_base_model_path), device="cpu")
    loaded = load_model(config, progress=lambda line: None)
    assert not loaded.instruct
    assert loaded.stop_token_ids == (loaded.tokenizer.eos_token_id,)
    prompt = render_chat([ChatTurn("user", "hi", "bob")], instruct=False, params=GenerationParams(max_new_tokens=6))
    async with Executor(LocalEngine(loaded), config) as ex:
        assert (await ex.generate(prompt)).completion_tokens > 0


async def test_close_refuses_new_requests(engine, model_config):
    from model_server.errors import ExecutorClosed

    ex = Executor(engine, model_config)
    ex.start()
    await ex.close()
    with pytest.raises(ExecutorClosed):
        ex.submit(PROMPTS[0])

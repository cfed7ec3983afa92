"""Idefics2, Idefics3 and SmolVLM through the executor: every task of the guide, batching, the vision cache."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from model_server import tasks
from model_server.config import ModelConfig
from model_server.engine import LocalEngine, engine_for
from model_server.executor import Executor
from model_server.families.engine import FamilyEngine
from model_server.prompt import render_chat
from model_server.types import ChatTurn, FinishReason, GenerationParams, Prompt
from model_server.vision_cache import VisionCache
from tests.conftest import noise_image


def config_for(loaded, batching: str = "continuous") -> ModelConfig:
    return ModelConfig(model=loaded.name, device="cpu", max_batch_size=8, batching=batching,  # type: ignore[arg-type]
                       request_timeout_s=60.0)


def short(prompt: Prompt, tokens: int = 12) -> Prompt:
    return dataclasses.replace(prompt, params=dataclasses.replace(prompt.params, max_new_tokens=tokens))


def guide_prompts() -> list[Prompt]:
    a, b, c = noise_image(1), noise_image(2, (64, 20)), noise_image(3, (20, 50))
    chat = render_chat([ChatTurn("user", "hi", "ann", (a,)), ChatTurn("assistant", "hello"),
                        ChatTurn("user", "and this one?", "ann", (b,))], instruct=True)
    return [short(p) for p in (
        tasks.caption(a), tasks.prompted_caption(b), tasks.vqa(c, "What is here?"),
        tasks.fewshot([(a, "A red square."), (b, "A blue bar.")], c), chat,
        tasks.classify_prompt(a, ["cat", "dog"]),
    )]


def test_architecture_comes_from_the_config(family_paths, family_models, architecture):
    loaded = family_models[architecture]
    assert json.loads((family_paths[architecture] / "config.json").read_text())["model_type"] == architecture
    assert loaded.architecture == architecture
    assert loaded.instruct
    assert isinstance(engine_for(loaded, config_for(loaded)), FamilyEngine)
    tokenizer = loaded.tokenizer
    banned = {tokenizer.convert_ids_to_tokens(ids[0]) for ids in loaded.bad_words_ids}
    assert {"<image>", "<fake_token_around_image>"} <= banned
    if architecture != "idefics2":
        assert {"<global-img>", "<row_1_col_1>", "<row_2_col_2>"} <= banned
    assert tokenizer.convert_tokens_to_ids("<end_of_utterance>") in loaded.stop_token_ids
    assert loaded.max_positions == 2048  # the text config's max_position_embeddings


def test_v1_checkpoint_still_gets_the_v1_engine(loaded_model, model_config):
    assert loaded_model.architecture == "idefics"
    assert type(engine_for(loaded_model, model_config)) is LocalEngine


@pytest.mark.parametrize("batching", ["continuous", "static"])
async def test_batched_greedy_equals_one_at_a_time(family_models, architecture, batching):
    loaded = family_models[architecture]
    config = config_for(loaded, batching)
    prompts = guide_prompts()
    async with Executor(engine_for(loaded, config), config, batch_window_s=0.05) as executor:
        alone = [await executor.generate(p) for p in prompts]
        together = await asyncio.gather(*(executor.generate(p) for p in prompts))
        # Staggered: later requests join a batch that is already decoding (continuous batching).
        staggered = []
        for p in prompts:
            staggered.append(asyncio.ensure_future(executor.generate(p)))
            await asyncio.sleep(0.01)
        staggered_results = await asyncio.gather(*staggered)
    assert all(r.batch_size == 1 for r in alone)
    assert max(r.batch_size for r in together) > 1
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.text for r in staggered_results] == [r.text for r in alone]
    assert [r.completion_tokens for r in together] == [r.completion_tokens for r in alone]
    assert all(r.text for r in alone)


async def test_every_task_of_the_guide(family_models, architecture):
    loaded = family_models[architecture]
    config = config_for(loaded)
    image = noise_image(5)
    async with Executor(engine_for(loaded, config), config, batch_window_s=0.0) as executor:
        for prompt in guide_prompts():
            result = await executor.generate(prompt)
            assert result.finish_reason in (FinishReason.LENGTH, FinishReason.END_OF_UTTERANCE,
                                             FinishReason.STOP_STRING)
            assert result.prompt_tokens > 0
        ranked = await executor.rank(tasks.classify_prompt(image, ["cat", "dog", "city landscape"]),
                                     ["cat", "dog", "city landscape"])
        assert sorted(r.category for r in ranked) == ["cat", "city landscape", "dog"]
        assert sum(r.probability for r in ranked) == pytest.approx(1.0)
        assert ranked[0].probability >= ranked[-1].probability
        story = await executor.generate(short(tasks.story([image, noise_image(6)]), 8))
        assert story.completion_tokens <= 8 and story.batch_size == 1
        sampled = dataclasses.replace(tasks.caption(image), params=GenerationParams(
            max_new_tokens=6, decoding="sample", seed=3))
        first, second = await asyncio.gather(executor.generate(sampled), executor.generate(sampled))
        assert first.text == second.text  # each row's own random stream


async def test_images_change_the_answer(family_models, architecture):
    loaded = family_models[architecture]
    config = config_for(loaded)
    async with Executor(engine_for(loaded, config), config, batch_window_s=0.0) as executor:
        texts = {(await executor.generate(short(tasks.caption(noise_image(seed)), 8))).text for seed in range(4)}
    assert len(texts) > 1


async def test_scores_match_one_at_a_time(family_models, architecture):
    loaded = family_models[architecture]
    engine = engine_for(loaded, config_for(loaded))
    prompt = tasks.classify_prompt(noise_image(1), ["cat", "dog", "a long category name"])
    names = ["cat", "dog", "a long category name"]
    together = engine.score(prompt, names, chunk=8)
    alone = [engine.score(prompt, [name], chunk=1)[0] for name in names]
    assert together == pytest.approx(alone, abs=1e-4)


def test_another_model_never_reads_cached_image_features(family_models):
    """Two models sharing one vision cache (same image): each computes its own features."""
    shared = VisionCache(2**24)
    first = FamilyEngine(family_models["idefics3"], vision_cache=shared)
    second = FamilyEngine(family_models["smolvlm"], vision_cache=shared)
    assert first.identity != second.identity
    image = noise_image(9)
    features = first._features(image)
    assert shared.stats().misses == 1
    again = second._features(image)
    assert shared.stats().misses == 2 and len(shared) == 2
    assert not (features.shape == again.shape and bool((features == again).all()))
    assert first._features(image) is features  # its own entry is still there
    assert shared.stats().hits == 1


def test_v1_cache_key_names_the_model(engine):
    image = noise_image(4)
    engine._image_features([[image]], 1)
    assert any(key[0] == engine.identity for key in engine.vision_cache._entries)

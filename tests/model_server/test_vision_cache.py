"""The vision cache: an image's features are computed once and reused, and reuse changes no output."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from model_server.engine import LocalEngine
from model_server.executor import Executor
from model_server.prompt import render_chat
from model_server.types import ChatTurn, GenerationParams, Prompt
from model_server.vision_cache import VisionCache, image_key
from tests.conftest import noise_image


def conversation(*images_per_turn: tuple[int, ...], question: str = "what changed?") -> Prompt:
    """A chat whose user turns show the given noise images (by seed), answered in between."""
    turns = []
    for n, seeds in enumerate(images_per_turn):
        turns.append(ChatTurn("user", f"{question} {n}", "alice", tuple(noise_image(s) for s in seeds)))
        if n < len(images_per_turn) - 1:
            turns.append(ChatTurn("assistant", f"answer {n}"))
    return render_chat(turns, instruct=True, params=GenerationParams(max_new_tokens=12))


@contextlib.contextmanager
def images_encoded(engine: LocalEngine) -> Iterator[list[int]]:
    """How many images each vision-tower call encodes, for the duration of the block."""
    calls: list[int] = []
    hook = engine.model.model.vision_model.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    try:
        yield calls
    finally:
        hook.remove()


def test_image_key_is_the_content():
    assert image_key(noise_image(1)) == image_key(noise_image(1))
    assert image_key(noise_image(1)) != image_key(noise_image(2))
    assert image_key(noise_image(1, (40, 30))) != image_key(noise_image(1, (30, 40)))
    assert image_key(noise_image(1)) != image_key(noise_image(1).convert("L"))


def test_an_images_key_is_computed_once_and_forgotten_with_it():
    import gc

    from model_server import vision_cache

    image = noise_image(5)
    key = image_key(image)
    image.putpixel((0, 0), (1, 2, 3))  # nothing in the bot or model server changes a picture once decoded
    assert image_key(image) == key  # remembered, not hashed again
    assert id(image) in vision_cache._KEYS
    ident = id(image)
    del image
    gc.collect()
    assert ident not in vision_cache._KEYS


def test_least_recently_used_entries_leave_first_within_the_byte_bound():
    cache = VisionCache(capacity_bytes=3 * 400)  # three 10x10 float32 tensors
    for name in "abc":
        cache.put(name, torch.zeros(10, 10))
    assert cache.get("a") is not None  # "a" is now the most recently used
    cache.put("d", torch.zeros(10, 10))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    cache.put("huge", torch.zeros(100, 100))  # larger than the whole cache: not kept, nothing evicted
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.capacity_bytes) == (3, 1200, 1200)
    assert cache.get("huge") is None
    assert (cache.stats().hits, cache.stats().misses) == (3, 2)


def test_a_zero_byte_cache_keeps_nothing():
    cache = VisionCache(0)
    cache.put("a", torch.zeros(2))
    assert cache.get("a") is None and cache.stats().entries == 0


async def test_a_picture_seen_again_is_not_encoded_again(loaded_model, model_config):
    engine = LocalEngine(loaded_model)
    async with Executor(engine, model_config, batch_window_s=0) as ex:
        with images_encoded(engine) as calls:
            await ex.generate(conversation((101,)))
            assert calls == [1]
            # The channel's next turn: the same picture in the history, and a new one.
            await ex.generate(conversation((101,), (102,)))
            assert calls == [1, 1]
            # Another request about both pictures, and scoring against one: nothing new to encode.
            await ex.generate(conversation((102, 101), question="compare"))
            await ex.rank(conversation((101,), question="cat or dog?"), ["cat", "dog"])
            assert calls == [1, 1]
        # One batch showing one picture twice encodes it once.
        with images_encoded(engine) as calls:
            await ex.generate(conversation((103, 103)))
            assert calls == [1]
    stats = engine.vision_cache.stats()
    assert (stats.entries, stats.hits, stats.misses) == (3, 4, 3)


async def test_cached_features_give_the_same_answers(loaded_model, model_config):
    prompts = [conversation((111,)), conversation((111,), (112,)), conversation((112, 111), (113,)),
               conversation((), (113,), question="again")]
    with_cache, without = LocalEngine(loaded_model), LocalEngine(loaded_model, vision_cache_bytes=0)
    texts = {}
    for name, engine in (("cache", with_cache), ("none", without)):
        async with Executor(engine, model_config, batch_window_s=0) as ex:
            texts[name] = [(await ex.generate(p)).text for p in prompts]
            scores = await ex.rank(prompts[1], ["a red car", "a blue sky"])
            texts[name].append(str([(s.category, round(s.logprob, 4)) for s in scores]))
    assert with_cache.vision_cache.stats().hits >= 4 and without.vision_cache.stats().entries == 0
    assert texts["cache"] == texts["none"]

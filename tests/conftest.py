"""Layered fixtures: tiny checkpoint -> loaded model -> engine -> executor.

Building and loading the tiny IDEFICS is slow-ish (seconds), so those are session-scoped; the
executor is per test, so one test's queue never leaks into another's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fakes.tiny_idefics import build_tiny_idefics


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random instruct IDEFICS saved with `save_pretrained`, like a downloaded checkpoint."""
    return build_tiny_idefics(tmp_path_factory.mktemp("tiny-idefics-instruct"))


@pytest.fixture(scope="session")
def tiny_base_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same without `<end_of_utterance>`: a base checkpoint."""
    return build_tiny_idefics(tmp_path_factory.mktemp("tiny-idefics-base"), instruct=False)


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_path: Path):
    """The instruct checkpoint's processor as the bot loads it: its tokenizer gives the release token ids."""
    from model_server.loading import load_processor

    return load_processor(str(tiny_model_path), local_only=True)


@pytest.fixture(scope="session")
def llama_tokenizer(tiny_processor):
    """The real LLaMA-1 vocabulary with IDEFICS's added tokens, tokenizing as at release."""
    return tiny_processor.tokenizer


@pytest.fixture(scope="session")
def model_config(tiny_model_path: Path):
    from model_server.config import ModelConfig

    return ModelConfig(model=str(tiny_model_path), device="cpu", max_batch_size=8, max_queue=16,
                       request_timeout_s=60.0)


@pytest.fixture(scope="session")
def loaded_model(model_config):
    from model_server.loading import load_model

    return load_model(model_config, progress=lambda line: logging.getLogger("tests").info("%s", line))


@pytest.fixture(scope="session")
def engine(loaded_model):
    from model_server.engine import LocalEngine

    return LocalEngine(loaded_model)


@pytest.fixture
async def executor(engine, model_config):
    from model_server.executor import Executor

    async with Executor(engine, model_config, batch_window_s=0.02) as ex:
        yield ex


def noise_image(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A random RGB picture: distinct seeds give images the tiny model tells apart."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def make_image():
    return noise_image


# -- Idefics2, Idefics3, SmolVLM -----------------------------------------------------------------------
@pytest.fixture(scope="session")
def family_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random checkpoint of each chat-template architecture, built once per session."""
    from tests.fakes.tiny_families import ARCHITECTURES, build_tiny_family

    return {a: build_tiny_family(tmp_path_factory.mktemp(f"tiny-{a}"), a) for a in ARCHITECTURES}


@pytest.fixture(scope="session")
def family_models(family_paths: dict[str, Path]) -> dict[str, object]:
    """Each of them loaded on the CPU through `model_server.loading.load_model`, as users load theirs."""
    from model_server.config import ModelConfig
    from model_server.loading import load_model

    return {a: load_model(ModelConfig(model=str(p), device="cpu"), progress=lambda line: None)
            for a, p in family_paths.items()}


@pytest.fixture(params=["idefics2", "idefics3", "smolvlm"])
def architecture(request: pytest.FixtureRequest) -> str:
    return str(request.param)

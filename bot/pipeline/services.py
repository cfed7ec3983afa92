"""Opening what every front end needs, in one place: database, model, executor, image downloader.

`main()`-style code owns these resources (`async with open_services(...) as services:`) and hands
them down; nothing below opens its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bot.images.addresses import create_session
from bot.images.fetch import ImageFetcher
from bot.pipeline.conversation import Conversation, ModelInfo
from bot.settings import Settings
from model_server.backend import GenerationBackend
from storage import Database, open_database

if TYPE_CHECKING:
    from model_server.families.loading import ProcessorFacts

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    database: Database
    executor: GenerationBackend | None
    """None in `--dry-run`: nothing is generated."""
    model: ModelInfo
    fetcher: ImageFetcher
    conversation: Conversation


def model_info_without_weights(name: str) -> ModelInfo:
    """Render and count with the checkpoint's tokenizer when it can be read, else a safe estimate."""
    from model_server.errors import ModelLoadError
    from model_server.loading import TRAINED_POSITIONS, is_instruct_tokenizer, load_processor

    try:
        # Only what is on disk already: a dry run never waits on the hub.
        from model_server.families.loading import architecture_of, processor_facts

        architecture = architecture_of(name, local_only=True)
        if architecture != "idefics":
            return family_model_info(name, processor_facts(name, architecture))
        processor = load_processor(name, local_only=True)
    except ModelLoadError:
        return ModelInfo(name=name, instruct="instruct" in name.lower(), max_positions=TRAINED_POSITIONS)
    tokenizer = processor.tokenizer
    return ModelInfo(
        name=name, instruct=is_instruct_tokenizer(tokenizer), max_positions=TRAINED_POSITIONS,
        count_tokens=lambda text: len(tokenizer(text, add_special_tokens=False).input_ids),
    )


def family_model_info(name: str, facts: ProcessorFacts) -> ModelInfo:
    """Idefics2, Idefics3, SmolVLM: counted and shown through the processor's chat template."""
    return ModelInfo(name=name, instruct=facts.instruct, max_positions=facts.max_positions, count_tokens=facts.counter,
                     architecture=facts.architecture, display=facts.display)


@contextlib.asynccontextmanager
async def open_executor(settings: Settings, model: str | None = None,
                        progress: Callable[[str], None] | None = None,
                        ) -> AsyncIterator[tuple[GenerationBackend, ModelInfo]]:
    """Load the model (on a worker thread: loading takes minutes for real checkpoints) and start the executor.

    With `IDEFICS_DEVICES` listing several devices, one replica is loaded on each (one after the other) and the
    executor is a `ReplicaPool` (the same contract); listing one device loads a plain executor there.
    With `GENERATION_BACKEND=tgi` nothing is loaded here: the executor sends requests to `TGI_URL`; with
    `GENERATION_BACKEND=openai`, to the OpenAI-compatible server at `OPENAI_BASE_URL`.
    """
    if settings.generation_backend == "tgi":
        async with open_tgi_executor(settings, model, progress) as opened:
            yield opened
        return
    if settings.generation_backend == "openai":
        async with open_openai_executor(settings, model, progress) as opened:
            yield opened
        return
    from model_server.loading import load_model
    from model_server.replicas import load_replicas, local_executor

    config = settings.model_config_for(model)
    if config.devices:
        models = await asyncio.to_thread(load_replicas, config, progress)
    else:
        models = [await asyncio.to_thread(load_model, config, progress)]
    loaded = models[0]
    info = ModelInfo(name=config.model, instruct=loaded.instruct, max_positions=loaded.max_positions,
                     count_tokens=loaded.count_tokens, architecture=loaded.architecture)
    if loaded.facts is not None:
        info = family_model_info(config.model, loaded.facts)
    async with local_executor(models, config, batch_window_s=settings.batch_window_ms / 1000) as executor:
        yield executor, info


@contextlib.asynccontextmanager
async def open_tgi_executor(settings: Settings, model: str | None = None,
                            progress: Callable[[str], None] | None = None,
                            ) -> AsyncIterator[tuple[GenerationBackend, ModelInfo]]:
    """A `TgiExecutor` on `TGI_URL`, checked ready, and the `ModelInfo` of the model that server runs.

    The prompt budget follows the server's `/info` limits (`max_input_tokens`, and `max_total_tokens` less each
    channel's own `max_new_tokens`). Instruct or base, and the token count, come from the tokenizer when the
    model id is a folder this machine can read too; else instruct from the id's name ("instruct"), and the
    count from the server's `/tokenize`.
    """
    from model_server.errors import ModelLoadError
    from model_server.tgi import TgiExecutor

    if not settings.tgi_url:
        raise ModelLoadError(detail="GENERATION_BACKEND=tgi without TGI_URL",
                             user_message="GENERATION_BACKEND=tgi needs TGI_URL, the text-generation-inference "
                             "server's address (e.g. http://localhost:8080)")
    if progress is not None:
        progress(f"connecting to text-generation-inference at {settings.tgi_url}")
    async with TgiExecutor(settings.tgi_config()) as executor:
        server = executor.server
        assert server is not None
        if model and model != server.model_id:
            log.warning("--model %s ignored: text-generation-inference serves %s", model, server.model_id)
        info = await asyncio.to_thread(_served_model_info, server.model_id)
        info = dataclasses.replace(info, max_positions=server.max_positions(),
                                   max_input_tokens=server.max_input_tokens)
        if info.count_tokens is None:  # count with the server's own tokenizer
            info = dataclasses.replace(info, count_tokens=executor.token_counter(), count_blocks=True)
        yield executor, info


@contextlib.asynccontextmanager
async def open_openai_executor(settings: Settings, model: str | None = None,
                               progress: Callable[[str], None] | None = None,
                               ) -> AsyncIterator[tuple[GenerationBackend, ModelInfo]]:
    """An `OpenAIExecutor` on `OPENAI_BASE_URL`, checked ready, and the `ModelInfo` of the model it serves.

    Chat-completions servers apply the model's own chat template, so prompts are always rendered as instruct
    turns (the server reads the turns back from them). The prompt budget is the context length the server
    reports (vLLM's `max_model_len`), else 2048 positions; `--model` names the model to ask for.
    """
    from model_server.errors import ModelLoadError
    from model_server.openai import OpenAIExecutor

    if not settings.openai_base_url:
        raise ModelLoadError(detail="GENERATION_BACKEND=openai without OPENAI_BASE_URL",
                             user_message="GENERATION_BACKEND=openai needs OPENAI_BASE_URL, the OpenAI-compatible "
                             "server's address with its /v1 (e.g. http://localhost:8000/v1)")
    config = settings.openai_config()
    if model:
        config = dataclasses.replace(config, model=model)
    if progress is not None:
        progress(f"connecting to the OpenAI-compatible server at {config.url}")
    async with OpenAIExecutor(config) as executor:
        server = executor.server
        assert server is not None
        info = await asyncio.to_thread(_served_model_info, server.model_id)
        yield executor, dataclasses.replace(info, instruct=True, max_positions=server.max_positions())


def _served_model_info(model_id: str) -> ModelInfo:
    if Path(model_id).is_dir():  # the server serves a folder this machine shares: read its tokenizer
        return model_info_without_weights(model_id)
    # A hub id: judged by its name, so the bot process needs neither torch nor transformers.
    return ModelInfo(name=model_id, instruct="instruct" in model_id.lower())


@contextlib.asynccontextmanager
async def open_services(settings: Settings, *, model: str | None = None, dry_run: bool = False,
                        progress: Callable[[str], None] | None = None,
                        allow_private_links: bool = False) -> AsyncIterator[Services]:
    async with contextlib.AsyncExitStack() as stack:
        database = await stack.enter_async_context(open_database(settings.database_url,
                                                                 max_image_bytes=settings.max_image_bytes))
        session = create_session(allow_private=allow_private_links)
        stack.push_async_callback(session.close)
        fetcher = ImageFetcher(session, settings.image_limits(), allow_private=allow_private_links)
        executor: GenerationBackend | None = None
        if dry_run:
            info = await asyncio.to_thread(model_info_without_weights, model or settings.idefics_model)
        else:
            executor, info = await stack.enter_async_context(open_executor(settings, model, progress))
        conversation = Conversation(database.store, executor, info, settings.chat_defaults())
        yield Services(settings, database, executor, info, fetcher, conversation)

"""Opening what every front end needs, in one place: database, model, executor, image downloader.

`main()`-style code owns these resources (`async with open_services(...) as services:`) and hands
them down; nothing below opens its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from bot.conversation import Conversation, ModelInfo
from bot.fetch import ImageFetcher, create_session
from bot.settings import Settings
from model_server.executor import Executor
from storage import Database, open_database


@dataclass
class Services:
    settings: Settings
    database: Database
    executor: Executor | None
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
        processor = load_processor(name, local_only=True)
    except ModelLoadError:
        return ModelInfo(name=name, instruct="instruct" in name.lower(), max_positions=TRAINED_POSITIONS)
    tokenizer = processor.tokenizer
    return ModelInfo(
        name=name, instruct=is_instruct_tokenizer(tokenizer), max_positions=TRAINED_POSITIONS,
        count_tokens=lambda text: len(tokenizer(text, add_special_tokens=False).input_ids),
    )


@contextlib.asynccontextmanager
async def open_executor(settings: Settings, model: str | None = None,
                        progress: Callable[[str], None] | None = None) -> AsyncIterator[tuple[Executor, ModelInfo]]:
    """Load the model (on a worker thread: loading takes minutes for real checkpoints) and start the executor."""
    from model_server.engine import LocalEngine
    from model_server.errors import ModelLoadError
    from model_server.loading import load_model

    if settings.generation_backend != "local":
        raise ModelLoadError(
            f"backend {settings.generation_backend} requested",
            user_message=f"GENERATION_BACKEND={settings.generation_backend} is not available in this version; "
            "use local",
        )
    config = settings.model_config_for(model)
    loaded = await asyncio.to_thread(load_model, config, progress)
    info = ModelInfo(name=config.model, instruct=loaded.instruct, max_positions=loaded.max_positions,
                     count_tokens=loaded.count_tokens)
    async with Executor(LocalEngine(loaded), config, batch_window_s=settings.batch_window_ms / 1000) as executor:
        yield executor, info


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
        executor: Executor | None = None
        if dry_run:
            info = await asyncio.to_thread(model_info_without_weights, model or settings.idefics_model)
        else:
            executor, info = await stack.enter_async_context(open_executor(settings, model, progress))
        conversation = Conversation(database.store, executor, info, settings.chat_defaults())
        yield Services(settings, database, executor, info, fetcher, conversation)

"""What the model server needs from the settings, one frozen value per backend (no pydantic, no environment).

Front ends build these from their settings; only the code that opens backends hands them on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class ModelConfig:
    model: str
    """Hub id or local folder of an IDEFICS checkpoint (base or instruct)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    devices: tuple[str, ...] = ()
    """One model replica per entry (`cpu`, `cuda` or `cuda:N`; see `replicas`); empty: one model on `device`."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    quantization: Literal["none", "4bit", "8bit"] = "none"
    max_batch_size: int = 8
    """Most requests generated together in one batch."""
    batching: Literal["continuous", "static"] = "continuous"
    """"continuous": requests join the running batch between decode steps and leave it when done;
    "static": a batch runs to its end before the next one starts (beam search and scoring always do)."""
    vision_cache_mb: int = 256
    """Memory for image features kept between requests (keyed by image content); 0 turns the cache off."""
    image_longest_edge: int = 0
    """Idefics3/SmolVLM: pictures resized to at most this longest side before tiling (512: one tile); 0: the
    checkpoint's own setting."""
    max_queue: int = 64
    """Most requests waiting; past it `submit` raises `Busy`."""
    request_timeout_s: float = 180.0
    """Longest a request may take from submission to its last token."""
    watchdog_s: float = 120.0
    """Longest a running batch may go without progress (a decode step, a finished row) before the
    executor fails its requests and reports a fault; 0 turns the watchdog off. Past twice this the
    executor calls its `on_fatal` hook so the process can exit and be restarted."""


DEFAULT_MAX_BODY_BYTES = 2_000_000
"""TGI's default `--payload-limit`."""


@dataclass(frozen=True)
class RemoteConfig:
    """A model server reached over HTTP (text-generation-inference, or an OpenAI-compatible server)."""

    url: str
    """Base URL of the server (`TGI_URL`, e.g. `http://tgi:80`; `OPENAI_BASE_URL`, e.g. `http://vllm:8000/v1`)."""
    max_batch_size: int = 8
    """Most requests sent to the server at once (it batches them continuously)."""
    max_queue: int = 64
    """Most requests waiting here; past it `submit` raises `Busy`."""
    request_timeout_s: float = 180.0
    """Longest a request may take from submission to its last token, retries included."""
    connect_timeout_s: float = 10.0
    """Connecting to the server, and each start-up check."""
    stall_s: float = 60.0
    """Longest wait for the next streamed event (first token included) before the request fails."""
    max_retries: int = 3
    """Retries of connection errors, 429 and 503, only before any token was streamed."""
    backoff_s: float = 0.5
    """First retry pause, doubled each time; a `Retry-After` header wins."""
    start_wait_s: float = 0.0
    """How long `start()` waits for the server to become ready before giving up."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """The server's request size limit (TGI's `--payload-limit`): images are shrunk until a body is under it."""


@dataclass(frozen=True)
class TgiConfig(RemoteConfig):
    """A text-generation-inference server (`GENERATION_BACKEND=tgi`)."""


@dataclass(frozen=True)
class OpenAIConfig(RemoteConfig):
    """An OpenAI-compatible server (`GENERATION_BACKEND=openai`): vLLM, SGLang, TGI's Messages API, llama.cpp."""

    model: str = ""
    """`OPENAI_MODEL`, the `model` of every request; empty: the first model `GET /models` lists."""
    api_key: str | None = field(default=None, repr=False)
    """`OPENAI_API_KEY`, sent as `Authorization: Bearer ...`; never logged (not in `repr` either)."""

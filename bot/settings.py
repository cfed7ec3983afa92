"""The one settings object: read once from the environment (and `.env`), then passed down.

Every name here is documented in the README's configuration table. Each package receives only the
part it needs, as its own small config dataclass (see `model_config_for()`, `image_limits()`, `chat_defaults()`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bot.images.check import ImageLimits
from bot.pipeline.conversation import ChatDefaults
from model_server.config import ModelConfig

if TYPE_CHECKING:
    from model_server.config import OpenAIConfig, TgiConfig

DEFAULT_MODEL = "BOINCAIM4/idefics-9b-instruct"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./data/idefics-bot.sqlite3"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # Discord
    discord_token: SecretStr | None = None
    discord_dev_guild_id: int | None = None
    answer_dms: bool = True
    answer_bots: bool = False
    user_max_inflight: int = Field(default=2, ge=1)
    user_max_per_minute: int = Field(default=10, ge=1)
    stream_edit_interval_s: float = Field(default=1.0, ge=0, le=60)
    """Least time between two edits of a streamed answer (Discord allows about 5 edits per 5 s)."""
    discord_api_base: str | None = None
    """Override of Discord's REST base URL (e.g. `https://proxy.example/api/v10`): tests, self-hosted API proxies."""
    discord_gateway_url: str | None = None
    """Override of Discord's gateway websocket URL (e.g. `wss://proxy.example/`): tests, self-hosted proxies."""
    discord_shards: int | Literal["auto"] | None = None
    """Unset: one gateway connection. A number N: N shards (an `AutoShardedBot`); `auto`: the count Discord
    recommends (`GET /gateway/bot`). With `DISCORD_SHARD_IDS`, the total over all processes."""
    discord_shard_ids: Annotated[tuple[int, ...] | None, NoDecode] = None
    """The shards this process runs (comma-separated ids, e.g. `0,1`), when several processes share the
    shards (and one database); unset: all of them. Needs `DISCORD_SHARDS` as a number."""

    # Restarts and shutdown
    resume_window_s: float = Field(default=600.0, ge=0)
    """A request cut off by a crash is answered after the restart if it is at most this old, else told to ask
    again."""
    shutdown_grace_s: float = Field(default=30.0, ge=0, le=3600)
    """On SIGTERM/SIGINT, how long running answers may take to finish before they are cancelled."""

    # Model
    idefics_model: str = DEFAULT_MODEL
    idefics_device: Literal["auto", "cuda", "cpu"] = "auto"
    idefics_devices: str = ""
    """Comma-separated devices (`cuda:0,cuda:1`), one model replica on each; empty: one model on `IDEFICS_DEVICE`
    (spread over all GPUs on CUDA). Checked when the model loads (`model_server.replicas.resolve_devices`)."""
    idefics_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    idefics_quantization: Literal["none", "4bit", "8bit"] = "none"
    generation_backend: Literal["local", "tgi", "openai"] = "local"
    tgi_url: str | None = None
    """Base URL of the text-generation-inference server (`GENERATION_BACKEND=tgi`), e.g. http://localhost:8080."""
    tgi_timeout_s: float = Field(default=10.0, gt=0)
    """Connecting to TGI, and each start-up check (`/health`, `/info`)."""
    tgi_stall_s: float = Field(default=60.0, gt=0)
    """A TGI stream with no token for this long (first token included) fails with a timeout message."""
    tgi_max_retries: int = Field(default=3, ge=0, le=10)
    """Retries of connection errors and 429/503 answers, with exponential backoff, before any token came."""
    tgi_start_wait_s: float = Field(default=60.0, ge=0)
    """At start, how long to wait for TGI to become ready (it loads the model) before giving up."""
    tgi_max_request_bytes: int = Field(default=2_000_000, ge=100_000)
    """TGI's `--payload-limit`: images are re-encoded smaller until each request body is under it."""
    openai_base_url: str | None = None
    """Base URL of an OpenAI-compatible server (`GENERATION_BACKEND=openai`), with its `/v1`, e.g.
    http://localhost:8000/v1. The TGI_TIMEOUT_S, TGI_STALL_S, TGI_MAX_RETRIES, TGI_START_WAIT_S and
    TGI_MAX_REQUEST_BYTES settings apply to it too."""
    openai_api_key: SecretStr | None = None
    """Sent as `Authorization: Bearer ...` (optional: vLLM runs without one unless started with `--api-key`)."""
    openai_model: str = ""
    """The model every request names (vLLM: its `--served-model-name`); empty: the first the server lists."""

    # Generation and queueing
    max_batch_size: int = Field(default=8, ge=1)
    batching: Literal["continuous", "static"] = "continuous"
    """continuous: new requests join the running batch between decode steps; static: a batch runs to its end."""
    vision_cache_mb: int = Field(default=256, ge=0)
    """Memory for image features kept between requests, so a picture asked about again is not re-encoded."""
    image_longest_edge: int = Field(default=0, ge=0)
    """Idefics3/SmolVLM: resize pictures to at most this many pixels on their longest side before they are cut
    into tiles (fewer tiles, fewer image tokens: 512 is one tile, for CPUs); 0 keeps the checkpoint's own size."""
    max_queue: int = Field(default=64, ge=1)
    request_timeout_s: float = Field(default=180.0, gt=0)
    watchdog_s: float = Field(default=120.0, ge=0)
    """A running batch silent this long fails its requests and `/status` shows the fault; silent twice as
    long, the process exits non-zero for its supervisor to restart it. 0 turns the watchdog off."""
    max_new_tokens: int = Field(default=256, ge=1, le=1024)
    max_images_per_prompt: int = Field(default=4, ge=0, le=16)
    history_messages: int = Field(default=40, ge=1, le=500)
    channel_backlog: int = Field(default=8, ge=1)
    """Most requests of one channel running or waiting their turn; past it users are told the model is busy."""
    batch_window_ms: float = Field(default=5.0, ge=0, le=1000)
    system_prompt: str | None = None
    temperature: float = Field(default=0.7, gt=0, le=2.0)
    decoding: Literal["greedy", "sample", "beam"] = "greedy"

    # Images
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    max_images_per_message: int = Field(default=4, ge=1)
    download_timeout_s: float = Field(default=10.0, gt=0)

    # Storage and logs
    database_url: str = DEFAULT_DATABASE_URL
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    """`json`: one JSON object per line (time, level, logger, message, extra fields), for log collectors."""

    # Metrics and health
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """`idefics-bot run` serves `/metrics` (Prometheus) and `/healthz` on this port; unset: no server."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics server listens on (`0.0.0.0`: every interface, e.g. in a container)."""

    @field_validator("system_prompt", "tgi_url", "openai_base_url", "openai_api_key", "discord_api_base",
                     "discord_gateway_url", "metrics_port",
                     mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("discord_shards", mode="before")
    @classmethod
    def _shard_count(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            if value in ("", "auto"):
                return value or None
            if not value.isdigit():
                raise ValueError("expected a number of shards or 'auto'")
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError("expected at least 1 shard")
        return value

    @field_validator("discord_shard_ids", mode="before")
    @classmethod
    def _split_shard_ids(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",") if part.strip()]
            if not all(part.isdigit() for part in parts):
                raise ValueError("expected comma-separated shard ids, e.g. 0,1")
            return tuple(int(part) for part in parts) or None
        return value

    @field_validator("discord_shard_ids")
    @classmethod
    def _shard_ids_fit(cls, value: tuple[int, ...] | None, info: ValidationInfo) -> tuple[int, ...] | None:
        if value is None:
            return None
        total = info.data.get("discord_shards")
        if not isinstance(total, int):
            raise ValueError("needs DISCORD_SHARDS set to the total number of shards")
        if len(set(value)) != len(value) or not all(0 <= shard < total for shard in value):
            raise ValueError(f"expected distinct ids from 0 to {total - 1} (DISCORD_SHARDS={total})")
        return value

    def model_config_for(self, model: str | None = None) -> ModelConfig:
        """The model server's part of the settings; `model` overrides `IDEFICS_MODEL` (the `--model` flag)."""
        return ModelConfig(
            model=model or self.idefics_model,
            device=self.idefics_device,
            devices=tuple(part.strip() for part in self.idefics_devices.split(",")) if self.idefics_devices.strip()
            else (),
            dtype=self.idefics_dtype,
            quantization=self.idefics_quantization,
            max_batch_size=self.max_batch_size,
            batching=self.batching,
            vision_cache_mb=self.vision_cache_mb,
            image_longest_edge=self.image_longest_edge,
            max_queue=self.max_queue,
            request_timeout_s=self.request_timeout_s,
            watchdog_s=self.watchdog_s,
        )

    def _remote_fields(self) -> dict[str, Any]:
        """What every remote backend's config takes from the settings besides its URL (`RemoteConfig`): the
        `TGI_*` timeouts, retries and body limit serve the OpenAI-compatible backend too."""
        return {
            "max_batch_size": self.max_batch_size,
            "max_queue": self.max_queue,
            "request_timeout_s": self.request_timeout_s,
            "connect_timeout_s": self.tgi_timeout_s,
            "stall_s": self.tgi_stall_s,
            "max_retries": self.tgi_max_retries,
            "start_wait_s": self.tgi_start_wait_s,
            "max_body_bytes": self.tgi_max_request_bytes,
        }

    def tgi_config(self) -> TgiConfig:
        """The TGI backend's part of the settings (requires `TGI_URL`)."""
        from model_server.config import TgiConfig

        if not self.tgi_url:
            raise ValueError("TGI_URL is not set")
        return TgiConfig(url=self.tgi_url, **self._remote_fields())

    def openai_config(self) -> OpenAIConfig:
        """The OpenAI-compatible backend's part of the settings (requires `OPENAI_BASE_URL`)."""
        from model_server.config import OpenAIConfig

        if not self.openai_base_url:
            raise ValueError("OPENAI_BASE_URL is not set")
        return OpenAIConfig(
            url=self.openai_base_url,
            **self._remote_fields(),
            model=self.openai_model,
            api_key=self.openai_api_key.get_secret_value() if self.openai_api_key else None,
        )

    def chat_defaults(self) -> ChatDefaults:
        return ChatDefaults(
            system_prompt=self.system_prompt,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            decoding=self.decoding,
            max_images=self.max_images_per_prompt,
            history_messages=self.history_messages,
            channel_backlog=self.channel_backlog,
        )

    def image_limits(self) -> ImageLimits:
        return ImageLimits(
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
            max_count=self.max_images_per_message,
            timeout_s=self.download_timeout_s,
        )

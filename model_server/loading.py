"""Loading an IDEFICS checkpoint (hub id or local folder) onto the right device, dtype and quantization."""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model_server.config import ModelConfig
from model_server.errors import ModelLoadError

if TYPE_CHECKING:
    from model_server.families.loading import ProcessorFacts

log = logging.getLogger(__name__)

END_OF_UTTERANCE = "<end_of_utterance>"
IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
# IDEFICS was trained on sequences of at most 2048 tokens.
TRAINED_POSITIONS = 2048

Progress = Callable[[str], None]


@dataclass
class LoadedModel:
    """A model and its processor, ready for the executor's thread."""

    name: str
    model: Any
    """`IdeficsForVisionText2Text`, in eval mode."""
    processor: Any
    """`IdeficsProcessor`; its tokenizer pads on the left."""
    device: torch.device
    """Where inputs go (the first device when accelerate spread the model over several)."""
    dtype: torch.dtype
    instruct: bool
    """True when the tokenizer knows `<end_of_utterance>` (the instruct checkpoints)."""
    stop_token_ids: tuple[int, ...]
    """Tokens that end an answer: `<end_of_utterance>` for instruct checkpoints, and `</s>`."""
    bad_words_ids: list[list[int]]
    """`<image>` and `<fake_token_around_image>`: the model must never write them."""
    max_positions: int
    architecture: str = "idefics"
    """The checkpoint's `model_type`: idefics (v1), idefics2, idefics3 or smolvlm (`model_server.families`)."""
    facts: ProcessorFacts | None = None
    """How a chat-template model renders and counts prompts; None for IDEFICS v1."""

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def count_tokens(self, text: str) -> int:
        if self.facts is not None:
            return self.facts.counter(text)
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)


def gpu_memory() -> dict[str, int]:
    """Bytes of tensors allocated on each CUDA device ("cuda:0": ...); {} without CUDA (for metrics).

    Cheap and safe to call from any thread; a device this process never used reports 0 (CUDA is not initialised
    for it).
    """
    if not torch.cuda.is_available():
        return {}
    return {f"cuda:{i}": int(torch.cuda.memory_allocated(i)) for i in range(torch.cuda.device_count())}


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("IDEFICS_DEVICE=cuda, but no CUDA GPU is available (use cpu or auto)",
                             detail="IDEFICS_DEVICE=cuda but torch sees no CUDA device")
    return requested


def resolve_dtype(requested: str, device: str) -> torch.dtype:
    if requested != "auto":
        dtype: torch.dtype = getattr(torch, requested)
        return dtype
    if device.startswith("cuda"):
        # Ampere and newer compute in bfloat16 natively; older GPUs only in float16.
        with torch.cuda.device(torch.device(device)):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(quantization: str, dtype: torch.dtype, device: str) -> Any | None:
    if quantization == "none":
        return None
    if not device.startswith("cuda"):
        raise ModelLoadError(f"IDEFICS_QUANTIZATION={quantization} needs a CUDA GPU (bitsandbytes runs on CUDA only)",
                             detail=f"quantization {quantization} requested on {device}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"IDEFICS_QUANTIZATION={quantization} needs bitsandbytes: "
                             "pip install 'idefics-bot[quant]'",
                             detail="bitsandbytes is not installed")
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            # The vision tower and the output head stay in full precision: quantizing them hurts most.
            llm_int8_skip_modules=["lm_head", "embed_tokens"],
        )
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_8bit=True, llm_int8_skip_modules=["lm_head", "embed_tokens"]
    )


def _special_token_id(tokenizer: Any, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        return None
    return int(token_id)


def is_instruct_tokenizer(tokenizer: Any) -> bool:
    """Instruct checkpoints were trained with `<end_of_utterance>` as a token of its own; base ones were not."""
    return _special_token_id(tokenizer, END_OF_UTTERANCE) is not None


def use_release_tokenization(tokenizer: Any) -> None:
    """Make an IDEFICS v1 (LLaMA SentencePiece) tokenizer give the token ids the model was trained on.

    IDEFICS was trained and released with the "legacy" LLaMA tokenizer: every stretch of text between two special
    tokens gets its own leading "▁", so `<s>User:` is [1, 4911 "▁User", 29901]. transformers 5 rebuilds a LLaMA
    tokenizer from the `legacy` key of `tokenizer_config.json`; the released configs lack it (and `save_pretrained`
    drops it), so it builds the non-legacy one: [1, 2659 "User", 29901], text the model never saw after `<s>` or
    an image. We set the release tokenizer's own pipeline, whatever the config says: a `Prepend("▁")` +
    `Replace(" ", "▁")` normalizer and no pre-tokenizer, with special tokens matched on the raw text.
    """
    from tokenizers import AddedToken, decoders, normalizers

    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    # A special token matched on normalized text would leave the text after it without its "▁".
    normalized = [t for t in backend.get_added_tokens_decoder().values() if t.normalized]
    if normalized:
        backend.add_special_tokens([AddedToken(t.content, special=True, normalized=False) for t in normalized])
    tokenizer.legacy = True


def _is_idefics_v1(processor: Any) -> bool:
    return type(processor).__name__ == "IdeficsProcessor"


def load_processor(name: str, *, local_only: bool = False) -> Any:
    """The processor alone (tokenizer + image processor): enough to render and count, no weights.

    An IDEFICS v1 tokenizer always tokenizes as at release (`use_release_tokenization`).
    """
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name, local_files_only=local_only)  # type: ignore[no-untyped-call]
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from exc
    if _is_idefics_v1(processor):
        use_release_tokenization(processor.tokenizer)
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token_id is None:
        processor.tokenizer.pad_token = processor.tokenizer.unk_token
    return processor


def _load_error(name: str, exc: Exception) -> ModelLoadError:
    where = "local folder" if Path(name).exists() else "hub id"
    return ModelLoadError(f"cannot load the model {name!r}: not a complete local checkpoint folder, "
        "and the hub could not provide it", detail=f"loading {name!r} ({where}) failed: {exc}")


def load_model(config: ModelConfig, progress: Progress | None = None, *, device: str | None = None) -> LoadedModel:
    """Load processor and model as `config` says; `progress` receives one line per step.

    `device` (`cpu` or `cuda:N`, checked by the caller: see `replicas.resolve_devices`) puts the whole model
    on that one device, as one replica of several; None follows `config.device`, and on CUDA lets accelerate
    spread the model over every visible GPU.
    """
    from transformers import IdeficsForVisionText2Text

    from model_server.families.loading import architecture_of, load_family

    say = progress or (lambda line: log.info("%s", line))
    started = time.monotonic()
    architecture = architecture_of(config.model)
    placement: str | dict[str, str] | None = None
    if device is None:
        device = resolve_device(config.device)
        if device == "cuda":
            # accelerate spreads a checkpoint too large for one GPU (80B) over all visible GPUs.
            placement = "auto"
    elif device.startswith("cuda"):
        # A replica: every layer on its own GPU, never spread (other replicas use the other GPUs).
        placement = {"": device}
    dtype = resolve_dtype(config.dtype, device)
    quant = quantization_config(config.quantization, dtype, device)

    if architecture != "idefics":
        return load_family(config, architecture, device=device, dtype=dtype, placement=placement, quant=quant,
                           say=say, started=started)
    say(f"loading processor for {config.model}")
    processor = load_processor(config.model)
    tokenizer = processor.tokenizer

    say(f"loading model {config.model} on {device} in {str(dtype).removeprefix('torch.')}"
        + (f", {config.quantization} quantized" if quant is not None else ""))
    model = load_weights(IdeficsForVisionText2Text, config.model, device=device, dtype=dtype, placement=placement,
                         quant=quant)

    eou = _special_token_id(tokenizer, END_OF_UTTERANCE)
    stops = tuple(t for t in (eou, tokenizer.eos_token_id) if t is not None)
    bad = [[i] for i in (_special_token_id(tokenizer, IMAGE_TOKEN), _special_token_id(tokenizer, FAKE_IMAGE_TOKEN))
           if i is not None]
    positions = min(TRAINED_POSITIONS, int(getattr(model.config, "max_position_embeddings", TRAINED_POSITIONS)))
    # With device_map="auto" the layers may sit on several GPUs; inputs go where the embeddings are.
    first_device = model.get_input_embeddings().weight.device
    assert isinstance(first_device, torch.device)
    loaded = LoadedModel(
        name=config.model,
        model=model,
        processor=processor,
        device=first_device,
        dtype=dtype,
        instruct=eou is not None,
        stop_token_ids=stops,
        bad_words_ids=bad,
        max_positions=positions,
    )
    params = sum(p.numel() for p in model.parameters())
    kind = "instruct" if loaded.instruct else "base"
    say(f"model ready: idefics, {params / 1e6:.1f}M parameters, {kind} checkpoint, {time.monotonic() - started:.1f}s")
    return loaded


def load_weights(model_class: Any, name: str, *, device: str, dtype: Any, placement: Any, quant: Any) -> Any:
    """`model_class.from_pretrained(name)` on `device` in `dtype`, placed and quantized as asked, in eval mode; a
    checkpoint that cannot be read or does not fit becomes one clear `ModelLoadError`."""
    kwargs: dict[str, Any] = {"dtype": dtype}
    if placement is not None:
        kwargs["device_map"] = placement
    if quant is not None:
        kwargs["quantization_config"] = quant
    try:
        model: Any = model_class.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from exc
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError("not enough GPU memory for this model: try IDEFICS_QUANTIZATION=4bit or a smaller model",
                             detail=f"out of memory loading {name}: {exc}") from exc
    if device == "cpu":
        model.to("cpu")
    model.eval()
    return model

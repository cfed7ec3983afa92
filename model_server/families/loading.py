"""Loading an Idefics2, Idefics3 or SmolVLM checkpoint: which one it is comes from its config's `model_type`.

`architecture_of` reads the config alone (a small file); `load_family` loads processor and model and measures what
rendering needs: the model's own special strings (its tokenizer's added tokens), the most tokens one image can
take (an image as large as the image processor keeps, split into its most tiles), and the context length of the
text model. The counter it installs counts a rendered prompt as this model reads it: the chat template's text,
each image at its largest (`render.items_from_v1_text` gets the prompt back from the v1 text the renderer counts).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from model_server.config import ModelConfig
from model_server.errors import ModelLoadError
from model_server.families import ARCHITECTURES
from model_server.families.render import RenderTemplate, image_count, items_from_v1_text, render
from model_server.loading import LoadedModel, _load_error, load_processor, load_weights
from model_server.prompt import BOS
from model_server.types import Prompt

_GRID_TOKEN = re.compile(r"<row_\d+_col_\d+>")
IMAGE_STRUCTURE = ("<image>", "<fake_token_around_image>", "<global-img>")
"""Tokens that only lay images out: the model must never write them (besides `<row_N_col_M>`)."""


def architecture_of(name: str, *, local_only: bool = False) -> str:
    """The checkpoint's `model_type` ("idefics" when it cannot be read here: the v1 loader reports why)."""
    local = Path(name) / "config.json"
    try:
        if local.is_file():
            model_type = str(json.loads(local.read_text()).get("model_type", "idefics"))
        else:
            from transformers import AutoConfig

            model_type = str(AutoConfig.from_pretrained(name, local_files_only=local_only).model_type)
    except (OSError, ValueError):
        return "idefics"
    if model_type != "idefics" and model_type not in ARCHITECTURES:
        raise ModelLoadError(f"{name!r} is a {model_type} checkpoint: IDEFICS, Idefics2, Idefics3 and SmolVLM are "
                             "supported", detail=f"unsupported model_type {model_type} in {name}")
    return model_type


@dataclass(frozen=True)
class ProcessorFacts:
    """What rendering and counting need from a chat-template checkpoint: its processor and config, no weights."""

    architecture: str
    instruct: bool
    """The tokenizer knows `<end_of_utterance>`."""
    max_positions: int
    """The text model's context length."""
    specials: tuple[str, ...]
    """The tokenizer's added tokens: never taken from untrusted text."""
    tokens_per_image: int
    """The most tokens one image takes."""
    template: RenderTemplate
    counter: Callable[[str], int]
    """Tokens of a rendered v1 prompt text (`prompt.prompt_text`) as this model reads it, images at their largest."""

    def display(self, prompt: Prompt) -> str:
        """The text the processor reads for `prompt`, each image one `<image>`."""
        return render(prompt.items, self.template, self.specials)


def processor_facts(name: str, architecture: str, processor: Any | None = None,
                    model_config: Any | None = None) -> ProcessorFacts:
    """Read from the processor and the config (loaded here unless given); raises `ModelLoadError`."""
    if processor is None:
        processor = load_processor(name, local_only=True)
    if model_config is None:
        from transformers import AutoConfig

        try:
            model_config = AutoConfig.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise _load_error(name, exc) from exc
    tokenizer = processor.tokenizer
    template = template_of(processor, name)
    specials = special_strings(tokenizer)
    per_image = image_token_bound(processor)
    return ProcessorFacts(
        architecture=architecture, instruct="<end_of_utterance>" in specials,
        max_positions=text_positions(model_config, tokenizer), specials=specials, tokens_per_image=per_image,
        template=template, counter=make_counter(tokenizer, template, specials, per_image),
    )


def special_strings(tokenizer: Any) -> tuple[str, ...]:
    """Every added token of the tokenizer (special or not): text that would become one token of its own."""
    return tuple(sorted({str(t.content) for t in tokenizer.added_tokens_decoder.values() if t.content}))


def _size_field(size: Any, name: str) -> int | None:
    """A field of an image processor's size (a dict, or transformers 5's `SizeDict`)."""
    value = size.get(name) if isinstance(size, dict) else getattr(size, name, None)
    return int(value) if value else None


def image_token_bound(processor: Any) -> int:
    """The most tokens one image takes in the prompt (a square at the largest size the image processor keeps)."""
    size = getattr(processor.image_processor, "size", None)
    edge = _size_field(size, "longest_edge") or _size_field(size, "height") or 2048
    image = Image.new("RGB", (edge, edge))
    with_image = processor(text=["<image>a"], images=[[image]]).input_ids[0]
    without = processor(text=["a"]).input_ids[0]
    # One more per image for whatever a neighbouring word gains or loses at the image's edges.
    return len(with_image) - len(without) + 1


def limit_image_size(processor: Any, longest_edge: int) -> None:
    """Idefics3/SmolVLM: resize pictures to at most `longest_edge` before tiling (0: leave the checkpoint's)."""
    image_processor = processor.image_processor
    tile = _size_field(getattr(image_processor, "max_image_size", None), "longest_edge")
    if not longest_edge or tile is None or _size_field(image_processor.size, "longest_edge") is None:
        return  # Idefics2 has no tiles: its size is a resize range
    # Tiles are whole: a multiple of the tile size, at least one.
    image_processor.size = type(image_processor.size)(longest_edge=max(tile, longest_edge // tile * tile)) \
        if not isinstance(image_processor.size, dict) else {"longest_edge": max(tile, longest_edge // tile * tile)}


def text_positions(model_config: Any, tokenizer: Any) -> int:
    positions = int(getattr(model_config.get_text_config(), "max_position_embeddings", 2048))
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < positions:
        positions = limit
    return positions


def make_counter(tokenizer: Any, template: RenderTemplate,
                 specials: tuple[str, ...], per_image: int) -> Callable[[str], int]:
    def count(v1_text: str) -> int:
        items = items_from_v1_text(v1_text, BOS)  # `prompt_text`'s default BOS, whatever this model's is
        text = render(items, template, specials)
        tokens = len(tokenizer(text).input_ids)  # with the BOS the processor adds
        return tokens + image_count(items) * (per_image - 1)

    return count


def template_of(processor: Any, name: str) -> RenderTemplate:
    if not getattr(processor, "chat_template", None):
        raise ModelLoadError(f"the checkpoint {name!r} has no chat template", detail=f"{name}: no chat_template")

    def template(messages: list[dict[str, object]], add_generation_prompt: bool) -> str:
        return str(processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=False))

    return template


def load_family(config: ModelConfig, architecture: str, *, device: str, dtype: torch.dtype,
                placement: str | dict[str, str] | None, quant: Any, say: Callable[[str], None],
                started: float) -> LoadedModel:
    import time

    from transformers import AutoModelForImageTextToText

    say(f"loading processor for {config.model} ({architecture})")
    processor = load_processor(config.model)
    tokenizer = processor.tokenizer
    limit_image_size(processor, config.image_longest_edge)
    say(f"loading model {config.model} ({architecture}) on {device} in {str(dtype).removeprefix('torch.')}"
        + (f", {config.quantization} quantized" if quant is not None else ""))
    model = load_weights(AutoModelForImageTextToText, config.model, device=device, dtype=dtype,
                         placement=placement, quant=quant)

    facts = processor_facts(config.model, architecture, processor, model.config)
    ids = tokenizer.convert_tokens_to_ids
    eou = ids("<end_of_utterance>") if facts.instruct else None
    stops = tuple(dict.fromkeys(t for t in (eou, tokenizer.eos_token_id) if t is not None))
    banned = [s for s in facts.specials if s in IMAGE_STRUCTURE or _GRID_TOKEN.fullmatch(s)]
    first_device = model.get_input_embeddings().weight.device
    loaded = LoadedModel(
        name=config.model, model=model, processor=processor, device=first_device, dtype=dtype,
        instruct=facts.instruct, stop_token_ids=stops, bad_words_ids=[[ids(s)] for s in banned],
        max_positions=facts.max_positions, architecture=architecture, facts=facts,
    )
    params = sum(p.numel() for p in model.parameters())
    say(f"model ready: {architecture}, {params / 1e6:.1f}M parameters, {loaded.max_positions} positions, "
        f"up to {facts.tokens_per_image} tokens per image, {time.monotonic() - started:.1f}s")
    return loaded



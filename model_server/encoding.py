"""Prompts to model tensors, without the processor's URL fetching.

`IdeficsProcessor.__call__` downloads any text item that looks like a bare URL, with no timeout. We
build the same tensors ourselves: the text is `prompt.prompt_text` (the processor's own rules for
image tokens and item stripping), tokenized with left padding, and images go through the image
processor as the `PIL.Image` objects our downloader already checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers.models.idefics.processing_idefics import incremental_to_binary_attention_mask

from model_server.prompt import prompt_text
from model_server.types import Prompt


@dataclass
class EncodedBatch:
    input_ids: torch.Tensor
    """(batch, tokens), left padded."""
    attention_mask: torch.Tensor
    """(batch, tokens): 0 on padding."""
    pixel_values: torch.Tensor | None
    """(batch, images, channels, height, width); rows with fewer images are zero-padded. None when the
    caller takes image features from elsewhere (the engine's vision cache)."""
    image_attention_mask: torch.Tensor
    """(batch, tokens, images): which image each text token may attend to."""
    prompt_lengths: list[int]
    """Tokens of each prompt without padding."""

    def to(self, device: torch.device, dtype: torch.dtype) -> EncodedBatch:
        return EncodedBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            pixel_values=None if self.pixel_values is None else self.pixel_values.to(device=device, dtype=dtype),
            image_attention_mask=self.image_attention_mask.to(device),
            prompt_lengths=self.prompt_lengths,
        )


def latest_image_index(input_ids: torch.Tensor, image_id: int, eos_id: int | None) -> torch.Tensor:
    """(batch, tokens): the index of the latest image at or before each token, -1 where it sees none.

    What `image_attention_mask_for_packed_input_ids` computes with a Python loop per token (seconds for
    a batch of long prompts), as tensor operations: a token after an end-of-sequence token sees no image
    until the next `<image>`.
    """
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    none = torch.full_like(input_ids, -1)
    is_image = input_ids == image_id
    index = is_image.long().cumsum(dim=1) - 1
    last_image = torch.where(is_image, positions, none).cummax(dim=1).values
    if eos_id is None:
        return index
    last_eos = torch.where(input_ids == eos_id, positions, none).cummax(dim=1).values
    eos_before = torch.cat([none[:, :1], last_eos[:, :-1]], dim=1)  # an end token blocks the tokens after it
    return torch.where(eos_before > last_image, none, index)


def preprocess_images(processor: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """(images, channels, height, width): the image processor's resize and normalisation."""
    processed = processor.image_processor(list(images), return_tensors="pt")
    # The IDEFICS image processor returns a bare tensor; other versions a BatchFeature.
    return processed if isinstance(processed, torch.Tensor) else processed["pixel_values"]


def encode_texts(processor: Any, texts: Sequence[str], images: Sequence[Sequence[Image.Image]], *,
                 pixels: bool = True) -> EncodedBatch:
    """Tensors for already rendered prompt texts (with `<image>` tokens) and their images, in order.

    With `pixels=False` the images are not preprocessed (`pixel_values` is None): the image attention
    mask still says which image each token sees.
    """
    tokenizer = processor.tokenizer
    text_encoding = tokenizer(
        list(texts), add_special_tokens=False, padding="longest", return_tensors="pt"
    )
    input_ids = text_encoding["input_ids"]
    attention_mask = text_encoding["attention_mask"]
    image_processor = processor.image_processor
    dims = (image_processor.image_num_channels, image_processor.image_size, image_processor.image_size)
    max_images = max(1, *(len(row) for row in images))
    pixel_values = torch.zeros(len(texts), max_images, *dims) if pixels else None
    for row, row_images in enumerate(images):
        if row_images and pixel_values is not None:
            pixel_values[row, : len(row_images)] = preprocess_images(processor, row_images)
    if any(images):
        incremental = latest_image_index(input_ids, tokenizer.convert_tokens_to_ids("<image>"),
                                         tokenizer.eos_token_id)
        image_attention_mask = incremental_to_binary_attention_mask(  # type: ignore[no-untyped-call]  # untyped
            incremental, "pt", num_classes=max_images)
    else:
        image_attention_mask = torch.zeros(input_ids.shape[0], input_ids.shape[1], 1, dtype=torch.long)
    return EncodedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        image_attention_mask=image_attention_mask,
        prompt_lengths=[int(n) for n in attention_mask.sum(dim=1)],
    )


def encode(processor: Any, prompts: Sequence[Prompt], *, pixels: bool = True) -> EncodedBatch:
    bos = processor.tokenizer.bos_token
    texts = [prompt_text(p.items, bos=bos) for p in prompts]
    return encode_texts(processor, texts, [p.images for p in prompts], pixels=pixels)

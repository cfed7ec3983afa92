"""The tensors of a batch being decoded, and how rows join and leave it between decode steps.

Rows are left padded: every row's tokens end in the last column, so one new column per step serves
all of them. A row that joins brings its own prefilled key/value cache; the shorter side is padded
on the left with masked columns and the two are stacked (text-generation-inference's
`IdeficsCausalLMBatch.concatenate` does the same). A row that leaves is dropped from every tensor,
and columns that only padding still uses are cut off, so a long-gone long prompt costs nothing.
Positions come from the attention mask's running sum, so padding never shifts a row's positions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

from model_server.streaming import TextAssembler

if TYPE_CHECKING:
    from model_server.engine import Row


class GrowingLayer(DynamicLayer):  # type: ignore[no-untyped-call]  # transformers is untyped here
    """One layer's keys and values in buffers with room to grow.

    transformers' `DynamicLayer` appends each step's column with `torch.cat`, copying the whole cache
    every step: at batch 64 with 1,000-token prompts that is tens of gigabytes moved per token. Here a
    step writes its column into spare room in place; the buffer is copied only when it is full, or
    once after rows joined or left (their `keys`/`values` are then replaced by compact tensors).
    """

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        # Columns in use, one count per buffer: code that replaces `keys` and then `values` (filtering
        # rows, cutting padding) reads `values` between the two assignments.
        self._k_length = self._v_length = 0
        super().__init__()  # type: ignore[no-untyped-call]  # transformers is untyped here

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self._k_length]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._k = value
        self._k_length = 0 if value is None else value.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self._v_length]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v = value
        self._v_length = 0 if value is None else value.shape[-2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self._k_length
        end = start + key_states.shape[-2]
        k, v = self._k, self._v
        if k is None or v is None or end > k.shape[-2] or k.shape[0] != key_states.shape[0]:
            capacity = end + max(32, end // 4)
            k = self._k = self._grown(k, key_states, start, capacity)
            v = self._v = self._grown(v, value_states, start, capacity)
        k[:, :, start:end] = key_states
        v[:, :, start:end] = value_states
        self._k_length = self._v_length = end
        return k[:, :, :end], v[:, :, :end]

    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of a layer the model already wrote to."""
        keys, values = self.keys, self.values
        assert keys is not None and values is not None, "an empty cache layer"
        return keys, values

    @staticmethod
    def _grown(old: torch.Tensor | None, new: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
        buffer = new.new_empty((new.shape[0], new.shape[1], capacity, new.shape[3]))
        if old is not None and length:
            buffer[:, :, :length] = old[:, :, :length]
        return buffer


def new_cache(config: PretrainedConfig) -> DynamicCache:
    """A key/value cache for `config`'s model whose layers grow in place (`GrowingLayer`)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


@dataclass
class RowState:
    """What the decode loop keeps for one row besides its tensors."""

    row: Row
    """The `engine.Row` it decodes."""
    assembler: TextAssembler
    prompt_ids: list[int]
    """The prompt's tokens (for the repetition penalty; empty when the row has none)."""
    prompt_length: int
    generator: torch.Generator | None
    """Own random stream of a sampling row: its draws do not depend on who shares the batch."""


def new_generator(device: torch.device, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else random.randrange(2**31))
    return generator


@dataclass
class RunningBatch:
    states: list[RowState]
    cache: DynamicCache
    """Self-attention keys and values, (rows, heads, columns, head dim) per layer."""
    attention: torch.Tensor
    """(rows, columns): 1 where a row has a token, 0 on padding; as wide as the cache."""
    image_mask: torch.Tensor
    """(rows, 1, images): which images the row's next token may attend to."""
    features: torch.Tensor
    """(rows, images, latents, hidden): image features; padding slots are zero and masked out."""
    next_tokens: torch.Tensor
    """(rows,): each row's newest token, chosen but not yet fed to the model."""

    def __len__(self) -> int:
        return len(self.states)

    @torch.inference_mode()
    def keep(self, positions: list[int]) -> None:
        """Only the rows at `positions` stay (in that order)."""
        index = torch.tensor(positions, device=self.attention.device)
        self.states = [self.states[p] for p in positions]
        self.cache.batch_select_indices(index)
        self.attention = self.attention[index]
        self.image_mask = self.image_mask[index]
        self.features = self.features[index]
        self.next_tokens = self.next_tokens[index]
        self._cut_padding()

    def _cut_padding(self) -> None:
        used = self.attention.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first == 0:
            return
        self.attention = self.attention[:, first:]
        for layer in _layers(self.cache):
            keys, values = layer.filled()
            layer.keys = keys[:, :, first:, :]
            layer.values = values[:, :, first:, :]

    @torch.inference_mode()
    def join(self, other: RunningBatch) -> None:
        """Append `other`'s rows (a freshly prefilled batch) to this one."""
        width = max(self.attention.shape[1], other.attention.shape[1])
        images = max(self.image_mask.shape[-1], other.image_mask.shape[-1])
        self.attention = torch.cat([_pad_left(self.attention, width, 1), _pad_left(other.attention, width, 1)])
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache), strict=True):
            (my_keys, my_values), (their_keys, their_values) = mine.filled(), theirs.filled()
            mine.keys = torch.cat([_pad_left(my_keys, width, 2), _pad_left(their_keys, width, 2)])
            mine.values = torch.cat([_pad_left(my_values, width, 2), _pad_left(their_values, width, 2)])
        self.image_mask = torch.cat([_pad_images(self.image_mask, images, 2), _pad_images(other.image_mask, images, 2)])
        self.features = torch.cat([_pad_images(self.features, images, 1), _pad_images(other.features, images, 1)])
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])
        self.states = self.states + other.states


def _layers(cache: DynamicCache) -> list[GrowingLayer]:
    """The layers of a cache made by `new_cache`."""
    layers = cache.layers
    assert all(isinstance(layer, GrowingLayer) for layer in layers), "a cache not made by new_cache"
    return cast(list[GrowingLayer], layers)


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero columns in front along `dim` until it is `width` long."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _pad_images(tensor: torch.Tensor, images: int, dim: int) -> torch.Tensor:
    """Zero (masked) image slots after the real ones along `dim`."""
    missing = images - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - dim - 1) + [0, missing]
    return F.pad(tensor, pad)

"""The key/value cache layer that grows in place: same contents as transformers' `DynamicLayer`, fewer copies."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from model_server.running_batch import GrowingLayer


def columns(batch: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, n, 4, generator=generator), torch.randn(batch, 2, n, 4, generator=generator)


def test_growing_layer_holds_what_a_dynamic_layer_holds():
    ours, theirs = GrowingLayer(), DynamicLayer()
    for step, n in enumerate([7, 1, 1, 1, 5, 1]):
        k, v = columns(3, n, step)
        got, expected = ours.update(k, v), theirs.update(k, v)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # Rows leave, padding columns are cut, as `RunningBatch.keep` does; then decoding goes on.
    for layer in (ours, theirs):
        layer.batch_select_indices(torch.tensor([2, 0]))
        layer.keys = layer.keys[:, :, 3:, :]
        layer.values = layer.values[:, :, 3:, :]
    for step in range(40):
        k, v = columns(2, 1, 100 + step)
        got, expected = ours.update(k, v), theirs.update(k, v)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert ours.get_seq_length() == theirs.get_seq_length() == 16 - 3 + 40


def test_a_decode_step_writes_in_place():
    layer = GrowingLayer()
    layer.update(*columns(2, 100, 0))
    buffers = {layer._k.data_ptr()}
    for step in range(20):
        layer.update(*columns(2, 1, step))
        buffers.add(layer._k.data_ptr())
    assert len(buffers) == 1  # room for 25 more columns was made at the prefill: no copy in 20 steps

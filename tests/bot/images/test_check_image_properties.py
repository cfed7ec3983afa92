"""Property: for ANY bytes, check_image returns a CheckedImage or raises an ImageError, nothing else."""

from __future__ import annotations

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bot.errors import ImageError
from bot.images.check import MAX_SIDE, CheckedImage, ImageLimits, check_image
from tests.fakes.images import small_samples

# A small pixel cap keeps each example fast when a mutation makes a header claim a large image.
LIMITS = ImageLimits(max_pixels=2_000_000)
SEEDS = small_samples()

PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def assert_contract(data: bytes) -> None:
    try:
        result = check_image(data, LIMITS)
    except ImageError as err:
        assert err.user_message and len(err.user_message) <= 80
        return
    assert isinstance(result, CheckedImage)
    assert result.image.mode == "RGB"
    assert max(result.width, result.height) <= MAX_SIDE
    with Image.open(io.BytesIO(result.data)) as again:
        again.load()
        assert again.size == (result.width, result.height)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid small file of an accepted format with bytes flipped, cut, inserted or its header fuzzed."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "header"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        else:
            # Headers hold sizes, counts and offsets: the fields parsers trust most.
            header_pos = draw(st.integers(0, min(40, len(data) - 1)))
            data[header_pos] = draw(st.integers(0, 255))
    return bytes(data)


@PROPERTY_SETTINGS
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data: bytes) -> None:
    assert_contract(data)


@PROPERTY_SETTINGS
@given(st.sampled_from(sorted(SEEDS)).map(SEEDS.__getitem__), st.binary(max_size=2048))
def test_valid_signature_then_garbage(seed: bytes, tail: bytes) -> None:
    # Known magic bytes followed by anything: reaches the format parsers, not just the detector.
    assert_contract(seed[:16] + tail)


@PROPERTY_SETTINGS
@given(mutated())
def test_mutated_valid_files(data: bytes) -> None:
    assert_contract(data)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seeds_are_accepted(name: str) -> None:
    # The mutation seeds must themselves pass, or the property would only ever see refusals.
    assert isinstance(check_image(SEEDS[name], LIMITS), CheckedImage)

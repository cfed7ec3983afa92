"""Checking untrusted image bytes: type by content, bounded bytes and pixels, first frame, re-encoded."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    """Largest file accepted, before decoding."""
    max_pixels: int = 40_000_000
    """Largest width x height accepted (decompression bombs are refused before decoding)."""
    max_count: int = 4
    """Most images taken from one message."""
    timeout_s: float = 10.0
    """Longest a download may take, connect to last byte."""

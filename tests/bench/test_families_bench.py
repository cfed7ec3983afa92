"""`python -m bench.families` runs end to end at tiny size and prints its JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_families_bench_prints_a_row_per_architecture() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "bench.families", "--requests", "3", "--new-tokens", "6",
                           "--skip-256m"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {row["architecture"]: row for row in report["families"]}
    assert set(rows) == {"idefics2", "idefics3", "smolvlm"}
    for row in rows.values():
        assert row["tokens"] == 18
        assert row["one_at_a_time_tokens_per_s"] > 0 and row["batched_tokens_per_s"] > 0
    assert "batched x3" in proc.stderr


def test_smolvlm_256m_config_has_its_size() -> None:
    """The benchmark's random SmolVLM-256M is that model's size (counted on the meta device: no memory)."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    from bench.families import SMOLVLM_256M_SCALE_FACTOR, SMOLVLM_256M_TEXT, SMOLVLM_256M_VISION

    config = Idefics3Config(text_config=dict(SMOLVLM_256M_TEXT), vision_config=dict(SMOLVLM_256M_VISION),
                            scale_factor=SMOLVLM_256M_SCALE_FACTOR, tie_word_embeddings=False)
    with torch.device("meta"):
        model = Idefics3ForConditionalGeneration(config)
    parameters = sum(p.numel() for p in model.parameters())
    assert 240e6 < parameters < 270e6, parameters

"""`python -m bench.executor` runs end to end on the tiny model and prints its JSON report (small sizes here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_executor_bench_prints_every_figure() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.executor", "--requests", "4", "--max-batch-size", "2",
         "--long-tokens", "24", "--repeats", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("sequential_tokens_per_s", "dynamic_tokens_per_s", "continuous_tokens_per_s",
                "ttft_static_s", "ttft_continuous_s"):
        assert report[key] > 0, key
    # Greedy answers do not depend on how requests were batched.
    assert report["continuous_equals_dynamic"] is True
    assert set(report["targets_met"]) == {"continuous_at_least_dynamic", "continuous_at_least_4x_sequential",
                                          "ttft_at_most_one_fifth"}

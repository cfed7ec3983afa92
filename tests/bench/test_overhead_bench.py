"""bench/overhead.py runs end to end at tiny sizes and ends with its JSON report (so the bench cannot rot).

The figures themselves are timings and are not judged here; `tests/storage/test_flat_message_work.py` checks
flatness without a clock.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_prints_the_report_last() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.overhead", "--sizes", "10,50", "--messages", "5",
                           "--warmup", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])

    assert set(report["p50_ms"]) == set(report["p95_ms"]) == set(report["steps_p50_ms"]) == {"10", "50"}
    assert all(value > 0 for value in [*report["p50_ms"].values(), *report["p95_ms"].values()])
    assert report["ratio_p50_50_vs_10"] > 0 and isinstance(report["target_met"], bool)
    assert set(report["steps_p50_ms"]["50"]) == {"settings", "record", "prompt", "answer"}
    assert [line.split(":")[0].split("=")[1].strip() for line in lines[:-1]] == ["10", "50"]  # one line per size


def test_bad_sizes_are_refused_in_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.overhead", "--sizes", "ten"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--sizes" in proc.stderr and proc.stdout == ""

"""bench/gpu.py: its CPU check mode (`--small --cpu`) runs our engine end to end and prints the JSON report;
without a GPU it refuses in one line with status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NO_CUDA = "bench/gpu.py needs a CUDA GPU; none found (use --small --cpu to check the script on CPU)"


def run(*args: str, hide_gpus: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, "-m", "bench.gpu", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def report(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def small_report() -> dict:
    return report(run("--small", "--cpu"))


def test_small_cpu_run_reports_every_figure(small_report: dict) -> None:
    r = small_report
    for key in ("tokens_per_s", "decode_tokens_per_s", "ttft_s", "bandwidth_gb_s", "weight_bytes_per_step",
                "ceiling_tokens_per_s_batch1", "batch1_vs_ceiling", "targets_met", "device", "dtype", "config"):
        assert key in r, key
    assert set(r["tokens_per_s"]) == set(r["decode_tokens_per_s"]) == set(r["ttft_s"]) == {"1", "2"}
    for table in ("tokens_per_s", "decode_tokens_per_s", "ttft_s"):
        assert all(v > 0 for v in r[table].values()), (table, r[table])
    for key in ("bandwidth_gb_s", "weight_bytes_per_step", "ceiling_tokens_per_s_batch1", "batch1_vs_ceiling"):
        assert r[key] > 0, key
    assert r["device"] == "cpu" and r["dtype"] == "bfloat16" and r["config"]
    assert set(r["targets_met"]) == {"batch1_vs_ceiling", "batch32_tokens_per_s"}
    assert isinstance(r["targets_met"]["batch1_vs_ceiling"], bool)
    assert r["targets_met"]["batch32_tokens_per_s"] is None  # batch 32 is not run by --small
    assert r["partial"] is False and not r["errors"] and not r["skipped_batch_sizes"]


def test_every_row_generates_the_full_count(small_report: dict) -> None:
    new_tokens = small_report["new_tokens"]
    assert small_report["generated_tokens"] == {"1": new_tokens, "2": 2 * new_tokens}


def test_ceiling_counts_the_weights_a_decode_step_reads(small_report: dict) -> None:
    parts = small_report["weight_bytes_breakdown"]
    counted = parts["decoder_layers"] + parts["gated_cross_attn_layers"] + parts["final_norm"] + parts["lm_head"]
    assert small_report["weight_bytes_per_step"] == counted
    assert parts["not_read_vision_model"] > 0 and parts["not_read_perceiver"] > 0 and parts["other"] == 0
    ceiling = small_report["bandwidth_gb_s"] * 1e9 / counted
    assert small_report["ceiling_tokens_per_s_batch1"] == pytest.approx(ceiling, rel=0.01)


def test_spent_budget_still_prints_a_partial_report() -> None:
    r = report(run("--small", "--cpu", "--budget", "0"))
    assert r["partial"] is True and r["skipped_batch_sizes"] == [1, 2]
    assert r["tokens_per_s"] == {} and r["batch1_vs_ceiling"] is None
    assert r["targets_met"] == {"batch1_vs_ceiling": None, "batch32_tokens_per_s": None}


def test_without_cuda_it_refuses_in_one_line() -> None:
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on GPU machines too.
    proc = run(hide_gpus=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == NO_CUDA
    assert proc.stdout == ""


def test_cpu_needs_small() -> None:
    proc = run("--cpu", hide_gpus=True)
    assert proc.returncode == 2
    assert "--cpu needs --small" in proc.stderr and "Traceback" not in proc.stderr

"""The CPU part of ``nox -s perf`` in a reduced form (CI budget), and the CUDA skip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "perf_suite.py"


def run_suite(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SUITE), *args], capture_output=True, text=True, timeout=timeout,
        cwd=ROOT, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_quick_cpu_suite_against_head(tmp_path) -> None:
    report, baselines = tmp_path / "perf.json", tmp_path / "baselines"
    proc = run_suite(
        "--quick", "--device", "cpu", "--against", "HEAD", "--cases", "router.dynamic,layer.static",
        "--budget", "1.5", "--json", str(report), "--baseline-dir", str(baselines),
        "--update-baseline",
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 1 only for a real regression
    data = json.loads(report.read_text())
    cases = {c["case"]: c for c in data["sections"]["perf"]["cases"]}
    assert set(cases) == {"router.dynamic", "layer.static"}
    for case in cases.values():
        assert case["status"] == "measured"
        assert case["comparison"]["decision"]["verdict"] in (
            "pass",
            "regression",
            "improvement",
            "inconclusive",
        )
        assert case["gates"]["ops"] > 0
    stored = json.loads((baselines / "cpu.json").read_text())
    assert stored["schema"] == "moe-devkit-perf-baseline"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on machines without GPU")
def test_cuda_suite_reports_skip_without_gpu() -> None:
    proc = run_suite("--device", "cuda", timeout=30)
    assert proc.returncode == 77
    assert "SKIPPED" in proc.stdout


def test_unknown_case_is_a_usage_error() -> None:
    proc = run_suite("--cases", "nope", "--against", "none", timeout=30)
    assert proc.returncode == 2

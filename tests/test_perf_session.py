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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--budget", "-1"], "argument --budget: expected a finite positive number; got '-1'"),
        (["--min-effect", "2"], "--min-effect must be in [0, 1); got 2.0"),
        (["--threads", "-3"], "argument --threads: expected a non-negative integer; got '-3'"),
        (["--json", "BLOCKER/x.json"], "--json 'BLOCKER/x.json' cannot be created: 'BLOCKER'"),
        (
            ["--baseline-dir", "BLOCKER/b", "--update-baseline"],
            "--baseline-dir 'BLOCKER/b/cpu.json' cannot be created: 'BLOCKER' is a file",
        ),
        (["--baseline-dir", "CORRUPT"], "--baseline-dir: CORRUPT/cpu.json: not valid JSON"),
        (["--cases", "nope"], "--cases: unknown case(s) ['nope']"),
    ],
)
def test_bad_options_fail_in_seconds_before_any_timing(
    argv: list[str], message: str, tmp_path: Path
) -> None:
    """A bad option is one line naming it, exit 2, before the suite times anything (which
    takes minutes): not a traceback at the end of the run, with the timings lost."""
    blocker, corrupt = tmp_path / "a-file", tmp_path / "corrupt"
    blocker.write_text("not a directory")
    corrupt.mkdir()
    (corrupt / "cpu.json").write_text("{not json")
    paths = {"BLOCKER": str(blocker), "CORRUPT": str(corrupt)}
    for key, path in paths.items():
        argv = [a.replace(key, path) for a in argv]
        message = message.replace(key, path)
    json_out = [] if "--json" in argv else ["--json", str(tmp_path / "r.json")]
    proc = run_suite("--against", "none", "--quick", *json_out, *argv, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = " ".join(proc.stderr.split())
    assert f"perf_suite.py: error: {message}" in err
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "measured" not in proc.stdout and not (tmp_path / "r.json").exists()

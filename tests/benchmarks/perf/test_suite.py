"""The CPU part of ``nox -s perf`` in a reduced form (CI budget), the CUDA skip, and the
option checks before any timing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from perf.store import ENVIRONMENT_FIELDS

from moe_devkit.diagnostics.regression import VERDICTS

ROOT = Path(__file__).resolve().parents[3]
SUITE = ROOT / "benchmarks" / "perf_suite.py"


def run_suite(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SUITE), *args], capture_output=True, text=True, timeout=timeout,
        cwd=ROOT, check=False,
    )  # fmt: skip


def _tree_is_head() -> bool:
    """Whether the working tree's package is HEAD's (always so in a fresh clone, as in CI)."""
    proc = subprocess.run(
        ["git", "diff", "--quiet", "HEAD", "--", "moe_devkit"], cwd=ROOT, check=False,
        capture_output=True,
    )  # fmt: skip
    return proc.returncode == 0


@pytest.mark.slow
def test_quick_cpu_suite_against_head(tmp_path: Path) -> None:
    """Identical code: no case may end as a regression or an improvement (a difference is
    measured again by fresh workers before it stands), the gates count the same on both
    sides, and the report holds what the docs promise. Under load a case may end
    inconclusive: that is the suite's honest answer on a busy machine, not a failure."""
    identical = _tree_is_head()
    report, baselines = tmp_path / "perf.json", tmp_path / "baselines"
    proc = run_suite(
        "--quick", "--device", "cpu", "--against", "HEAD", "--cases", "router.dynamic,layer.static",
        "--budget", "1.5", "--json", str(report), "--baseline-dir", str(baselines),
        "--update-baseline",
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    perf = json.loads(report.read_text())["sections"]["perf"]
    assert (perf["device"], perf["against"], perf["quick"]) == ("cpu", "HEAD", True)
    assert set(perf["environment"]) == set(ENVIRONMENT_FIELDS)
    cases = {c["case"]: c for c in perf["cases"]}
    assert list(cases) == ["router.dynamic", "layer.static"]
    for name, case in cases.items():
        assert case["status"] == "measured", case
        _check_measured_case(case)
        if identical:
            assert case["comparison"]["decision"]["verdict"] in ("pass", "inconclusive"), case
            gates = {g["gate"]: g for g in case["gate_results"]}
            assert gates["ops"]["baseline"] == gates["ops"]["candidate"] > 0, name
            assert gates["flops"]["baseline"] == gates["flops"]["candidate"] > 0, name
    assert proc.returncode == (1 if perf["regressions"] else 0), output
    if identical:
        assert perf["regressions"] == [] and proc.returncode == 0, output
    stored = json.loads((baselines / "cpu.json").read_text())
    assert stored["schema"] == "moe-devkit-perf-baseline"
    (entry,) = stored["entries"].values()
    for name, body in entry["cases"].items():
        assert body["gates"] == cases[name]["gates"]
        assert body["wall"] > 0 and body["cpu"] > 0


def _check_measured_case(case: dict[str, Any]) -> None:
    """One case's row: gates, the comparison with its raw samples and decision, page faults
    of each side, and the core both workers ran on."""
    assert case["gates"]["ops"] > 0 and case["gates"]["flops"] > 0
    assert case["gates"]["host_syncs"] is None  # counted on CUDA only
    assert {g["gate"] for g in case["gate_results"]} == {"ops", "flops", "host_syncs",
                                                         "memory_growth"}  # fmt: skip
    comparison, decision = case["comparison"], case["comparison"]["decision"]
    samples = comparison["baseline_samples"]
    assert len(samples) == len(comparison["candidate_samples"]) > 0
    assert decision["pairs"] + decision["sliced"] == len(samples)
    for sample in samples + comparison["candidate_samples"]:
        assert sample["wall"] > 0 and sample["cpu"] > 0 and sample["number"] >= 1
    assert decision["verdict"] in VERDICTS and decision["reason"]
    if decision["verdict"] != "inconclusive":  # decided on enough clean pairs
        assert decision["pairs"] >= 10
        values = [decision[k] for k in ("ratio", "ci_low", "ci_high")]
        assert all(math.isfinite(v) and v > 0 for v in values), decision
        assert decision["ci_low"] <= decision["ratio"] <= decision["ci_high"], decision
    if "first_comparison" in case:  # a difference that fresh workers measured again
        assert case["first_comparison"]["decision"]["verdict"] in ("regression", "improvement")
    assert set(case["page_faults"]) == {"baseline", "candidate"}
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) > 1:
        assert case["placement"]["cpu"] in os.sched_getaffinity(0)
        assert case["placement"]["moves"] >= 0


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

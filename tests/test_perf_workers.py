"""The perf suite's two sides run under the same conditions: one command line and one
environment for both workers (but the tree each imports), the same warm-up before the first
measured pair, and no page faults in a worker's steady state (glibc's allocator would
otherwise map buffers afresh on some calls of one worker and not of the other)."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from moe_devkit.diagnostics import perf_worker
from moe_devkit.diagnostics.perf_ab import ABSchedule, compare_interleaved
from moe_devkit.diagnostics.perf_samples import Sample
from moe_devkit.diagnostics.perf_worker import ALLOCATOR_ENV, WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import perf_runner  # noqa: E402
import perf_suite  # noqa: E402


class _FakePopen:
    """Records the command line and environment of each worker it is asked to start."""

    started: ClassVar[list[tuple[list[str], dict[str, str]]]] = []

    def __init__(self, argv: list[str], **kwargs: Any) -> None:
        self.started.append((list(argv), dict(kwargs["env"])))
        self.stdin = self.stdout = None

    def poll(self) -> int:
        return 0


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], dict[str, str]]]:
    monkeypatch.setattr(perf_worker.subprocess, "Popen", _FakePopen)
    monkeypatch.setattr(_FakePopen, "started", [])
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    return _FakePopen.started


@pytest.mark.parametrize("threads", ["1", "2", "0"])
def test_both_workers_get_one_command_line_and_one_environment(
    started: list[tuple[list[str], dict[str, str]]], threads: str, tmp_path: Path
) -> None:
    args = perf_suite.build_parser().parse_args(["--device", "cpu", "--threads", threads])
    perf_runner.start_workers(args, tmp_path / "baseline")
    (cand_argv, cand_env), (base_argv, base_env) = started
    assert cand_argv == base_argv
    assert cand_env.pop("PYTHONPATH") == os.pathsep.join([str(ROOT), "/somewhere/else"])
    assert base_env.pop("PYTHONPATH") == os.pathsep.join(
        [str(tmp_path / "baseline"), "/somewhere/else"]
    )
    assert cand_env == base_env


def test_every_worker_gets_the_allocator_settings(
    started: list[tuple[list[str], dict[str, str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")  # a caller's own setting is replaced
    WorkerProcess("worker.py", "/tree/a")
    WorkerProcess("worker.py", "/tree/b", env={"EXTRA": "1"})
    (_, env_a), (_, env_b) = started
    assert {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} <= set(ALLOCATOR_ENV)
    for name, value in ALLOCATOR_ENV.items():
        assert env_a[name] == env_b[name] == value
    assert env_b["EXTRA"] == "1"


def test_both_sides_are_warmed_up_alike() -> None:
    """Calls each side gets before its first measured sample: warm-up, then the calls of
    calibration (made on the baseline) repeated on the candidate."""
    calls = {"b": 0, "c": 0}
    now = [0.0]

    def sampler(name: str) -> Any:
        def sample(number: int) -> Sample:
            calls[name] += number
            now[0] += 1e-3 * number
            return Sample(1e-3, 1e-3, number)

        return sample

    comp = compare_interleaved(
        "case", sampler("b"), sampler("c"), timer=lambda: now[0],
        schedule=ABSchedule(target_sample_s=0.037, pairs=20, warmup=2),
    )  # fmt: skip
    measured = comp.number * len(comp.baseline_samples)
    assert len(comp.baseline_samples) == len(comp.candidate_samples) == 20
    assert calls["b"] - measured == calls["c"] - measured > comp.number + 2


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
@pytest.mark.parametrize("case", ["layer.static", "model"])
def test_a_worker_in_its_steady_state_does_not_page_fault(case: str) -> None:
    """As the suite runs a case (setup, gates, warm-up), then the page faults per call of
    the sampling thread: without the allocator settings a fresh worker faulted 400-2400
    pages a call on these cases (its buffers mapped anew), with them about none."""
    args = perf_suite.build_parser().parse_args(["--device", "cpu"])
    with WorkerProcess(perf_runner.SCRIPT, ROOT, perf_runner._worker_args(args)) as worker:
        worker.request({"op": "setup", "case": case})
        worker.request({"op": "gates", "case": case})
        for _ in range(3):
            worker.request({"op": "sample", "case": case, "number": 1})
        faults = [
            worker.request({"op": "sample", "case": case, "number": 5})["faults"] for _ in range(7)
        ]
    assert statistics.median(faults) < 16, faults  # a rare sample grows Python's own heap

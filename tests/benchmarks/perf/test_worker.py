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
from perf import runner, suite
from perf import worker as perf_worker
from perf.worker import ALLOCATOR_ENV, WorkerProcess

from moe_devkit.diagnostics.regression import ABSchedule, Sample, compare_interleaved

ROOT = Path(__file__).resolve().parents[3]


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
    args = suite.build_parser().parse_args(["--device", "cpu", "--threads", threads])
    runner.start_workers(args, tmp_path / "baseline")
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
    args = suite.build_parser().parse_args(["--device", "cpu"])
    with WorkerProcess(runner.SCRIPT, ROOT, runner._worker_args(args)) as worker:
        worker.request({"op": "setup", "case": case})
        worker.request({"op": "gates", "case": case})
        for _ in range(3):
            worker.request({"op": "sample", "case": case, "number": 1})
        faults = [
            worker.request({"op": "sample", "case": case, "number": 5})["faults"] for _ in range(7)
        ]
    assert statistics.median(faults) < 16, faults  # a rare sample grows Python's own heap


# ----------------------------------------------------------------------------- placement

STAT = """cpu  500 0 200 9000 10 0 5 0 0 0
cpu0 100 0 50 4500 5 0 2 3 7 0
cpu1 400 0 150 4500 5 0 3 0 0 0
intr 12345
"""


def test_cpu_ticks_count_steal_as_busy_and_io_wait_as_idle() -> None:
    ticks = perf_worker.parse_cpu_ticks(STAT)
    assert ticks == {0: (100 + 50 + 2 + 3, 4660), 1: (400 + 150 + 3, 5058)}  # guest not again


def _ticks(*frames: dict[int, tuple[int, int]]) -> Any:
    it = iter(frames)
    return lambda: next(it)


def test_quietest_cpu_picks_the_least_busy_and_keeps_a_near_tie() -> None:
    start = {0: (0, 0), 1: (0, 0), 2: (0, 0)}
    window = {0: (25, 25), 1: (2, 25), 2: (4, 25)}  # cpu 0 busy, 1 and 2 nearly idle
    pick = perf_worker.quietest_cpu
    assert pick([0, 1, 2], read=_ticks(start, window), sleep=lambda s: None) == 1
    # cpu 2 is within the margin of the quietest: the workers stay where they are
    assert pick([0, 1, 2], prefer=2, read=_ticks(start, window), sleep=lambda s: None) == 2
    assert pick([0, 1, 2], prefer=0, read=_ticks(start, window), sleep=lambda s: None) == 1
    # only the allowed cpus count, and no /proc/stat means no choice
    assert pick([0, 2], read=_ticks(start, window), sleep=lambda s: None) == 2
    assert pick([0, 1], read=_ticks(None, None), sleep=lambda s: None) is None


needs_two_cpus = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2
    or not os.path.exists("/proc/stat"),
    reason="needs Linux affinity, /proc/stat and two cpus",
)  # fmt: skip

BUSY = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass\n"


@needs_two_cpus
def test_quietest_cpu_sees_a_busy_loop_on_a_cpu() -> None:
    """A process spinning on one cpu makes that cpu busy in the window: placement never
    picks it while another cpu is free of it."""
    import subprocess

    cpus = sorted(os.sched_getaffinity(0))
    busy_cpu = cpus[-1]
    proc = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        os.sched_setaffinity(proc.pid, {busy_cpu})
        ticks: list[Any] = []

        def read() -> Any:
            ticks.append(perf_worker.read_cpu_ticks())
            return ticks[-1]

        chosen = perf_worker.quietest_cpu(cpus, prefer=busy_cpu, window_s=0.5, read=read)
        (b0, t0), (b1, t1) = ticks[0][busy_cpu], ticks[1][busy_cpu]
        assert (b1 - b0) / (t1 - t0) > 0.8  # the loop's cpu was seen busy
        assert chosen != busy_cpu or all(
            (ticks[1][c][0] - ticks[0][c][0]) / max(1, ticks[1][c][1] - ticks[0][c][1]) > 0.7
            for c in cpus
        )  # moved away, unless every cpu was as busy (other users of a shared machine)
    finally:
        proc.kill()
        proc.wait()


class _PinnedWorker:
    def __init__(self) -> None:
        self.cpus: list[int] = []

    def pin(self, cpu: int) -> None:
        self.cpus.append(cpu)


def test_core_placement_moves_both_workers_together() -> None:
    choices = iter([3, 3, 0])
    a, b = _PinnedWorker(), _PinnedWorker()
    placement = perf_worker.CorePlacement(
        [a, b],
        cpus=[0, 3],
        quietest=lambda cpus, **kw: next(choices),  # type: ignore[list-item]
    )
    assert placement.cpu == 3 and a.cpus == b.cpus == [3]  # the last cpu to begin with
    placement.settle()
    placement.settle()
    assert placement.moves == 0 and a.cpus == [3]
    placement.settle()
    assert placement.cpu == 0 and placement.moves == 1 and a.cpus == b.cpus == [3, 0]


@needs_two_cpus
def test_a_worker_is_pinned_whole(tmp_path: Path) -> None:
    """``WorkerProcess.pin`` moves every thread of a real worker process."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import sys, threading\n"
        "threading.Thread(target=sys.stdin.readline, daemon=True).start()\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    worker = WorkerProcess(script, tmp_path)
    try:
        assert worker.proc.stdout is not None and worker.proc.stdout.readline() == "ready\n"
        cpu = sorted(os.sched_getaffinity(0))[0]
        worker.pin(cpu)
        tids = [int(t) for t in os.listdir(f"/proc/{worker.proc.pid}/task")]
        assert len(tids) == 2
        assert all(os.sched_getaffinity(t) == {cpu} for t in tids)
    finally:
        worker.proc.kill()
        worker.proc.wait()


def test_settle_runs_before_warm_up_and_before_each_further_attempt() -> None:
    events: list[str] = []
    now = [0.0]

    def sampler(name: str) -> Any:
        def sample(number: int) -> Sample:
            events.append(name)
            now[0] += 1e-3 * number
            return Sample(1e-3 * 2.0, 1e-3, number)  # always time-sliced: inconclusive

        return sample

    comp = compare_interleaved(
        "case", sampler("b"), sampler("c"), timer=lambda: now[0],
        schedule=ABSchedule(target_sample_s=0.002, pairs=4, warmup=1, max_attempts=3),
        settle=lambda: events.append("settle"),
    )  # fmt: skip
    assert comp.attempts == 3 and comp.decision.verdict == "inconclusive"
    assert events[0] == "settle" and events.count("settle") == 3
    # the further settles fall between attempts: after a whole attempt of 4 pairs
    gaps = [i for i, e in enumerate(events) if e == "settle"]
    assert all(events[g - 8 : g].count("b") == 4 for g in gaps[1:])

"""The benchmark scripts: a bad option is one usage line and exit 2, before any work.

Each case runs a script in a subprocess with one bad argument (a count below its minimum, a
float out of range, CUDA where there is none, a --json or --out that cannot be written) and
checks the exit code, that one line names the option and the value received, that no
traceback is printed and, as every case must fail before the benchmark's work (seconds to
minutes), that it failed fast and wrote nothing. The subprocesses (about 2 s each, mostly
importing torch) run a few at a time, started when the first case asks for its result.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
HAS_CUDA = torch.cuda.is_available()
HAS_JAX = importlib.util.find_spec("jax") is not None
FAST_S = 30.0  # the benchmarks run for seconds to minutes; a usage error takes ~2 s
BLOCKER = "BLOCKER"  # replaced by a regular file in the case's own directory


@dataclass(frozen=True)
class Case:
    """``script`` run with ``argv`` exits with ``code``, one output line holding ``expect``."""

    id: str
    script: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]
    code: int = 2
    no_cuda: bool = False  # the case is about a machine without CUDA
    jax: bool = False  # the script imports JAX

    def runnable(self) -> bool:
        return not (self.no_cuda and HAS_CUDA) and not (self.jax and not HAS_JAX)


def usage(script: str, argv: tuple[str, ...], *expect: str, **kw: bool) -> Case:
    """A usage error: ``script.py: error: ...`` holding each of ``expect``."""
    name = f"{script}.py"
    flag = argv[0].removeprefix("--")
    return Case(f"{script}-{flag}", name, argv, (f"{name}: error: ", *expect), **kw)


def positive(script: str, flag: str, value: str, **kw: bool) -> Case:
    """A count given as ``value`` where argparse's positive_int type wants >= 1."""
    expect = f"argument {flag}: expected a positive integer; got {value!r}"
    return usage(script, (flag, value), expect, **kw)


def no_cuda(script: str) -> Case:
    expect = "--device 'cuda': torch sees no CUDA device"
    return usage(script, ("--device", "cuda"), expect, no_cuda=True)


def unwritable(script: str, flag: str = "--json", **kw: bool) -> Case:
    """An output path under a regular file: it cannot be created, and says so at once."""
    path = f"{BLOCKER}/{'out' if flag == '--out' else 'x.json'}"
    expect = f"{flag} '{path}' cannot be created: '{BLOCKER}' is a file"
    return usage(script, (flag, path), expect, **kw)


CASES = [
    positive("bench_moe_layer", "--reps", "0"),
    positive("bench_moe_layer", "--window", "-1"),
    usage(
        "bench_moe_layer",
        ("--target-mean-k", "9"),
        "--target-mean-k must be in [1, 4]",
        "got 9.0",
    ),
    no_cuda("bench_moe_layer"),
    unwritable("bench_moe_layer"),
    positive("bench_inspector", "--window", "0"),
    unwritable("bench_inspector"),
    positive("bench_training_overhead", "--blocks", "0"),
    positive("bench_training_overhead", "--log-every", "0"),
    unwritable("bench_training_overhead"),
    positive("bench_trace_recording", "--reps", "0"),
    positive("bench_trace_recording", "--steps", "0"),
    positive("bench_trace_recording", "--threads", "-1"),
    no_cuda("bench_trace_recording"),
    unwritable("bench_trace_recording"),
    positive("bench_training", "--reps", "0"),
    usage("bench_training", ("--mean-k", "2,9"), "--mean-k must be in [1, 8]", "got 9.0"),
    usage(
        "bench_training",
        ("--groups", "layers"),
        "--groups: expected layer, model or layer,model",
        "got 'layers'",
    ),
    usage(
        "bench_training",
        ("--check-sync",),
        "--check-sync needs a CUDA --device",
        "got --device 'cpu'",
    ),
    no_cuda("bench_training"),
    unwritable("bench_training"),
    positive("bench_check_debug", "--repeat", "0"),
    usage(
        "bench_check_debug",
        ("--corpus", BLOCKER),
        f"--corpus: expected a directory of .py files; got '{BLOCKER}'",
    ),
    positive("bench_detector", "--pairs", "0"),
    usage("bench_detector", ("--min-effect", "1.5"), "--min-effect must be in [0, 1); got 1.5"),
    unwritable("bench_detector"),
    positive("bench_dispatch_gpu", "--iterations", "0"),
    unwritable("bench_dispatch_gpu", "--out"),
    Case(
        "bench_dispatch_gpu-skip",
        "bench_dispatch_gpu.py",
        (),
        ("SKIPPED: no CUDA device",),
        code=77,
        no_cuda=True,
    ),
    positive("bench_expert_gemm", "--reps", "0"),
    unwritable("bench_expert_gemm"),
    Case(
        "bench_expert_gemm-no-gpu",
        "bench_expert_gemm.py",
        (),
        ("bench_expert_gemm: needs a Hopper GPU",),
        code=1,
        no_cuda=True,
    ),
    usage(
        "bench_grouped_gemm",
        ("--padding", "100", "--m", "100"),
        "--padding must be in [0, --m) = [0, 100); got 100",
    ),
    unwritable("bench_grouped_gemm"),
    Case(
        "bench_grouped_gemm-no-gpu",
        "bench_grouped_gemm.py",
        (),
        ("needs a CUDA device and Triton",),
        no_cuda=True,
    ),
    positive("bench_gradients", "--repeats", "0"),
    no_cuda("bench_gradients"),
    usage(
        "bench_numerics_guard",
        ("--tokens", "100"),
        "--tokens must be a multiple of 128",
        "got 100",
    ),
    no_cuda("bench_numerics_guard"),
    positive("bench_utilization", "--seed-tokens", "0"),
    unwritable("bench_utilization"),
    usage("bench_jax_router", ("--rounds", "1"), "--rounds must be >= 2", "got 1", jax=True),
    unwritable("bench_jax_router", jax=True),
    positive("bench_perf_gate", "--runs", "0"),
    usage(
        "bench_perf_gate",
        ("--busy-cpu", "4096"),
        "--busy-cpu: expected one of this process's cpus",
        "got 4096",
    ),
    unwritable("bench_perf_gate"),
    usage(
        "run_distributed",
        ("--timeout", "0"),
        "argument --timeout: expected a finite positive number; got '0'",
    ),
    unwritable("run_distributed"),
]


def _param(case: Case) -> object:
    marks = []
    if case.no_cuda:
        marks.append(pytest.mark.skipif(HAS_CUDA, reason="checks a machine without CUDA"))
    if case.jax:
        marks.append(pytest.mark.skipif(not HAS_JAX, reason="needs the jax extra"))
    return pytest.param(case, id=case.id, marks=marks)


@dataclass(frozen=True)
class Outcome:
    code: int
    output: str  # stdout and stderr
    elapsed: float
    folder: Path  # the case's directory: BLOCKER and nothing else, unless it wrote


def _run(case: Case, folder: Path) -> Outcome:
    blocker = folder / "a-file"
    blocker.write_text("a regular file, not a directory\n")
    argv = [arg.replace(BLOCKER, str(blocker)) for arg in case.argv]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / case.script), *argv],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    output = (proc.stdout + proc.stderr).replace(str(blocker), BLOCKER)
    return Outcome(proc.returncode, output, elapsed, folder)


@pytest.fixture(scope="module")
def outcomes(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[Outcome]]]:
    """Starts every selected, runnable case at once (a few processes at a time)."""
    selected = {
        item.callspec.id
        for item in request.session.items
        if getattr(item, "module", None) is request.module and hasattr(item, "callspec")
    }
    workers = max(2, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            case.id: pool.submit(_run, case, tmp_path_factory.mktemp(case.id))
            for case in CASES
            if case.id in selected and case.runnable()
        }
        yield futures
        for future in futures.values():
            future.cancel()


def test_cases_name_existing_scripts() -> None:
    assert {case.script for case in CASES} <= {path.name for path in BENCHMARKS.glob("*.py")}


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_bad_argument_fails_fast_with_one_line(
    case: Case, outcomes: dict[str, Future[Outcome]]
) -> None:
    outcome = outcomes[case.id].result()
    assert outcome.code == case.code, outcome.output
    lines = [line for line in outcome.output.splitlines() if all(e in line for e in case.expect)]
    assert lines, f"no line holds {case.expect}:\n{outcome.output}"
    assert "Traceback" not in outcome.output
    assert outcome.elapsed < FAST_S, f"took {outcome.elapsed:.1f} s: it did work first"
    written = sorted(p.name for p in outcome.folder.iterdir())
    assert written == ["a-file"], written
    assert (outcome.folder / "a-file").read_text() == "a regular file, not a directory\n"

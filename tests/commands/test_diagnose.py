"""``moe-devkit diagnose``: the tables, the report, progress in a pipe, the verdict, and its
usage errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moe_devkit.cli import main


def test_diagnose_prints_utilization_and_k_histogram(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", "--steps", "2", "--batch", "2", "--seq", "16"]) == 0
    out = capsys.readouterr().out
    assert "Expert utilization" in out
    assert "Experts per token (k)" in out
    assert "mean" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["diagnose", "--min-k", "5"], "min_k must be <= max_k; got min_k=5, max_k=4"),
        (["diagnose", "--max-k", "40"], "max_k must be <= num_experts; got max_k=40"),
        (["diagnose", "--steps", "0"], "expected a positive integer; got '0'"),
        (["diagnose", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err
    assert "Traceback" not in err


SMALL_MODEL = ["--hidden-size", "16", "--layers", "1", "--device", "cpu"]


def _diagnose_in_a_pipe(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "moe_devkit", "diagnose", *SMALL_MODEL, *argv]
    return subprocess.run(
        [*command, "--out", str(tmp_path)], capture_output=True, text=True, timeout=120
    )


def test_diagnose_in_a_pipe_prints_progress_lines_and_a_verdict(tmp_path: Path) -> None:
    """Stdout is not a terminal: progress is plain lines (no bar), and the run ends with
    what was run and the verdict."""
    proc = _diagnose_in_a_pipe(tmp_path, "--steps", "20", "--batch", "2", "--seq", "8")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    progress = [line for line in lines if line.startswith("routing: ")]
    assert progress[0] == "routing: 0/20 steps"
    assert [line.split(" (")[0] for line in progress[1:]] == [
        f"routing: {step}/20 steps" for step in range(2, 21, 2)
    ]
    assert progress[-1].startswith("routing: 20/20 steps (100%), ")
    assert lines.index(progress[-1]) < lines.index(next(x for x in lines if "Expert util" in x))
    ran = next(line for line in lines if line.startswith("ran: "))
    for part in ("torch reference model", "1 layer", "20 steps", "320 tokens", "cpu", "float32"):
        assert part in ran
    assert lines[-1] == "verdict: no alarms"
    assert "\x1b[" not in proc.stdout and "━" not in "".join(progress)


def test_diagnose_verdict_lists_the_findings_last(tmp_path: Path) -> None:
    """64 experts and 4 tokens: one expert holds a quarter of the load, 60 are dead."""
    argv = ["--steps", "1", "--batch", "1", "--seq", "4", "--num-experts", "64", "--max-k", "1"]
    proc = _diagnose_in_a_pipe(tmp_path, *argv)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    verdict = lines.index("verdict: 1 error, 1 warning")
    assert lines[verdict - 1].startswith("ran: torch reference model")
    assert lines[verdict + 1].startswith("  error: layers.0.moe.router: expert ")
    assert lines[verdict + 2].startswith("  warning: layers.0.moe.router: 60 of 64 experts")
    assert len(lines) == verdict + 3

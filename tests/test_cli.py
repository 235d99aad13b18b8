"""The moe-devkit command line: the main job runs, mistakes give one line and exit 2."""

from __future__ import annotations

import subprocess
import sys

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


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "diagnose" in capsys.readouterr().out


def test_module_entry_point_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "moe_devkit", "--version"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("moe-devkit ")


def test_import_is_lazy() -> None:
    code = (
        "import sys, moe_devkit, moe_devkit.cli;"
        "heavy = [m for m in ('torch', 'jax', 'matplotlib') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""

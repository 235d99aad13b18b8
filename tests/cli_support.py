"""What the tests of ``moe-devkit`` share: the real process, its one-line usage error, and a
reference model small enough for a training command to run in a second."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# min_k < max_k: dynamic routing, with padding rows in the experts' grouped matmul
TINY = ["--hidden-size", "16", "--num-experts", "4", "--min-k", "1", "--max-k", "2"]
TINY += ["--layers", "2", "--batch", "2", "--seq", "4", "--device", "cpu"]


def moe_devkit(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Runs ``python -m moe_devkit ARGS`` in ``cwd``."""
    command = [sys.executable, "-m", "moe_devkit", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def assert_one_line_usage_error(proc: subprocess.CompletedProcess[str], prog: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n"), proc.stderr
    assert proc.stderr.startswith(f"{prog}: error: "), proc.stderr

"""The import contracts of pyproject.toml's [tool.importlinter] hold: the layers (a module
imports only from its own layer or below, lazily inside a function included), check-debug
without torch, JAX, numpy, rich or matplotlib, and no import cycle in the package.

``lint-imports`` comes with the dev extra, in the environment that runs the tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_import_contracts_are_kept() -> None:
    done = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr

"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``, ``nox -s perf``.

Session virtualenvs are reused, so torch is installed once per session, not on every run.
Torch comes from the constraints file named by MOE_DEVKIT_CONSTRAINTS (default: the CPU
wheel pin in constraints/torch-cpu.txt); set MOE_DEVKIT_CONSTRAINTS="" to let pip keep or
pick your own torch build.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = False

CONSTRAINTS = os.environ.get("MOE_DEVKIT_CONSTRAINTS", "constraints/torch-cpu.txt")


def install_project(session: nox.Session, extras: str) -> None:
    """Installs the project (editable) with extras, under the torch constraints if any."""
    args = ["-c", CONSTRAINTS] if CONSTRAINTS else []
    session.install(*args, "-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """Runs the test suite (GPU tests are skipped where CUDA is absent)."""
    install_project(session, "torch,dev")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Runs ruff (lint and format check), the project's own check-debug hook and the import
    contracts of pyproject.toml (lint-imports: layers, check-debug's imports, no cycles)."""
    session.install("ruff>=0.6", "libcst>=1.1", "import-linter>=2.1")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("python", "scripts/check_debug.py", "moe_devkit")
    session.run("lint-imports", "--no-cache")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Runs mypy --strict on the package and the perf suite's harness (benchmarks/perf)."""
    install_project(session, "torch,dev")
    session.run("mypy")


PERF_SYSTEM_ENV = "MOE_DEVKIT_PERF_SYSTEM_PYTHON"


def _cuda_available(session: nox.Session) -> tuple[bool, str]:
    """Whether the session's torch sees a GPU, and why not."""
    code = (
        "import torch; ok = torch.cuda.is_available(); "
        "print('yes' if ok else "
        "f'no: torch {torch.__version__} (cuda {torch.version.cuda}) sees no GPU')"
    )
    out = session.run("python", "-c", code, silent=True) or ""
    line = str(out).strip().splitlines()[-1] if str(out).strip() else "no: torch check failed"
    return line == "yes", line.removeprefix("no: ")


@nox.session
@nox.parametrize("device", ["cpu", "cuda"])
def perf(session: nox.Session, device: str) -> None:
    """Performance-regression suite (benchmarks/perf_suite.py); CUDA skipped where no GPU.

    ``nox -s perf -- --against main`` picks the baseline revision (default HEAD);
    ``-- --update-baseline`` rewrites benchmarks/baselines/<device>.json. On a machine
    without internet (the GPU machine) run with the machine's own torch:
    ``nox --no-venv -s "perf(device='cuda')"`` or set MOE_DEVKIT_PERF_SYSTEM_PYTHON=1
    (the project must then be importable, e.g. ``pip install --no-deps -e .``).
    """
    system = session.venv_backend == "none" or os.environ.get(PERF_SYSTEM_ENV) == "1"
    if not system:
        install_project(session, "torch")
    ok, reason = _cuda_available(session) if device == "cuda" else (True, "")
    if not ok:
        session.skip(f"perf(device='cuda'): {reason}")
    session.run(
        "python", "benchmarks/perf_suite.py", "--device", device, *session.posargs,
        env={"PYTHONPATH": os.getcwd()} if system else {},
    )  # fmt: skip

"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``.

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
    """Runs ruff (lint and format check) and the project's own check-debug hook."""
    session.install("ruff>=0.6", "libcst>=1.1")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("python", "scripts/check_debug.py", "moe_devkit")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Runs mypy --strict on the package."""
    install_project(session, "torch,dev")
    session.run("mypy")

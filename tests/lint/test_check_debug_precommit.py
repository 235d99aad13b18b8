"""pre-commit runs the hook on a temporary repository: it fails on a leftover breakpoint(),
then passes once `--fix` removed it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRE_COMMIT = [sys.executable, "-m", "pre_commit"]


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def make_repo(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    git(path, "init", "-q")
    git(path, "config", "user.email", "test@example.invalid")
    git(path, "config", "user.name", "test")
    git(path, "add", ".")
    git(path, "commit", "-q", "-m", "init")
    return path


def pre_commit(cwd: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PRE_COMMIT_HOME=str(home), PRE_COMMIT_COLOR="never")
    return subprocess.run(
        [*PRE_COMMIT, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )


LEFTOVER = {"pkg/model.py": "def forward(x):\n    breakpoint()\n    return x\n"}
FIXED = "def forward(x):\n    return x\n"
FINDING = "pkg/model.py:2:5: DBG003 `breakpoint()` left in code"


def assert_fails_then_passes_after_fix(repo: Path, home: Path) -> None:
    failed = pre_commit(repo, home, "run", "--all-files")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert FINDING in failed.stdout
    fixing = pre_commit(repo, home, "run", "--all-files", "--config", "fix.yaml")
    assert fixing.returncode == 1, fixing.stdout + fixing.stderr  # it changed a file
    assert (repo / "pkg/model.py").read_text() == FIXED
    passed = pre_commit(repo, home, "run", "--all-files")
    assert passed.returncode == 0, passed.stdout + passed.stderr


def test_local_hook_fails_then_passes_after_fix(tmp_path: Path) -> None:
    """This repository's own setup: a local `language: system` hook running the script."""
    hook = (
        "repos:\n- repo: local\n  hooks:\n  - id: check-debug\n    name: check-debug\n"
        f"    entry: {sys.executable} {ROOT / 'scripts' / 'check_debug.py'}\n"
        "    language: system\n    files: \\.py$\n"
    )
    configs = {".pre-commit-config.yaml": hook, "fix.yaml": hook + "    args: [--fix]\n"}
    repo = make_repo(tmp_path / "project", {**LEFTOVER, **configs})
    assert_fails_then_passes_after_fix(repo, tmp_path / "home")


def test_local_hook_fix_keeps_prints_unless_unsafe_fixes(tmp_path: Path) -> None:
    hook = (
        "repos:\n- repo: local\n  hooks:\n  - id: check-debug\n    name: check-debug\n"
        f"    entry: {sys.executable} {ROOT / 'scripts' / 'check_debug.py'}\n"
        "    language: system\n    files: \\.py$\n"
    )
    configs = {
        "fix.yaml": hook + "    args: [--fix]\n",
        "unsafe.yaml": hook + "    args: [--fix, --unsafe-fixes]\n",
    }
    source = {"pkg/model.py": "def forward(x):\n    print(x)\n    breakpoint()\n    return x\n"}
    repo = make_repo(tmp_path / "project", {**source, **configs})
    fixing = pre_commit(repo, tmp_path / "home", "run", "--all-files", "--config", "fix.yaml")
    assert fixing.returncode == 1, fixing.stdout + fixing.stderr
    assert "pkg/model.py:2:5: DBG101 `print()` in library code" in fixing.stdout
    assert "add --unsafe-fixes to remove them" in fixing.stdout
    assert (repo / "pkg/model.py").read_text() == "def forward(x):\n    print(x)\n    return x\n"
    unsafe = pre_commit(repo, tmp_path / "home", "run", "--all-files", "--config", "unsafe.yaml")
    assert unsafe.returncode == 1, unsafe.stdout + unsafe.stderr
    assert (repo / "pkg/model.py").read_text() == FIXED


def hook_repository(path: Path) -> tuple[Path, str]:
    """A committed copy of this checkout's installable parts (pre-commit clones commits)."""
    path.mkdir()
    for name in ("pyproject.toml", "README.md", ".pre-commit-hooks.yaml", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, path / name)
    shutil.copytree(
        ROOT / "moe_devkit", path / "moe_devkit", ignore=shutil.ignore_patterns("__pycache__")
    )
    if not (path / "README.md").exists():
        (path / "README.md").write_text("moe-devkit\n")
    make_repo(path, {})
    rev = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=path, check=True, capture_output=True, text=True
    ).stdout.strip()
    return path, rev


@pytest.mark.slow
def test_published_hook_fails_then_passes_after_fix(tmp_path: Path) -> None:
    """Other repositories' setup (as `pre-commit try-repo` does): the published hook,
    installed by pre-commit into its own environment, without torch."""
    hooks, rev = hook_repository(tmp_path / "hooks")
    hook = f"repos:\n- repo: {hooks}\n  rev: {rev}\n  hooks:\n  - id: check-debug\n"
    configs = {".pre-commit-config.yaml": hook, "fix.yaml": hook + "    args: [--fix]\n"}
    repo = make_repo(tmp_path / "project", {**LEFTOVER, **configs})
    home = tmp_path / "home"
    assert_fails_then_passes_after_fix(repo, home)
    assert list(home.glob("repo*/py_env-*/lib/python*/site-packages/torch")) == []

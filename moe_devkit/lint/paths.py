"""Which files to check: the paths given (directories walked), or the repository's files."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from moe_devkit.lint.config import Settings

SKIP_DIRS = frozenset(
    {".git", ".hg", ".venv", "venv", ".nox", ".tox", "__pycache__", "build", "dist"}
)
PYTHON_SUFFIXES = (".py", ".pyi")
# Tracked files plus untracked ones that are not ignored: what `git add` would commit.
GIT_LS_FILES = ("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard")


class PathError(ValueError):
    """No files to check can be found; the CLI reports it and exits 2."""


def missing_paths(paths: Iterable[str]) -> list[str]:
    """Return the given paths that do not exist (a dangling symlink counts as missing)."""
    return [path for path in paths if not os.path.exists(path)]


def repository_files(directory: str = ".") -> list[str]:
    """Return the Python files git tracks or would add under `directory`, relative to it.

    Raises:
        PathError: when git is missing or `directory` is not inside a git work tree.
    """
    import subprocess  # only without paths: the hook always passes them

    command = [*GIT_LS_FILES, "--", *(f"*{suffix}" for suffix in PYTHON_SUFFIXES)]
    try:
        listed = subprocess.run(command, cwd=directory, capture_output=True, check=False)
    except OSError as err:
        raise PathError(f"no paths given, and git cannot be run to list them: {err}") from None
    if listed.returncode != 0:
        reason = os.fsdecode(listed.stderr).strip().splitlines() or ["git ls-files failed"]
        raise PathError(
            f"no paths given, and git cannot list the files of {os.path.abspath(directory)} "
            f"({reason[0]}); pass the files or directories to check"
        )
    names = {os.fsdecode(name) for name in listed.stdout.split(b"\0") if name}
    # A tracked file deleted from the work tree is still listed.
    return sorted(n for n in names if os.path.isfile(os.path.join(directory, n)))


def iter_python_files(paths: Iterable[str], settings: Settings) -> Iterator[str]:
    """Yield the files to check: files as given, directories' `.py` files; minus excludes."""
    seen: set[str] = set()
    for path in _expand(paths, settings):
        key = os.path.normpath(path)
        if key not in seen:
            seen.add(key)
            yield path


def _expand(paths: Iterable[str], settings: Settings) -> Iterator[str]:
    for path in paths:
        if os.path.isdir(path):
            for directory, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
                for name in sorted(files):
                    if name.endswith(PYTHON_SUFFIXES):
                        full = os.path.join(directory, name)
                        if not settings.excluded(settings.relative(full)):
                            yield full
        elif not settings.excluded(settings.relative(path)):
            yield path

"""What the subcommands, the CLI and the benchmark scripts share: the usage error, argparse
types and the checks of output paths.

A ``UsageError`` is a user's mistake: the CLI prints it as one line and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "UsageError",
    "check_output",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "writing",
]


class UsageError(Exception):
    """A mistake in the command line or its environment; printed as one line, exit 2."""


def _int_at_least(text: str, low: int, kind: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {kind}; got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "a non-negative integer")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number; got {text!r}")
    return value


def check_output(
    path: str | os.PathLike[str], *, directory: bool, flag: str = "--out", create: bool = True
) -> None:
    """Raises UsageError now, before any work runs, when ``path`` could not be written later.

    ``directory``: the option names a directory that will hold files, else one file. With
    ``create`` the directory (or the file's parent) is then made and a probe file created
    in it and removed, so that what the checks cannot see (a file system that refuses
    writes, even to root) also shows before the work.
    """
    target = Path(path)
    name = f"{flag} {str(target)!r}"
    if directory and target.exists() and not target.is_dir():
        raise UsageError(f"{flag} must be a directory; {str(target)!r} is a file")
    if not directory and target.is_dir():
        raise UsageError(f"{flag} must be a file path; {str(target)!r} is a directory")
    existing = target if directory else target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{name} cannot be created: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{name} cannot be written: {str(existing)!r} is read-only")
    if not directory and target.exists() and not os.access(target, os.W_OK):
        raise UsageError(f"{name} cannot be written: the file is read-only")
    if create:
        folder = target if directory else target.parent
        with writing(target, flag):
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".moe-devkit-probe.", dir=folder)
            os.close(fd)
            os.unlink(probe)


@contextlib.contextmanager
def writing(path: str | os.PathLike[str], flag: str = "--out") -> Iterator[None]:
    """Turns an OSError while writing the output at ``path`` into a UsageError naming ``flag``
    (what ``check_output`` cannot foresee: a full disk, a mount gone read-only)."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UsageError(f"{flag} {str(path)!r} cannot be written: {reason}") from None

"""What the subcommands, the CLI and the benchmark scripts share: the ``Command`` each
subcommand module declares, the usage error, argparse types and the checks of output paths.

A ``UsageError`` is a user's mistake: the CLI prints it as one line and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console  # the core install has no rich

__all__ = [
    "DIAGNOSTICS_MODULES",
    "Command",
    "UsageError",
    "check_output",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "writing",
]


# What the diagnostics commands import beside torch or JAX; the core install (the check-debug
# hook's) has none of them, and the extras bring them.
DIAGNOSTICS_MODULES = ("numpy", "rich", "matplotlib")


class UsageError(Exception):
    """A mistake in the command line or its environment; printed as one line, exit 2."""


@dataclass(frozen=True)
class Command:
    """A subcommand of ``moe-devkit``: its name, its help line, the function declaring its
    options and the function running it (``run(args, console)`` returns the exit code).

    A command module's top level imports only argparse and this package's light modules, so
    that ``moe-devkit --help`` imports neither torch, numpy, rich nor matplotlib; ``run``
    imports what the work needs. ``needs``: the modules the command imports that the core
    install lacks; ``extra``: the extra that installs them.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Console], int]
    extra: str = "torch"
    needs: tuple[str, ...] = DIAGNOSTICS_MODULES

    def missing(self) -> list[str]:
        """The modules of ``needs`` that are not installed (found without importing them)."""
        return [name for name in self.needs if importlib.util.find_spec(name) is None]

    def missing_error(self) -> str | None:
        """One line naming the missing modules and the extra to install, or None."""
        missing = self.missing()
        if not missing:
            return None
        names = " and ".join([", ".join(missing[:-1]), missing[-1]] if missing[1:] else missing)
        install = f"pip install 'moe-devkit[{self.extra}]'"
        return f"this command needs {names}, not installed here: `{install}`"


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
        raise argparse.ArgumentTypeError(f"expected a positive number; got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number; got {text!r}")
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

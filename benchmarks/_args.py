"""Argument checks shared by the benchmark scripts: a bad option is one usage line, exit 2.

The argparse types (``positive_int``, ``non_negative_int`` and ``positive_float``, those of
the ``moe-devkit`` commands in ``moe_devkit.commands.common``) make argparse itself print
``script: error: argument --reps: expected a positive integer; got '0'``; the ``check_*``
functions run after parsing, before any work, and end in ``parser.error``.
"""

from __future__ import annotations

import argparse
import os

from moe_devkit.commands.common import (
    UsageError,
    check_output,
    non_negative_int,
    positive_float,
    positive_int,
)

__all__ = [
    "check_device",
    "check_output_path",
    "check_range",
    "cpu_model",
    "non_negative_int",
    "positive_float",
    "positive_int",
]


def check_range(
    parser: argparse.ArgumentParser,
    flag: str,
    value: float,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    why: str = "",
) -> None:
    """Exits with a usage error unless ``low <= value <= high`` (``<`` where open); NaN fails.

    ``why`` is appended to the allowed range, e.g. " (the preset's max_k is 4)".
    """
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        parser.error(f"{flag} must be in {interval}{why}; got {value}")


def check_device(parser: argparse.ArgumentParser, text: str, flag: str = "--device") -> None:
    """Exits with a usage error unless ``text`` names a device torch can use here
    (cpu, an available cuda or cuda:N with N below the device count, ...)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        parser.error(f"{flag}: expected a torch device such as cpu, cuda or cuda:0; got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"{flag} {text!r}: torch sees no CUDA device on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            parser.error(f"{flag} {text!r}: no such device; torch sees {count} CUDA device(s)")
    elif device.type != "cpu":
        available = getattr(getattr(torch, device.type, None), "is_available", None)
        if callable(available) and not available():
            parser.error(f"{flag} {text!r}: torch sees no {device.type} device on this machine")


def check_output_path(
    parser: argparse.ArgumentParser,
    path: str | os.PathLike[str] | None,
    flag: str = "--json",
    *,
    directory: bool = False,
) -> None:
    """Exits with a usage error now, before the run, when ``path`` could not be written at
    its end (``moe_devkit.commands.common.check_output``: parent created and probed).
    None: no output."""
    if path is None:
        return
    if not str(path):
        parser.error(f"{flag}: expected a {'directory' if directory else 'file'} path; got ''")
    try:
        check_output(path, directory=directory, flag=flag)
    except UsageError as exc:
        parser.error(str(exc))


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), for a benchmark's header."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if "model name" in line)
    except (OSError, StopIteration):
        pass
    return cpu

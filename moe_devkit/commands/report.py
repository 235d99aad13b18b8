"""``moe-devkit report report.json``: re-render the PNG and HTML of a stored report."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from moe_devkit.commands.common import (
    DIAGNOSTICS_MODULES,
    Command,
    UsageError,
    check_output,
    writing,
)

if TYPE_CHECKING:
    from rich.console import Console


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the options of ``moe-devkit report``."""
    parser.add_argument("report", help="a report.json written by diagnose or an inspector")
    parser.add_argument("--out", help="output directory (default: the report's directory)")


def run(args: argparse.Namespace, console: Console) -> int:
    """Renders routing_analysis.png and report.html; exit 2 for a missing or bad file."""
    from moe_devkit.inspect.report import render_report

    if not Path(args.report).is_file():
        raise UsageError(f"report file {args.report!r} does not exist")
    if not os.access(args.report, os.R_OK):  # else its read error would pass for a write error
        raise UsageError(f"report file {args.report!r} cannot be read")
    out = args.out if args.out else str(Path(args.report).parent)
    flag = "--out" if args.out else "output directory"
    check_output(out, directory=True, flag=flag)
    try:
        with writing(out, flag):
            paths = render_report(args.report, args.out)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"report file {args.report!r} cannot be rendered: {exc}") from None
    console.print(f"rendered: {paths.png}  {paths.html}", highlight=False)
    return 0


COMMAND = Command(
    "report",
    "re-render routing_analysis.png and report.html from a stored report.json",
    add_arguments,
    run,
    needs=(*DIAGNOSTICS_MODULES, "torch"),  # moe_devkit.inspect imports torch
)

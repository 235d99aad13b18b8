"""``moe-devkit report report.json``: re-render the PNG and HTML of a stored report."""

from __future__ import annotations

import argparse

from rich.console import Console

from moe_devkit.cli import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the options of ``moe-devkit report``."""
    parser.add_argument("report", help="a report.json written by diagnose or an inspector")
    parser.add_argument("--out", help="output directory (default: the report's directory)")


def run(args: argparse.Namespace, console: Console) -> int:
    """Renders routing_analysis.png and report.html; exit 2 for a missing or bad file."""
    from moe_devkit.inspect.report import render_report

    try:
        paths = render_report(args.report, args.out)
    except FileNotFoundError:
        raise UsageError(f"report file {args.report!r} does not exist") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"report file {args.report!r} cannot be rendered: {exc}") from None
    console.print(f"rendered: {paths.png}  {paths.html}", highlight=False)
    return 0

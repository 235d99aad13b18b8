"""``moe-devkit check-debug``: the check-debug hook as a subcommand (flags passed through)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console  # the hook's install has no rich


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the pass-through arguments (the hook parses its own flags)."""
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of check-debug")


def run(args: argparse.Namespace, console: Console) -> int:
    """Runs the checker on the given arguments; returns its exit code."""
    from moe_devkit.lint import main

    return int(main(list(args.args)))

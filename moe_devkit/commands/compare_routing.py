"""``moe-devkit compare-routing A.npz B.npz``: how the routing of two traces of one model
differs, token by token and layer by layer (``inspect.trace.compare_traces``)."""

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

    from moe_devkit.inspect.trace import RoutingTrace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the options of ``moe-devkit compare_routing``."""
    parser.add_argument("trace_a", metavar="A", help="a routing trace (.npz) of one run")
    parser.add_argument("trace_b", metavar="B", help="a routing trace (.npz) of the other run")
    parser.add_argument(
        "--out",
        default="routing_comparison",
        help="output directory for routing_comparison.json and .html (default: routing_comparison)",
    )


def _load(path: str) -> RoutingTrace:
    from moe_devkit.inspect.trace import RoutingTrace

    if not Path(path).is_file():
        raise UsageError(f"trace file {path!r} does not exist")
    if not os.access(path, os.R_OK):
        raise UsageError(f"trace file {path!r} cannot be read")
    try:
        return RoutingTrace.load(path)
    except ValueError as exc:
        raise UsageError(f"trace file {path!r} cannot be read: {exc}") from None


def run(args: argparse.Namespace, console: Console) -> int:
    """Writes the comparison; exit 2 for a missing or bad trace, or traces that do not
    align (nothing is written then)."""
    from moe_devkit.inspect.trace import compare_traces, write_comparison

    a, b = _load(args.trace_a), _load(args.trace_b)
    try:
        comparison = compare_traces(a, b)
    except ValueError as exc:
        raise UsageError(f"the traces cannot be compared: {exc}") from None
    check_output(args.out, directory=True)
    with writing(args.out):
        json_path, html_path = write_comparison(
            comparison, args.out, sources=(args.trace_a, args.trace_b)
        )
    worst = max(comparison.layers, key=lambda layer: layer.set_differs)
    console.print(
        f"{comparison.tokens_compared} tokens compared; differ in at least one layer: "
        f"{comparison.any_layer_differs:.4f}; most: {worst.layer} ({worst.set_differs:.4f})",
        highlight=False,
    )
    console.print(f"written: {json_path}  {html_path}", highlight=False)
    return 0


COMMAND = Command(
    "compare-routing",
    "compare two routing traces of one model (.npz): per-layer expert-set differences",
    add_arguments,
    run,
    needs=(*DIAGNOSTICS_MODULES, "torch"),  # moe_devkit.inspect imports torch
)

"""``moe-devkit compare-routing A.npz B.npz``: how the routing of two traces of one model
differs, token by token and layer by layer (``inspect.trace.compare_traces``).

Exit codes, as the other diagnostics commands: 0 when no layer's expert set differs for more
than ``--tolerance`` of the aligned tokens, 1 when one does (a ``routing-differs`` finding
per such layer, in the report and on the console), 2 for a user error (nothing written)."""

from __future__ import annotations

import argparse
import math
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
        "--tolerance",
        type=fraction,
        default=0.0,
        metavar="FRACTION",
        help="a layer differs when its expert set differs for more than this fraction of the "
        "aligned tokens (0 to 1; default 0: any difference)",
    )
    parser.add_argument(
        "--out",
        default="routing_comparison",
        help="output directory for routing_comparison.json and .html (default: routing_comparison)",
    )


def fraction(text: str) -> float:
    """argparse type: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1; got {text!r}")
    return value


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
    """Writes the comparison; exit 0 when no layer differs beyond ``--tolerance``, 1 when
    one does, 2 for a missing or bad trace, or traces that do not align (nothing is written
    then)."""
    from moe_devkit.commands._verdict import print_verdict
    from moe_devkit.inspect.trace import compare_traces, write_comparison

    a, b = _load(args.trace_a), _load(args.trace_b)
    try:
        comparison = compare_traces(a, b)
    except ValueError as exc:
        raise UsageError(f"the traces cannot be compared: {exc}") from None
    check_output(args.out, directory=True)
    with writing(args.out):
        json_path, html_path = write_comparison(
            comparison, args.out, sources=(args.trace_a, args.trace_b), tolerance=args.tolerance
        )
    worst = max(comparison.layers, key=lambda layer: layer.set_differs)
    console.print(
        f"{comparison.tokens_compared} tokens compared; differ in at least one layer: "
        f"{comparison.any_layer_differs:.4f}; most: {worst.layer} ({worst.set_differs:.4f})",
        highlight=False,
    )
    console.print(f"written: {json_path}  {html_path}", highlight=False)
    findings = comparison.findings(args.tolerance)
    print_verdict(console, findings)
    return 1 if findings else 0


COMMAND = Command(
    "compare-routing",
    "compare two routing traces of one model (.npz): per-layer expert-set differences",
    add_arguments,
    run,
    needs=(*DIAGNOSTICS_MODULES, "torch"),  # moe_devkit.inspect imports torch
)

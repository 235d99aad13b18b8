"""``moe-devkit compare-routing A B``: how the routing of two traces of one model differs,
token by token and layer by layer (``inspect.trace.compare_traces``), from this package's
``.npz`` traces or the records of vLLM and Megatron-LM (``inspect.trace_readers``); with an
sglang expert-distribution dump on either side, the per-layer expert loads are compared
instead (``compare_counts``).

Exit codes, as the other diagnostics commands: 0 when no layer differs beyond
``--tolerance``, 1 when one does (a finding per such layer, in the report and on the
console), 2 for a user error (nothing written)."""

from __future__ import annotations

import argparse
import math
import os
import re
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
    from moe_devkit.inspect.trace_readers import ExpertCounts

# inspect.trace_readers.FORMATS, repeated here so that --help imports neither numpy nor torch
FORMAT_CHOICES = ("auto", "moe-devkit", "vllm", "megatron", "sglang")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the options of ``moe-devkit compare-routing``."""
    parser.add_argument("trace_a", metavar="A", help="the routing record of one run")
    parser.add_argument("trace_b", metavar="B", help="the routing record of the other run")
    for side in ("a", "b"):
        parser.add_argument(
            f"--format-{side}",
            choices=FORMAT_CHOICES,
            default="auto",
            help=f"the format of {side.upper()} (default auto: from the file's name and content)",
        )
    parser.add_argument(
        "--num-experts",
        type=experts_list,
        default=None,
        metavar="E[,E...]",
        help="experts per MoE layer (one number for all, or one per layer), for records "
        "that do not say it (vLLM's arrays)",
    )
    parser.add_argument(
        "--tolerance",
        type=fraction,
        default=0.0,
        metavar="FRACTION",
        help="a layer differs when its expert set differs for more than this fraction of the "
        "aligned tokens (for counts: its load shares by more than this total variation; "
        "0 to 1; default 0: any difference)",
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


def experts_list(text: str) -> list[int]:
    """argparse type: ``8`` or ``8,8,16``: positive integers."""
    if not re.fullmatch(r"\s*[1-9]\d*(\s*,\s*[1-9]\d*)*\s*", text):
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or a comma-separated list of them; got {text!r}"
        )
    return [int(part) for part in text.split(",")]


def _read(path: str, format: str, experts: list[int] | None) -> RoutingTrace | ExpertCounts:
    from moe_devkit.inspect.trace_readers import detect_format, read_sglang, read_trace

    if not Path(path).is_file():
        raise UsageError(f"trace file {path!r} does not exist")
    if not os.access(path, os.R_OK):
        raise UsageError(f"trace file {path!r} cannot be read")
    try:
        kind = detect_format(path) if format == "auto" else format
        if kind == "sglang":
            return read_sglang(path)
        num: int | list[int] | None = experts
        if experts is not None and len(experts) == 1:
            num = experts[0]
        return read_trace(path, kind, num_experts=num)
    except ValueError as exc:
        text = str(exc)
        if "needs num_experts" in text:
            text += " (pass --num-experts)"
        raise UsageError(f"trace file {path!r} cannot be read: {text}") from None


def _align_names(a: RoutingTrace | ExpertCounts, b: RoutingTrace | ExpertCounts) -> None:
    """A side whose layers are only numbered (``layers.0``, ...: vLLM, Megatron, sglang) takes
    the other side's names when the two have as many layers and share no name."""
    from moe_devkit.inspect.trace_readers import default_layer_names

    if set(a.layers) & set(b.layers) or len(a.layers) != len(b.layers):
        return
    if a.layers == default_layer_names(len(a.layers)):
        a.layers = list(b.layers)
    elif b.layers == default_layer_names(len(b.layers)):
        b.layers = list(a.layers)


def run(args: argparse.Namespace, console: Console) -> int:
    """Writes the comparison; exit 0 when no layer differs beyond ``--tolerance``, 1 when
    one does, 2 for a missing or bad file, or records that do not align (nothing is
    written then)."""
    from moe_devkit.commands._verdict import print_verdict
    from moe_devkit.inspect.trace import RoutingTrace, compare_traces, write_comparison
    from moe_devkit.inspect.trace_readers import (
        ExpertCounts,
        compare_counts,
        write_count_comparison,
    )

    a = _read(args.trace_a, args.format_a, args.num_experts)
    b = _read(args.trace_b, args.format_b, args.num_experts)
    _align_names(a, b)
    sources = (args.trace_a, args.trace_b)
    if isinstance(a, RoutingTrace) and isinstance(b, RoutingTrace):
        try:
            comparison = compare_traces(a, b)
        except ValueError as exc:
            raise UsageError(f"the traces cannot be compared: {exc}") from None
        check_output(args.out, directory=True)
        with writing(args.out):
            json_path, html_path = write_comparison(
                comparison, args.out, sources=sources, tolerance=args.tolerance
            )
        worst = max(comparison.layers, key=lambda layer: layer.set_differs)
        console.print(
            f"{comparison.tokens_compared} tokens compared; differ in at least one layer: "
            f"{comparison.any_layer_differs:.4f}; most: {worst.layer} ({worst.set_differs:.4f})",
            highlight=False,
        )
        console.print(f"written: {json_path}  {html_path}", highlight=False)
        findings = comparison.findings(args.tolerance)
    else:
        counts_a = a if isinstance(a, ExpertCounts) else ExpertCounts.from_trace(a)
        counts_b = b if isinstance(b, ExpertCounts) else ExpertCounts.from_trace(b)
        try:
            counted = compare_counts(counts_a, counts_b)
        except ValueError as exc:
            raise UsageError(f"the expert counts cannot be compared: {exc}") from None
        check_output(args.out, directory=True)
        with writing(args.out):
            path = write_count_comparison(
                counted, args.out, sources=sources, tolerance=args.tolerance
            )
        worst_counts = max(counted.layers, key=lambda layer: layer.total_variation)
        console.print(
            f"expert loads of {len(counted.layers)} layers compared (an sglang dump holds "
            f"counts, not tokens); largest total variation: {worst_counts.layer} "
            f"({worst_counts.total_variation:.4f})",
            highlight=False,
        )
        console.print(f"written: {path}", highlight=False)
        findings = counted.findings(args.tolerance)
    print_verdict(console, findings)
    return 1 if findings else 0


COMMAND = Command(
    "compare-routing",
    "compare the routing of two runs of one model (moe-devkit .npz traces, vLLM, Megatron-LM "
    "or sglang records): per-layer expert-set or load differences",
    add_arguments,
    run,
    needs=(*DIAGNOSTICS_MODULES, "torch"),  # moe_devkit.inspect imports torch
)

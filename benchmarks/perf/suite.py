"""The performance-regression suite's command line (``python benchmarks/perf_suite.py``).

Each case is timed in two worker processes, the working tree (candidate) and a git revision
exported side by side (baseline, ``--against``, default HEAD), started alike (one command
line, one environment but for the tree, ``perf.worker.ALLOCATOR_ENV``) and sampled
alternately; the decision is ``moe_devkit.diagnostics.regression.compare_interleaved``
(paired, significance AND minimum effect, time-sliced samples set aside). The deterministic
gates (operators, FLOPs, CUDA host syncs, memory growth) are compared between the two sides
as well. Stored baselines (benchmarks/baselines/<device>.json, keyed by device and versions)
are checked whole before any timing, shown as a trend and rewritten only with
``--update-baseline``.

Exit codes: 0 no regression, 1 a confirmed regression, 2 usage error (a stored baseline
that is not a valid baseline file included), 77 skipped (CUDA asked for where none exists).

This module checks the options before any timing; ``perf.runner`` runs the cases.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from _args import check_output_path, check_range, non_negative_int, positive_float

from perf.cases import CASES
from perf.store import BaselineStore

ROOT = Path(__file__).resolve().parent.parent.parent
SKIP_EXIT = 77


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="moe-devkit performance-regression suite")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--against", default="HEAD", help="baseline git revision, or 'none'")
    parser.add_argument("--quick", action="store_true", help="reduced sizes and budget (CI)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases")
    parser.add_argument(
        "--budget", type=positive_float, help="seconds per case (default 20, quick 4)"
    )
    parser.add_argument("--min-effect", type=float, default=0.05)
    parser.add_argument("--update-baseline", action="store_true")
    parser.add_argument("--baseline-dir", type=Path, default=ROOT / "benchmarks" / "baselines")
    parser.add_argument("--json", type=Path, help="report path (default build/perf/DEVICE.json)")
    parser.add_argument(
        "--threads", type=non_negative_int, default=1, help="torch threads on CPU (0: keep)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Checks the options, runs the suite; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)  # logs keep whole tables
    if args.device == "cuda" and not torch.cuda.is_available():
        console.print("[yellow]SKIPPED[/]: perf(device='cuda'): torch sees no CUDA device")
        return SKIP_EXIT
    check_args(parser, args)  # before minutes of timing, not after
    from moe_devkit.commands.common import UsageError
    from perf.runner import run_suite

    try:
        result: int = run_suite(args, console)
    except UsageError as exc:  # a write that failed at the end (a full disk)
        console.print(f"perf_suite: error: {exc}", highlight=False)
        return 2
    return result


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits with a usage line for an option the run would trip over; sets the default
    --json path and opens the stored baseline (``args.baseline_store``)."""
    unknown = sorted(set(args.cases.split(",")) - set(CASES))
    if unknown:
        parser.error(f"--cases: unknown case(s) {unknown}; known: {list(CASES)}")
    check_range(parser, "--min-effect", args.min_effect, 0, 1, high_open=True)
    args.json = args.json or ROOT / "build" / "perf" / f"{args.device}.json"
    check_output_path(parser, args.json, "--json")
    baseline = args.baseline_dir / f"{args.device}.json"
    if args.update_baseline:
        check_output_path(parser, baseline, "--baseline-dir")
    args.baseline_store = open_baseline(parser, baseline, args.device)


def open_baseline(parser: argparse.ArgumentParser, path: Path, device: str) -> BaselineStore:
    """The stored baseline, checked whole now, before minutes of timing; a bad file is one
    line on stderr naming it and what is wrong, and exit 2."""
    try:
        return BaselineStore(path, device=device)
    except ValueError as exc:
        message = str(exc)
    except OSError as exc:
        message = f"{path}: cannot be read ({exc.strerror or exc})"
    print(f"{parser.prog}: error: --baseline-dir: {message}", file=sys.stderr)
    raise SystemExit(2)

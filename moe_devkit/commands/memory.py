"""``moe-devkit memory``: train the reference model for N steps and judge memory growth."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from moe_devkit.commands._training import (
    add_training_arguments,
    build_model,
    training_step,
    write_report,
)
from moe_devkit.commands.common import Command, UsageError

if TYPE_CHECKING:
    from rich.console import Console


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the options of ``moe-devkit memory``."""
    add_training_arguments(parser, steps=30)
    leak = parser.add_argument_group("leak verdict")
    leak.add_argument("--warmup", type=int, default=5, help="steps skipped before measuring")
    leak.add_argument(
        "--tolerance", type=float, default=4096.0, help="allowed growth in bytes per step"
    )
    leak.add_argument("--history", default=None, help="CUDA memory-history snapshot file")
    leak.add_argument(
        "--plant-leak", action="store_true", help="demonstration: keep a 256 KiB tensor every step"
    )


def run(args: argparse.Namespace, console: Console) -> int:
    """Runs the memory command; 0 when no leak is found, 1 when one is."""
    from rich.progress import Progress

    from moe_devkit.diagnostics.memory import MemoryTracker

    if args.warmup < 0 or args.steps < args.warmup + 3:
        raise UsageError(
            f"--steps must be >= --warmup + 3; got steps={args.steps}, warmup={args.warmup}"
        )
    if args.tolerance < 0:
        raise UsageError(f"--tolerance must be >= 0; got {args.tolerance}")
    model, device, dtype = build_model(args)
    step = training_step(model, args, device, dtype)
    kept: list[object] = []
    tracker = MemoryTracker(history_path=args.history)
    with tracker, Progress(console=console, transient=True) as progress:
        task = progress.add_task("training", total=args.steps)
        tracker.take_snapshot("Initial")
        for i in range(args.steps):
            loss = step(i)
            if args.plant_leak:  # the leak the verdict should find, on this line
                kept.append(loss.new_zeros(64 * 1024))
            tracker.take_snapshot(f"step {i}", step=i)
            progress.advance(task)
    verdict = tracker.leak_verdict(warmup=args.warmup, tolerance_bytes_per_step=args.tolerance)
    _print(console, tracker, verdict)
    if args.out:
        write_report(args, {"memory": tracker.to_dict(verdict)}, verdict.findings())
    return 1 if verdict.leaking else 0


COMMAND = Command(
    "memory",
    "train the reference model for N steps and judge memory growth (leak verdict)",
    add_arguments,
    run,
)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def _print(console: Console, tracker: object, verdict: object) -> None:
    from rich.table import Table

    from moe_devkit.diagnostics.memory import LeakVerdict, MemoryTracker

    if not isinstance(tracker, MemoryTracker) or not isinstance(verdict, LeakVerdict):
        raise TypeError("expected a MemoryTracker and a LeakVerdict")
    table = Table(title="Memory snapshots (MiB)")
    for column in ("label", "python", "python peak", "cpu tensors", "cuda alloc", "cuda peak"):
        table.add_column(column, justify="left" if column == "label" else "right")
    snapshots = tracker.snapshots
    shown = snapshots if len(snapshots) <= 12 else snapshots[:6] + snapshots[-6:]
    for s in shown:
        table.add_row(
            s.label,
            _mib(s.host_current),
            _mib(s.host_peak),
            _mib(s.tensor_bytes.get("cpu", 0)),
            _mib(s.cuda_allocated),
            _mib(s.cuda_peak),
        )
    console.print(table)
    slope = f"{verdict.slope_bytes_per_step:,.0f} bytes/step"
    if not verdict.leaking:
        console.print(f"[green]no leak: retained memory slope {slope}[/green]", highlight=False)
        return
    console.print(f"[red]leak: retained memory grows {slope}[/red]", highlight=False)
    lines = Table(title="Growing source lines")
    lines.add_column("line")
    lines.add_column("retained", justify="right")
    lines.add_column("growth", justify="right")
    for g in verdict.growing_lines:
        lines.add_row(g.location, f"{g.size:,}", f"{g.size_diff:,}")
    console.print(lines)
    if tracker.history_file is not None:
        console.print(
            f"CUDA memory history: {tracker.history_file} (open in pytorch.org/memory_viz)"
        )

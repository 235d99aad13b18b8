"""``moe-devkit gradients``: one training step of the reference model and its gradient table."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from moe_devkit.commands._training import (
    add_training_arguments,
    build_model,
    training_step,
    write_report,
)
from moe_devkit.commands._verdict import print_verdict
from moe_devkit.commands.common import Command, positive_int

if TYPE_CHECKING:
    from rich.console import Console


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the options of ``moe-devkit gradients``."""
    add_training_arguments(parser, steps=1)
    stats = parser.add_argument_group("statistics")
    stats.add_argument("--top", type=positive_int, default=10, help="parameters to list by norm")
    stats.add_argument("--vanishing", type=float, default=1e-8, help="flag norms below this")
    stats.add_argument("--exploding", type=float, default=1e3, help="flag norms above this")


def run(args: argparse.Namespace, console: Console) -> int:
    """Runs ``--steps`` training steps and reports the gradients of the last; 1 on errors."""
    from rich.table import Table

    from moe_devkit.diagnostics.gradients import collect_gradient_stats

    model, device, dtype = build_model(args)
    step = training_step(model, args, device, dtype)
    for i in range(args.steps):
        step(i)
    report = collect_gradient_stats(model).resolve(
        top_n=args.top, vanishing=args.vanishing, exploding=args.exploding
    )
    groups = Table(title=f"Gradient norm by MoE part (total {report.total_norm:.4g})")
    for column in ("part", "parameters", "elements", "norm"):
        groups.add_column(column, justify="left" if column == "part" else "right")
    for name, g in report.groups.items():
        groups.add_row(name, f"{g['parameters']:.0f}", f"{g['numel']:.0f}", f"{g['norm']:.4g}")
    console.print(groups)
    top = Table(title=f"Top {len(report.top)} parameters by gradient norm")
    for column in ("parameter", "part", "norm", "mean", "std", "max", "min"):
        top.add_column(column, justify="left" if column in ("parameter", "part") else "right")
    for p in report.top:
        cells = (f"{v:.3g}" for v in (p.norm, p.mean, p.std, p.max, p.min))
        top.add_row(p.name, p.group, *cells)
    console.print(top)
    write_report(args, {"gradients": report.to_dict()}, report.findings)
    print_verdict(console, report.findings)
    return 1 if any(f.severity == "error" for f in report.findings) else 0


COMMAND = Command(
    "gradients",
    "one training step of the reference model and its gradient statistics",
    add_arguments,
    run,
)

"""``moe-devkit diagnose``: run the reference router on a synthetic workload and report."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from moe_devkit.cli import check_output, positive_int, writing
from moe_devkit.commands._torch import (
    add_device_arguments,
    add_router_arguments,
    require_torch,
    resolve_device,
    resolve_dtype,
    router_config,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the options of ``moe-devkit diagnose``."""
    model = add_router_arguments(parser, hidden_size=256, num_experts=16, title="reference model")
    model.add_argument("--layers", type=positive_int, default=2)
    work = parser.add_argument_group("workload")
    work.add_argument("--steps", type=positive_int, default=20, help="forward passes to record")
    work.add_argument("--batch", type=positive_int, default=8)
    work.add_argument("--seq", type=positive_int, default=128)
    add_device_arguments(work)
    work.add_argument(
        "--framework",
        choices=("torch", "jax"),
        default="torch",
        help="run the PyTorch or the JAX reference model (same weights for the same seed)",
    )
    parser.add_argument(
        "--out", default="moe_devkit_report", help="directory of report.json/.png/.html"
    )


def run(args: argparse.Namespace, console: Console) -> int:
    """Runs the diagnose command; returns 0, or 1 when an error-level alarm fired."""
    require_torch()
    import torch

    from moe_devkit.inspect import RouterInspector
    from moe_devkit.routers.torch_router import MoEModel
    from moe_devkit.workloads import mixed_difficulty_batch

    config = router_config(args)
    check_output(args.out, directory=True)
    if getattr(args, "framework", "torch") == "jax":
        from moe_devkit.commands._diagnose_jax import run_jax

        return _finish(run_jax(args, config, console), args, console)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    torch.manual_seed(args.seed)
    model = MoEModel(config, num_layers=args.layers).to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(args.seed)
    with (
        torch.no_grad(),
        RouterInspector(model) as inspector,
        Progress(console=console, transient=True) as progress,
    ):
        task = progress.add_task("routing", total=args.steps)
        for _ in range(args.steps):
            batch = mixed_difficulty_batch(
                args.batch, args.seq, config.hidden_size, generator=generator
            )
            model(batch.hidden_states.to(device=device, dtype=dtype))
            progress.advance(task)
    return _finish(inspector.summary(), args, console)


def _finish(summary: Any, args: argparse.Namespace, console: Console) -> int:
    """Prints the summary, writes the report files; 1 when an error-level alarm fired."""
    print_summary(console, summary.layers, summary.findings)
    paths = write_report_files(summary, args.out, console)
    console.print(f"report: {paths.json}  {paths.png}  {paths.html}", highlight=False)
    return 1 if any(f.severity == "error" for f in summary.findings) else 0


def write_report_files(summary: Any, out: str, console: Console) -> Any:
    """Writes the three report files; a path that cannot be written is a UsageError."""
    from moe_devkit.inspect.report import write_report

    with writing(out):
        return write_report(summary, out)


def print_summary(console: Console, layers: dict[str, Any], findings: Sequence[Any]) -> None:
    """Prints the alarms, per-expert utilization and the k histogram of every layer."""
    for finding in findings:
        style = {"error": "bold red", "warning": "yellow"}.get(finding.severity, "")
        console.print(f"[{style}]{finding.severity}[/]: {escape(finding.message)}")
    names = list(layers)
    table = Table(title="Expert utilization (share of token-expert selections)")
    table.add_column("expert", justify="right")
    for name in names:
        table.add_column(escape(name), justify="right")
    for expert in range(max(layers[n]["num_experts"] for n in names)):
        cells = []
        for name in names:
            shares = layers[name]["utilization"]["shares"]
            cells.append(f"{100 * shares[expert]:5.1f}%" if expert < len(shares) else "")
        table.add_row(str(expert), *cells)
    console.print(table)
    _print_k_table(console, layers)


def _print_k_table(console: Console, layers: dict[str, Any]) -> None:
    table = Table(title="Experts per token (k)")
    table.add_column("k", justify="right")
    for name in layers:
        table.add_column(escape(name), justify="right")
    hists = [layer["k"]["histogram"] for layer in layers.values()]
    for k in range(max(len(h) for h in hists)):
        if all(k >= len(h) or h[k] == 0 for h in hists):
            continue
        cells = [f"{100 * h[k] / max(sum(h), 1):5.1f}%" if k < len(h) else "" for h in hists]
        table.add_row(str(k), *cells)
    table.add_row("mean", *[f"{layer['k']['mean']:.2f}" for layer in layers.values()], style="bold")
    table.add_row(
        "saved", *[f"{100 * layer['k']['compute_saved']:.0f}%" for layer in layers.values()]
    )
    console.print(table)

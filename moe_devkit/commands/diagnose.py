"""``moe-devkit diagnose``: run the reference router on a synthetic workload and report."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from moe_devkit.commands._torch import (
    add_device_arguments,
    add_router_arguments,
    device_name,
    require_torch,
    resolve_device,
    resolve_dtype,
    router_config,
    step_progress,
)
from moe_devkit.commands._verdict import print_verdict
from moe_devkit.commands.common import Command, check_output, positive_int, writing

if TYPE_CHECKING:
    import torch
    from rich.console import Console

    from moe_devkit.config import RouterConfig
    from moe_devkit.inspect import InspectorConfig
    from moe_devkit.inspect.report import ReportPaths
    from moe_devkit.inspect.summary import InspectorSummary


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
    from moe_devkit.inspect import InspectorConfig

    config = router_config(args)
    check_output(args.out, directory=True)
    inspector_config = InspectorConfig(window=trend_window(args.steps))
    if getattr(args, "framework", "torch") == "jax":
        from moe_devkit.commands import _diagnose_jax as jax_path

        jax_path.require_jax()
        jax_device = jax_path.resolve_jax_device(args.device)
        summary = jax_path.run_jax(args, config, jax_device, inspector_config, console)
        return _finish(summary, args, jax_path.jax_device_name(jax_device), console)
    device = resolve_device(args.device)
    summary = _run_torch(args, config, device, inspector_config, console)
    return _finish(summary, args, device_name(device), console)


COMMAND = Command(
    "diagnose",
    "run the reference router on a synthetic workload and report its routing",
    add_arguments,
    run,
)


def trend_window(steps: int, points: int = 10) -> int:
    """Steps per trend window so that a run of ``steps`` steps gives ``points`` windows (the
    inspector's minimum window is 2; fewer than 4 steps give no trend)."""
    return max(2, steps // points)


def _run_torch(
    args: argparse.Namespace,
    config: RouterConfig,
    device: torch.device,
    inspector_config: InspectorConfig,
    console: Console,
) -> InspectorSummary:
    """Runs ``args.steps`` forward passes of the PyTorch reference model under the inspector."""
    import torch

    from moe_devkit.inspect import RouterInspector
    from moe_devkit.routers.torch_router import MoEModel
    from moe_devkit.workloads import mixed_difficulty_batch

    dtype = resolve_dtype(args.dtype)
    torch.manual_seed(args.seed)
    model = MoEModel(config, num_layers=args.layers).to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(args.seed)
    with (
        torch.no_grad(),
        RouterInspector(model, inspector_config) as inspector,
        step_progress(console, "routing", args.steps) as advance,
    ):
        for _ in range(args.steps):
            batch = mixed_difficulty_batch(
                args.batch, args.seq, config.hidden_size, generator=generator
            )
            model(batch.hidden_states.to(device=device, dtype=dtype))
            advance()
    summary: InspectorSummary = inspector.summary()
    return summary


def _finish(
    summary: InspectorSummary, args: argparse.Namespace, device: str, console: Console
) -> int:
    """Prints the tables, writes the report files, then what ran and the verdict; 1 when an
    error-level alarm fired."""
    print_summary(console, summary.layers)
    paths = write_report_files(summary, args.out)
    report = f"report: {paths.json}  {paths.png}  {paths.html}"
    console.print(report, highlight=False, soft_wrap=True)  # a log keeps each line whole
    console.print(f"ran: {describe_run(args, device)}", highlight=False, soft_wrap=True)
    print_verdict(console, summary.findings)
    return 1 if any(f.severity == "error" for f in summary.findings) else 0


def describe_run(args: argparse.Namespace, device: str) -> str:
    """One line naming the model, the workload and where it ran."""
    framework = getattr(args, "framework", "torch")
    layers = f"{args.layers} layer{'s' if args.layers != 1 else ''}"
    mode = "complexity" if args.mode == "complexity" else f"top_p {args.top_p}"
    model = f"{layers} x {args.num_experts} experts, hidden {args.hidden_size}"
    tokens = args.steps * args.batch * args.seq
    return (
        f"{framework} reference model, {model}, k {args.min_k}-{args.max_k} ({mode}); "
        f"{args.steps} steps x {args.batch} x {args.seq} = {tokens} tokens; "
        f"device {device}; {args.dtype}"
    )


def write_report_files(summary: InspectorSummary, out: str) -> ReportPaths:
    """Writes the three report files; a path that cannot be written is a UsageError."""
    from moe_devkit.inspect.report import write_report

    with writing(out):
        return write_report(summary, out)


def print_summary(console: Console, layers: dict[str, Any]) -> None:
    """Prints the per-expert utilization and the k histogram of every layer."""
    from rich.markup import escape
    from rich.table import Table

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
    from rich.markup import escape
    from rich.table import Table

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

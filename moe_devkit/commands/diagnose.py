"""``moe-devkit diagnose``: run the reference router on a synthetic workload and report."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from moe_devkit.cli import UsageError, positive_int
from moe_devkit.commands._torch import require_torch, resolve_device, resolve_dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the options of ``moe-devkit diagnose``."""
    model = parser.add_argument_group("reference model")
    model.add_argument("--hidden-size", type=positive_int, default=256)
    model.add_argument("--num-experts", type=positive_int, default=16)
    model.add_argument("--min-k", type=positive_int, default=1)
    model.add_argument("--max-k", type=positive_int, default=4)
    model.add_argument("--mode", choices=("complexity", "top_p"), default="complexity")
    model.add_argument("--top-p", type=float, default=0.6)
    model.add_argument("--layers", type=positive_int, default=2)
    work = parser.add_argument_group("workload")
    work.add_argument("--steps", type=positive_int, default=20, help="forward passes to record")
    work.add_argument("--batch", type=positive_int, default=8)
    work.add_argument("--seq", type=positive_int, default=128)
    work.add_argument("--seed", type=int, default=0)
    work.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    work.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")


def run(args: argparse.Namespace, console: Console) -> int:
    """Runs the diagnose command; returns the exit code."""
    require_torch()
    import torch

    from moe_devkit.config import RouterConfig
    from moe_devkit.routers.torch_router import MoEModel, expert_counts
    from moe_devkit.workloads import mixed_difficulty_batch

    try:
        config = RouterConfig(
            hidden_size=args.hidden_size,
            num_experts=args.num_experts,
            min_k=args.min_k,
            max_k=args.max_k,
            mode=args.mode,
            top_p=args.top_p,
        )
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    torch.manual_seed(args.seed)
    model = MoEModel(config, num_layers=args.layers).to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(args.seed)
    counts = torch.zeros(args.layers, config.num_experts, dtype=torch.int64, device=device)
    k_hist = torch.zeros(args.layers, config.max_k + 1, dtype=torch.int64, device=device)
    with torch.no_grad(), Progress(console=console, transient=True) as progress:
        task = progress.add_task("routing", total=args.steps)
        for _ in range(args.steps):
            batch = mixed_difficulty_batch(
                args.batch, args.seq, config.hidden_size, generator=generator
            )
            out = model(batch.hidden_states.to(device=device, dtype=dtype))
            for layer, routing in enumerate(out.routings):
                counts[layer] += expert_counts(routing.expert_indices, config.num_experts)
                k_hist[layer].scatter_add_(
                    0, routing.k_per_token, torch.ones_like(routing.k_per_token)
                )
            progress.advance(task)
    _print_utilization(console, counts.cpu().tolist())
    _print_k_histogram(console, k_hist.cpu().tolist(), config.max_k)
    return 0


def _print_utilization(console: Console, counts: list[list[int]]) -> None:
    table = Table(title="Expert utilization (share of token-expert selections)")
    table.add_column("expert", justify="right")
    for layer in range(len(counts)):
        table.add_column(f"layer {layer}", justify="right")
    totals = [max(sum(row), 1) for row in counts]
    for expert in range(len(counts[0])):
        cells = [
            f"{100 * row[expert] / total:5.1f}%" for row, total in zip(counts, totals, strict=True)
        ]
        table.add_row(str(expert), *cells)
    console.print(table)


def _print_k_histogram(console: Console, k_hist: list[list[int]], max_k: int) -> None:
    table = Table(title="Experts per token (k)")
    table.add_column("k", justify="right")
    for layer in range(len(k_hist)):
        table.add_column(f"layer {layer}", justify="right")
    tokens = [max(sum(row), 1) for row in k_hist]
    for k in range(max_k + 1):
        if all(row[k] == 0 for row in k_hist):
            continue
        cells = [f"{100 * row[k] / n:5.1f}%" for row, n in zip(k_hist, tokens, strict=True)]
        table.add_row(str(k), *cells)
    means = [
        sum(k * c for k, c in enumerate(row)) / n for row, n in zip(k_hist, tokens, strict=True)
    ]
    table.add_row("mean", *[f"{m:.2f}" for m in means], style="bold")
    console.print(table)

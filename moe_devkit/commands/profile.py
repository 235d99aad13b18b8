"""``moe-devkit profile``: latency of the reference MoE layer, per stage, dynamic vs static."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from moe_devkit.commands._torch import (
    add_device_arguments,
    add_router_arguments,
    require_torch,
    resolve_device,
    resolve_dtype,
    router_config,
)
from moe_devkit.commands.common import (
    Command,
    check_output,
    non_negative_int,
    positive_float,
    positive_int,
    writing,
)

if TYPE_CHECKING:
    import torch
    from rich.console import Console

    from moe_devkit.config import RouterConfig
    from moe_devkit.diagnostics.findings import Finding
    from moe_devkit.diagnostics.latency import LatencyProfile
    from moe_devkit.diagnostics.latency.compare import DynamicStaticComparison
    from moe_devkit.diagnostics.latency.profiler import ProfileResult
    from moe_devkit.diagnostics.latency.timing import Measurement
    from moe_devkit.diagnostics.latency.verdict import DynamicStaticVerdict
    from moe_devkit.routers.torch_router import MoELayer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the options of ``moe-devkit profile``."""
    add_router_arguments(parser, hidden_size=256, num_experts=16, title="reference layer")
    run = parser.add_argument_group("run")
    run.add_argument("--tokens", type=positive_int, default=1024)
    run.add_argument("--warmup", type=non_negative_int, default=10)
    run.add_argument("--iterations", type=positive_int, default=50)
    run.add_argument("--profile-steps", type=positive_int, default=3)
    run.add_argument("--top", type=positive_int, default=10, help="operators listed")
    run.add_argument("--no-static", action="store_true", help="skip the static comparison")
    run.add_argument(
        "--tolerance", type=positive_float, default=1.1,
        help="dynamic-slower-than-static fires when the time ratio's 95%% lower bound "
        "exceeds pair ratio x TOLERANCE (default 1.1)",
    )  # fmt: skip
    add_device_arguments(run)
    run.add_argument("--out", type=Path, help="write trace.json and latency.json here")


def run(args: argparse.Namespace, console: Console) -> int:
    """Runs the profile command; 1 when the dynamic layer is slower than its pairs allow."""
    require_torch()
    from moe_devkit.diagnostics.latency import profile_inference_latency

    config = router_config(args)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    if args.out is not None:
        check_output(args.out, directory=True)
    dynamic, x = _dynamic_layer(args, config, device, dtype)
    trace = args.out / "trace.json" if args.out else None
    with console.status("timing and profiling the dynamic layer"):
        profile = profile_inference_latency(
            dynamic, x, warmup=args.warmup, iterations=args.iterations,
            profile_active=args.profile_steps, trace_path=trace, top=args.top,
        )  # fmt: skip
    comparison = None if args.no_static else _compare(args, config, dynamic, x, console)
    verdict = comparison.verdict(tolerance=args.tolerance) if comparison else None
    findings = _print_results(console, profile, comparison, verdict)
    if args.out:
        _write(args.out, profile, comparison, verdict, findings, console)
    return 1 if any(f.severity == "error" for f in findings) else 0


COMMAND = Command(
    "profile",
    "time and profile the reference MoE layer: per-stage breakdown, dynamic vs static",
    add_arguments,
    run,
)


def _dynamic_layer(
    args: argparse.Namespace, config: RouterConfig, device: torch.device, dtype: torch.dtype
) -> tuple[MoELayer, torch.Tensor]:
    """The seeded dynamic MoELayer and its input, float[tokens, hidden_size]."""
    import torch

    from moe_devkit.routers.torch_router import MoELayer

    torch.manual_seed(args.seed)
    dynamic = MoELayer(config).to(device=device, dtype=dtype).eval()
    x = torch.randn(args.tokens, config.hidden_size, generator=torch.Generator().manual_seed(0))
    return dynamic, x.to(device=device, dtype=dtype)


def _compare(
    args: argparse.Namespace,
    config: RouterConfig,
    dynamic: MoELayer,
    x: torch.Tensor,
    console: Console,
) -> DynamicStaticComparison:
    """Times ``dynamic`` against a static top-max_k layer with the same weights."""
    from moe_devkit.diagnostics.latency.compare import compare_dynamic_static
    from moe_devkit.routers.torch_router import MoELayer, StaticTopKRouter

    router = StaticTopKRouter(config)
    router.router_network.load_state_dict(
        dynamic.router.get_submodule("router_network").state_dict()
    )
    static = MoELayer(config, router=router)
    static.experts.load_state_dict(dynamic.experts.state_dict())
    static = static.to(device=x.device, dtype=x.dtype)
    with console.status("timing dynamic vs static"):
        return compare_dynamic_static(
            dynamic, static.eval(), x, warmup=args.warmup, iterations=args.iterations
        )


def _print_results(
    console: Console,
    profile: LatencyProfile,
    comparison: DynamicStaticComparison | None,
    verdict: DynamicStaticVerdict | None,
) -> list[Finding]:
    """Prints the tables and the verdict; returns the findings."""
    _print_timing(console, profile.measurement)
    _print_stages(console, profile.profile)
    _print_ops(console, profile.profile)
    if comparison is not None:
        _print_comparison(console, comparison)
    finding = verdict.finding() if verdict else None
    if verdict is not None:
        _print_verdict(console, verdict)
    if finding is not None:
        line = f"[{finding.severity}] {finding.code}: {finding.message}"
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return [] if finding is None else [finding]


def _write(
    out: Path,
    profile: LatencyProfile,
    comparison: DynamicStaticComparison | None,
    verdict: DynamicStaticVerdict | None,
    findings: list[Finding],
    console: Console,
) -> None:
    from moe_devkit.diagnostics.latency import latency_section
    from moe_devkit.reporting import make_report, write_report_json

    report = make_report({"latency": latency_section(profile, comparison, verdict)}, findings)
    with writing(out):
        path = write_report_json(out / "latency.json", report)
    console.print(f"trace: {out / 'trace.json'}  (open in https://ui.perfetto.dev)\nreport: {path}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _print_timing(console: Console, m: Measurement) -> None:
    from rich.table import Table

    table = Table(title=f"Latency per forward, ms ({m.n} iterations, {m.method}, {m.device})")
    for col in ("median", "p10", "p90", "p99", "mean", "min", "host CPU"):
        table.add_column(col, justify="right")
    table.add_row(*map(_ms, (m.median, m.p10, m.p90, m.p99, m.mean, m.min, m.cpu_median)))
    console.print(table)


def _print_stages(console: Console, profile: ProfileResult) -> None:
    from rich.table import Table

    table = Table(title=f"Routing stages ({profile.time_basis} time per step)")
    table.add_column("stage")
    table.add_column("ms", justify="right")
    table.add_column("share", justify="right")
    for s in profile.stages:
        table.add_row(s.stage, _ms(s.time), f"{100 * s.share:.1f}%")
    console.print(table)


def _print_ops(console: Console, profile: ProfileResult) -> None:
    from rich.table import Table

    table = Table(title=f"Top operators by self {profile.time_basis} time")
    for col, justify in (("operator", "left"), ("calls", "right"), ("self ms", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for op in profile.top_ops:
        table.add_row(op.name, f"{op.calls:g}", _ms(op.self_time))
    console.print(table)


def _print_comparison(console: Console, c: DynamicStaticComparison) -> None:
    from rich.table import Table

    table = Table(title=f"Dynamic vs static top-max_k (mean k = {c.mean_k:.2f})")
    for col in ("layer", "median ms", "active pairs", "ns per pair"):
        table.add_column(col, justify="right")
    table.add_row(
        "static", _ms(c.static.median), str(c.static_pairs), f"{c.static_per_pair * 1e9:.1f}"
    )
    table.add_row(
        "dynamic", _ms(c.dynamic.median), str(c.dynamic_pairs), f"{c.dynamic_per_pair * 1e9:.1f}"
    )
    table.add_row(
        "ratio of medians", f"{c.time_ratio:.3f}", f"{c.pairs_ratio:.3f}", "", style="bold"
    )
    console.print(table)


def _print_verdict(console: Console, v: DynamicStaticVerdict) -> None:
    ratios = (
        f"time ratio {v.time_ratio:.3f} (median of {v.iterations} paired iterations), "
        f"pair ratio {v.pairs_ratio:.3f}"
    )
    if v.time_ratio_low is None:
        line = f"{ratios}: too few iterations for a {v.confidence:.0%} bound, no verdict"
    else:
        where = "above" if v.slower else "within"
        line = (
            f"{ratios}; time ratio >= {v.time_ratio_low:.3f} at {v.confidence:.0%} confidence, "
            f"{where} pair ratio x {v.tolerance:g} = {v.threshold:.3f}"
        )
    console.print(f"verdict: {line}", markup=False, highlight=False, soft_wrap=True)

"""GPU: static top-8 vs dynamic-k MoELayer at an OLMoE-like size.

8192 tokens, hidden 2048, expert FFN 1024, 64 experts, max_k 8, bfloat16. The dynamic layer
runs in top_p mode with a p calibrated on this input so that mean k is about max_k / 2 (or
``--mode complexity`` with the estimator's output bias shifted to the same mean k). Reports
median forward times (CUDA events), the time ratio next to the ratio of active
token-expert pairs, and a per-stage breakdown (device time) from the profiler of
``moe_devkit.diagnostics.latency``. Weights are shared between the two layers.

Usage (on the GPU machine):
    python benchmarks/bench_dispatch_gpu.py --out build/gpu-dispatch
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from _args import check_device, check_output_path, positive_int

from moe_devkit.config import RouterConfig
from moe_devkit.diagnostics.latency import compare_dynamic_static, profile_steps
from moe_devkit.reporting import make_report, write_report_json
from moe_devkit.routers.torch_router import MoELayer, StaticTopKRouter


def mean_k(layer: MoELayer, x: torch.Tensor) -> float:
    with torch.inference_mode():
        return float(layer.router(x).k_per_token.float().mean())


def calibrate_top_p(config: RouterConfig, layer: MoELayer, x: torch.Tensor, target: float) -> float:
    """Bisection on top_p so that mean k is about ``target`` (k grows with p)."""
    low, high = 0.01, 0.999
    for _ in range(20):
        mid = (low + high) / 2
        layer.router.config = replace(config, top_p=mid)  # the router reads it per forward
        if mean_k(layer, x) < target:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def bias_complexity(layer: MoELayer, x: torch.Tensor, target: float) -> float:
    """Shifts the estimator's output bias so that mean k is about ``target``."""
    estimator = layer.router.complexity_estimator
    if estimator is None:
        raise ValueError("complexity mode expected")
    low, high = -20.0, 20.0
    for _ in range(30):
        mid = (low + high) / 2
        with torch.no_grad():
            estimator.fc2.bias.fill_(mid)
        if mean_k(layer, x) < target:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def build(args: argparse.Namespace) -> tuple[MoELayer, MoELayer, torch.Tensor, dict[str, Any]]:
    device, dtype = torch.device(args.device), torch.bfloat16
    config = RouterConfig(
        hidden_size=2048, expert_hidden_size=1024, num_experts=64, min_k=1, max_k=8,
        mode=args.mode, top_p=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    dynamic = MoELayer(config).to(device=device, dtype=dtype).eval()
    static = MoELayer(config, router=StaticTopKRouter(config)).to(device=device, dtype=dtype)
    static.experts.load_state_dict(dynamic.experts.state_dict())
    static.router.router_network.load_state_dict(dynamic.router.router_network.state_dict())
    x = torch.randn(args.tokens, config.hidden_size, device=device, dtype=dtype)
    target = config.max_k / 2
    if args.mode == "top_p":
        knob = {"top_p": calibrate_top_p(config, dynamic, x, target)}
    else:
        knob = {"estimator_bias": bias_complexity(dynamic, x, target)}
    return dynamic, static.eval(), x, knob


def stages(layer: MoELayer, x: torch.Tensor, out: Path | None, name: str) -> list[dict[str, Any]]:
    def step() -> object:
        with torch.inference_mode():
            return layer(x)

    trace = out / f"trace-{name}.json" if out else None
    result = profile_steps(step, device=x.device, wait=2, warmup=3, active=5, trace_path=trace)
    return [vars(s) | {} for s in result.stages] + [
        {"op": o.name, "self_ms": o.self_time * 1e3} for o in result.top_ops
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=positive_int, default=8192)
    parser.add_argument("--mode", choices=("top_p", "complexity"), default="top_p")
    parser.add_argument("--iterations", type=positive_int, default=100)
    parser.add_argument("--out", type=Path, help="traces and dispatch.json go here")
    args = parser.parse_args()
    check_output_path(parser, args.out, "--out", directory=True)  # before the run, not after
    if args.device.split(":")[0] == "cuda" and not torch.cuda.is_available():
        print("SKIPPED: no CUDA device (this benchmark is for the GPU machine)")
        return 77
    check_device(parser, args.device)
    dynamic, static, x, knob = build(args)
    comparison = compare_dynamic_static(dynamic, static, x, warmup=20, iterations=args.iterations)
    result = {
        "device": torch.cuda.get_device_name() if x.is_cuda else "cpu",
        "torch": torch.__version__, "mode": args.mode, "knob": knob,
        "comparison": comparison.to_dict(),
        "stages_static": stages(static, x, args.out, "static"),
        "stages_dynamic": stages(dynamic, x, args.out, "dynamic"),
    }  # fmt: skip
    c = comparison
    print(f"device {result['device']}  torch {torch.__version__}  mode {args.mode} {knob}")
    print(f"static  median {c.static.median * 1e3:8.3f} ms  pairs {c.static_pairs}")
    print(f"dynamic median {c.dynamic.median * 1e3:8.3f} ms  pairs {c.dynamic_pairs}"
          f"  mean k {c.mean_k:.2f}")  # fmt: skip
    print(f"time ratio {c.time_ratio:.3f}  pairs ratio {c.pairs_ratio:.3f}  "
          f"time/pairs {c.time_ratio / c.pairs_ratio:.3f} (goal <= 1.1)")  # fmt: skip
    for name in ("static", "dynamic"):
        print(f"-- {name} stages (device ms per forward, share)")
        for row in result[f"stages_{name}"]:
            if "stage" in row:
                print(f"   {row['stage']:<11} {row['time'] * 1e3:8.3f}  {100 * row['share']:5.1f}%")
            else:
                print(f"   op {row['op'][:60]:<60} {row['self_ms']:8.3f}")
    if args.out:
        path = write_report_json(args.out / "dispatch.json", make_report({"latency": result}))
        print(f"report: {path}")
    else:
        json.dump(result, sys.stdout, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

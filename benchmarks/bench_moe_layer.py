"""MoELayer forward: static top-max_k vs dynamic-k at the same max_k.

Reports time, active token-expert pairs and time per pair for both, and their ratios, all
measured in one run with the two layers timed alternately (so machine load hits both alike).

    python benchmarks/bench_moe_layer.py                       # CPU, moderate size
    python benchmarks/bench_moe_layer.py --device cuda --preset olmoe --dtype bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from _args import check_device, check_output_path, check_range, positive_int

from moe_devkit import MoELayer, RouterConfig, StaticTopKRouter
from moe_devkit.diagnostics.regression import bootstrap_median_ci
from moe_devkit.reporting import write_atomic

PRESETS = {
    # tokens, hidden, expert FFN, experts, max_k
    "cpu": (2048, 512, 1024, 16, 4),
    "olmoe": (8192, 2048, 1024, 64, 8),
}


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Returns a function that times one call in milliseconds (CUDA events on GPU)."""
    if device.type == "cuda":

        def run_cuda(fn: Callable[[], object]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))

        return run_cuda

    def run_cpu(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return run_cpu


def captured(layer: MoELayer, x: torch.Tensor, calls: int = 1) -> Callable[[], object]:
    """Captures ``calls`` back-to-back ``layer(x)`` in one CUDA graph; returns its replay.

    With several calls per replay the graph's own launch latency, paid once per replay and
    not by a layer inside a model's graph, is spread over them (divide the replay's time
    by ``calls``). The outputs stay referenced, so their memory stays the graph's.
    """
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = [layer(x) for _ in range(calls)]

    def replay() -> object:
        graph.replay()
        return outputs

    return replay


def calibrate_top_p(layer: MoELayer, x: torch.Tensor, target_mean_k: float) -> RouterConfig:
    """Bisects top_p until the layer's mean k is within 0.05 of target; sets and returns it."""
    low, high = 1e-3, 1.0
    config = layer.config
    for _ in range(30):
        config = dataclasses.replace(layer.config, top_p=(low + high) / 2)
        layer.config = layer.router.config = config
        with torch.no_grad():
            mean_k = float(layer.router(x).k_per_token.float().mean())
        if abs(mean_k - target_mean_k) < 0.05:
            break
        low, high = (config.top_p, high) if mean_k < target_mean_k else (low, config.top_p)
    return config


def build_layers(
    preset: str, device: torch.device, dtype: torch.dtype, target_mean_k: float
) -> tuple[MoELayer, MoELayer, torch.Tensor]:
    """The static top-max_k and the dynamic (top_p) layer of a preset, and their input.

    Both share experts and router weights; the router weights are scaled x4 (logit std about
    2, like a trained router) and top_p is calibrated on the input to ``target_mean_k``.
    """
    tokens, hidden, ffn, experts, max_k = PRESETS[preset]
    torch.manual_seed(0)
    config = RouterConfig(
        hidden_size=hidden,
        num_experts=experts,
        min_k=1,
        max_k=max_k,
        expert_hidden_size=ffn,
        mode="top_p",
    )
    dynamic = MoELayer(config).to(device, dtype)
    with torch.no_grad():  # a trained router is confident: logits with std ~2, not ~0.5
        dynamic.router.router_network.weight.mul_(4.0)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    config = calibrate_top_p(dynamic, x, target_mean_k)
    static = MoELayer(config, router=StaticTopKRouter(config)).to(device, dtype)
    static.load_state_dict(dynamic.state_dict(), strict=False)  # same experts and gate
    return static, dynamic, x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument(
        "--target-mean-k",
        type=float,
        default=None,
        help="calibrate top_p so the dynamic router's mean k is this (default max_k / 2)",
    )
    parser.add_argument("--reps", type=positive_int, default=20)
    parser.add_argument(
        "--graph",
        action="store_true",
        help="CUDA only: capture each layer's forward in a CUDA graph and time its replay "
        "(possible because the forward never synchronises); removes kernel-launch overhead",
    )
    parser.add_argument(
        "--graph-calls",
        type=positive_int,
        default=1,
        help="with --graph: forwards captured back to back per graph; times are per forward "
        "(several spread the graph's launch latency, which a layer inside a model's graph "
        "does not pay)",
    )
    parser.add_argument(
        "--window",
        type=positive_int,
        default=1,
        help="eager: time this many back-to-back forwards per sample and report the time "
        "per forward (throughput, as inside a model: the host issues the next forward while "
        "the GPU runs this one); 1 times an isolated call (latency, host launch time included)",
    )
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    tokens, hidden, ffn, experts, max_k = PRESETS[args.preset]
    if args.target_mean_k is not None:
        why = f" (min_k to max_k of preset {args.preset})"
        check_range(parser, "--target-mean-k", args.target_mean_k, 1, max_k, why=why)
    check_device(parser, args.device)
    if args.graph and torch.device(args.device).type != "cuda":
        parser.error(f"--graph needs a CUDA --device (CUDA graphs); got --device {args.device!r}")
    check_output_path(parser, args.json, "--json")  # before the run, not after it

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    target = args.target_mean_k if args.target_mean_k is not None else max_k / 2
    static, dynamic, x = build_layers(args.preset, device, dtype, target)
    config = dynamic.config
    time_ms = timer(device)

    layers = {"static": static, "dynamic": dynamic}
    samples: dict[str, list[float]] = {name: [] for name in layers}
    with torch.inference_mode():
        pairs = {name: int(layer(x).routing.active.sum()) for name, layer in layers.items()}
        for _ in range(3):  # warm-up
            for layer in layers.values():
                layer(x)
        per_call = args.window
        calls = {
            name: (lambda layer=layer: [layer(x) for _ in range(per_call)])
            for name, layer in layers.items()
        }
        if args.graph:
            per_call = args.graph_calls
            calls = {name: captured(layer, x, per_call) for name, layer in layers.items()}
        for _ in range(args.reps):  # alternate A/B so drift and load hit both
            for name, call in calls.items():
                samples[name].append(time_ms(call) / per_call)

    result = {
        "machine": machine_name(device),
        "preset": args.preset,
        "shape": dict(tokens=tokens, hidden=hidden, ffn=ffn, experts=experts, max_k=max_k),
        "dtype": args.dtype,
        "top_p": config.top_p,
        "reps": args.reps,
        "cuda_graph": args.graph,
        "forwards_per_graph": args.graph_calls if args.graph else None,
        "forwards_per_sample": per_call,
    }
    print(f"machine: {result['machine']}")
    print(f"preset {args.preset}: {result['shape']}, {args.dtype}, top_p={config.top_p:.4f}")
    timing = (
        f"CUDA graph replay, {per_call} forward(s) per graph"
        if args.graph
        else f"eager, {per_call} back-to-back forward(s) per sample"
    )
    print(f"timing: {timing}, time per forward")
    print(f"{'layer':8} {'median ms':>10} {'p10':>8} {'p90':>8} {'pairs':>8} {'us/pair':>8}")
    for name in layers:
        s = sorted(samples[name])
        med = statistics.median(s)
        p10, p90 = s[len(s) // 10], s[(9 * len(s)) // 10]
        per_pair = med * 1e3 / pairs[name]
        result[name] = dict(
            median_ms=med, p10_ms=p10, p90_ms=p90, pairs=pairs[name], us_per_pair=per_pair
        )
        print(f"{name:8} {med:10.3f} {p10:8.3f} {p90:8.3f} {pairs[name]:8d} {per_pair:8.4f}")
    time_ratio = result["dynamic"]["median_ms"] / result["static"]["median_ms"]
    pair_ratio = pairs["dynamic"] / pairs["static"]
    # each rep timed static then dynamic back to back: the ratio within a rep, and the
    # bootstrap CI of its median, say how far the run's noise moves the ratio
    per_rep = [d / s for s, d in zip(samples["static"], samples["dynamic"], strict=True)]
    median_rep, low, high = bootstrap_median_ci(per_rep, confidence=0.95)
    result.update(
        time_ratio=time_ratio,
        pair_ratio=pair_ratio,
        rep_ratio_median=median_rep,
        rep_ratio_ci95=[low, high],
    )
    print(
        f"dynamic/static: time {time_ratio:.3f} (per rep: median {median_rep:.3f}, 95% CI "
        f"{low:.3f}-{high:.3f}), active pairs {pair_ratio:.3f}; "
        f"time ratio / pair ratio {time_ratio / pair_ratio:.3f}"
    )
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

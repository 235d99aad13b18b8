"""The experts of the no-grad CUDA forward: Triton TMA GEMMs vs torch._grouped_mm.

Times ``SwiGLUExperts`` on the rows that a static top-max_k router and a dynamic (top_p,
calibrated to mean k = max_k / 2) router send to them, two ways, each captured in a CUDA graph
and replayed alternately with the other:

* ``grouped_mm``: ``torch._grouped_mm`` (CUTLASS) for the two projections;
* ``triton``: ``triton_experts.grouped_mm`` (persistent, TMA, 128-row tiles) for both;

with the Triton SwiGLU kernel between the projections in both
(``moe_devkit.kernels.moe_layer.swiglu_experts``).

Reports both, their ratio, and the dynamic/static ratio of each next to the ratio of active
token-expert pairs (the goal: time ratio close to the pair ratio). Needs a Hopper GPU.

    python benchmarks/bench_expert_gemm.py [--reps 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
from _args import check_output_path, positive_int
from bench_moe_layer import PRESETS, build_layers, machine_name

from moe_devkit.kernels import triton_dispatch, triton_experts
from moe_devkit.reporting import write_atomic
from moe_devkit.routers.torch_router import SwiGLUExperts, _sort_pairs


def graphed(fn: Callable[[], object]) -> Callable[[], float]:
    """Captures one call of fn in a CUDA graph; returns a timer of its replay, in ms.

    The captured call's output stays referenced by the timer, so its memory stays the
    graph's.
    """
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    graph.replay()
    torch.cuda.synchronize()

    def timed() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        assert output is not None
        return float(start.elapsed_time(end))

    return timed


def experts_path(
    matmul: Callable[..., torch.Tensor],
    experts: SwiGLUExperts,
    x: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """What ``moe_layer.swiglu_experts`` runs, with the given grouped matmul."""
    gate_up = matmul(x, experts.w_gate_up.transpose(-2, -1), offs=offsets)
    hidden = triton_dispatch.swiglu_rows(gate_up, weights, offsets[-1:])
    return matmul(hidden, experts.w_down.transpose(-2, -1), offs=offsets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="olmoe", choices=sorted(PRESETS))
    parser.add_argument("--reps", type=positive_int, default=50)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    check_output_path(parser, args.json, "--json")  # before the run, not after it
    device, dtype = torch.device("cuda"), torch.bfloat16
    if not torch.cuda.is_available() or not triton_experts.is_available(device):
        raise SystemExit("bench_expert_gemm: needs a Hopper GPU and Triton >= 3.4")
    tokens, hidden, ffn, num_experts, max_k = PRESETS[args.preset]
    static, dynamic, x = build_layers(args.preset, device, dtype, max_k / 2)
    experts = dynamic.experts
    triton_mm = triton_experts.grouped_mm

    timers: dict[tuple[str, str], Callable[[], float]] = {}
    pairs: dict[str, int] = {}
    errors: dict[str, float] = {}
    inputs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    with torch.inference_mode():
        for name, layer in (("static", static), ("dynamic", dynamic)):
            routing = layer.router(x)
            _, order, offsets = _sort_pairs(routing, num_experts)
            rows = x[order // routing.max_k]  # every slot's row; only the active ones matter
            weights = routing.expert_weights.reshape(-1)[order]
            inputs[name] = rows, offsets, weights
        for name, (rows, offsets, weights) in inputs.items():  # all eager work done: capture
            active = int(offsets[-1])
            pairs[name] = active
            for method, matmul in (("grouped_mm", torch._grouped_mm), ("triton", triton_mm)):
                timers[name, method] = graphed(
                    lambda m=matmul, r=rows, o=offsets, w=weights: experts_path(m, experts, r, o, w)
                )
            reference = experts_path(torch._grouped_mm, experts, rows, offsets, weights)
            result = experts_path(triton_mm, experts, rows, offsets, weights)
            errors[name] = float(
                (result[:active] - reference[:active]).float().abs().max()
                / reference[:active].float().abs().max()
            )
        samples: dict[tuple[str, str], list[float]] = {key: [] for key in timers}
        for _ in range(args.reps):
            for key, timer in timers.items():
                samples[key].append(timer())
    median = {key: statistics.median(values) for key, values in samples.items()}
    pair_ratio = pairs["dynamic"] / pairs["static"]
    print(f"machine: {machine_name(device)}")
    print(
        f"preset {args.preset}: tokens {tokens}, hidden {hidden}, ffn {ffn}, experts "
        f"{num_experts}, max_k {max_k}, bfloat16; {args.reps} alternating reps, CUDA graphs"
    )
    print(
        f"{'rows':8} {'pairs':>7} {'grouped_mm ms':>14} {'triton ms':>10} {'triton/gmm':>10}"
        f" {'max rel err':>11}"
    )
    for name in ("static", "dynamic"):
        old, new = median[name, "grouped_mm"], median[name, "triton"]
        print(
            f"{name:8} {pairs[name]:7d} {old:14.4f} {new:10.4f} {new / old:10.3f}"
            f" {errors[name]:11.2e}"
        )
    ratios = {
        method: median["dynamic", method] / median["static", method]
        for method in ("grouped_mm", "triton")
    }
    print(
        f"dynamic/static: pairs {pair_ratio:.3f}, grouped_mm {ratios['grouped_mm']:.3f} "
        f"({ratios['grouped_mm'] / pair_ratio:.2f}x), triton {ratios['triton']:.3f} "
        f"({ratios['triton'] / pair_ratio:.2f}x)"
    )
    if args.json:
        result = {
            "machine": machine_name(device),
            "preset": args.preset,
            "reps": args.reps,
            "pairs": pairs,
            "median_ms": {f"{k[0]}.{k[1]}": v for k, v in median.items()},
            "max_relative_error": errors,
            "pair_ratio": pair_ratio,
            "time_ratio": ratios,
        }
        write_atomic(args.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

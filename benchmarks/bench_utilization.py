"""Benchmark utilization counting against the naive per-token loop, in one run.

Usage: python benchmarks/bench_utilization.py [--device cpu|cuda] [--threads N]
       [--seed-tokens N] [--repeat N] [--json PATH]

Workload: router logits [batch=8, seq=2048, experts=64] float32, k uniform in [1, 8] per
token. Timed, each as the median (and min) of --repeat runs:

* seed: the naive per-token ``debug_expert_selection`` loop (benchmarks/naive_reference.py),
  on the first --seed-tokens tokens and extrapolated linearly to all 16384 (the loop is
  linear in tokens);
* ours: ``moe_devkit.debug_expert_selection`` on all tokens (same Counter, checked);
* from_logits: ``selection_counts_from_logits`` (topk(max_k), stays on the device);
* from_indices: ``selection_counts`` of a RoutingDecision's int64[N, 8] indices (one scatter);
* topk_bincount: the plain vectorised approach, for reference;
* from_indices_graph (CUDA): from_indices replayed from a CUDA graph, its GPU cost alone.

Each round times every path once (rounds interleaved, so machine load hits all paths alike);
the medians and minima over rounds are reported, with ratios seed / path for both. CUDA
timings use CUDA events after a synchronize. Prints the machine, its load and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _args import check_device, check_output_path, positive_int
from naive_reference import naive_debug_expert_selection as seed_debug_expert_selection

from moe_devkit import debug_expert_selection
from moe_devkit.diagnostics.utilization import (
    selected_experts,
    selection_counts,
    selection_counts_from_logits,
)
from moe_devkit.reporting import write_atomic

BATCH, SEQ, EXPERTS, MAX_K = 8, 2048, 64, 8


def topk_bincount(router_logits: torch.Tensor, k_values: torch.Tensor) -> torch.Tensor:
    top = router_logits.reshape(-1, EXPERTS).topk(MAX_K, dim=-1).indices
    keep = torch.arange(MAX_K, device=top.device) < k_values.reshape(-1, 1)
    return torch.bincount(top[keep], minlength=EXPERTS)


def time_once(fn: Callable[[], Any], device: str) -> float:
    """Seconds of one call of ``fn`` (CUDA: between events, after a synchronize)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def interleaved(
    paths: dict[str, Callable[[], Any]], device: str, repeat: int
) -> dict[str, list[float]]:
    """Times every path once per round, rounds interleaved so that load hits all alike."""
    for fn in paths.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeat):
        for name, fn in paths.items():
            times[name].append(time_once(fn, device))
    return times


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    text = f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
    text += f"{torch.get_num_threads()} intra-op threads"
    if device == "cuda":
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--seed-tokens", type=positive_int, default=1024, help="tokens the seed loop runs"
    )
    parser.add_argument("--repeat", type=positive_int, default=15, help="interleaved rounds")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    check_device(parser, args.device)
    check_output_path(parser, args.json, "--json")  # before the run, not after it
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(BATCH, SEQ, EXPERTS, generator=gen).to(args.device)
    k = torch.randint(1, MAX_K + 1, (BATCH, SEQ), generator=gen).to(args.device)
    indices = selected_experts(logits, k, max_k=MAX_K)  # a RoutingDecision's expert_indices
    num_tokens = BATCH * SEQ
    seed_tokens = min(args.seed_tokens, num_tokens)
    sub_logits = logits.reshape(1, num_tokens, EXPERTS)[:, :seed_tokens]
    sub_k = k.reshape(1, num_tokens)[:, :seed_tokens]

    ours = debug_expert_selection(logits, k)
    if debug_expert_selection(sub_logits, sub_k) != seed_debug_expert_selection(sub_logits, sub_k):
        raise SystemExit("debug_expert_selection disagrees with the seed loop")
    if [ours[e] for e in range(EXPERTS)] != selection_counts(indices, EXPERTS).tolist():
        raise SystemExit("debug_expert_selection disagrees with the indices path")

    scale = num_tokens / seed_tokens
    paths: dict[str, Callable[[], Any]] = {
        "seed": lambda: seed_debug_expert_selection(sub_logits, sub_k),
        "ours": lambda: debug_expert_selection(logits, k),
        "from_logits": lambda: selection_counts_from_logits(logits, k, max_k=MAX_K, validate=False),
        "from_indices": lambda: selection_counts(indices, EXPERTS, validate=False),
        "topk_bincount": lambda: topk_bincount(logits, k),
    }
    if args.device == "cuda":
        # The same count replayed from a CUDA graph: its GPU cost without the Python and
        # launch latency that dominate one eager call on a host with slow launches.
        graph = torch.cuda.CUDAGraph()
        paths["from_indices"]()  # warm-up outside the capture
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            paths["from_indices"]()
        paths["from_indices_graph"] = graph.replay
    times = interleaved(paths, args.device, args.repeat)
    times["seed"] = [t * scale for t in times["seed"]]
    results = {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}
    print(f"machine: {machine(args.device)}")
    print("load average (1, 5, 15 min): " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(
        f"workload: logits [{BATCH}, {SEQ}, {EXPERTS}] float32 on {args.device}, k in [1, {MAX_K}]"
    )
    print(
        f"seed loop timed on {seed_tokens} of {num_tokens} tokens and extrapolated linearly "
        f"(x{scale:g})"
    )
    print(f"{args.repeat} interleaved rounds; ratios are seed / path, medians and minima")
    print(f"{'path':<16}{'median':>12}{'min':>12}{'x (median)':>12}{'x (min)':>10}")
    for name, (med, low) in results.items():
        ratio_med, ratio_min = results["seed"][0] / med, results["seed"][1] / low
        print(
            f"{name:<16}{med * 1e3:>10.3f}ms{low * 1e3:>10.3f}ms"
            f"{ratio_med:>11.1f}x{ratio_min:>9.1f}x"
        )
    if args.json:
        payload = {
            "machine": machine(args.device),
            "device": args.device,
            "seed_tokens": seed_tokens,
            "load_average": list(os.getloadavg()),
            "seconds": {name: {"median": m, "min": lo} for name, (m, lo) in results.items()},
        }
        write_atomic(args.json, json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()

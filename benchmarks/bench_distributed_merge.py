"""The distributed merge at 2 to 8 gloo CPU processes: bytes sent per rank, time, cost model.

    python benchmarks/bench_distributed_merge.py                        # 61 layers x 256 experts
    python benchmarks/bench_distributed_merge.py --worlds 2,4 --layers 4 --experts 16

For each world size, that many spawned processes (gloo, one thread each) record ``--steps``
random decisions of ``--tokens`` tokens into every one of ``--layers`` layers of
``--experts`` experts (top-``--max-k``; the default is DeepSeek-V3's 61 layers x 256 experts,
top 8), then call ``distributed_summary`` ``--repeats`` times (after one warm-up). Each
rank's collectives are wrapped to count the bytes it puts into them and the seconds spent in
them. Rank 0 reports, per world size: the collectives and their bytes, the median time of
the whole call and of its collectives.

The cost model: the merge is a fixed list of ``c`` all-reduces of ``n`` bytes in all (the
same at every world size); a ring all-reduce over ``w`` ranks sends ``2 (w - 1) / w * n``
bytes per rank in ``2 (w - 1)`` latency steps, a tree (NCCL's choice for small messages at
scale) ``2 n`` bytes in ``2 log2(w)`` steps. With a latency ``alpha`` per step and a time
``beta`` per byte, ``T_ring = c * 2 (w - 1) * alpha + 2 (w - 1) / w * n * beta`` (summed over
the collectives). ``alpha`` and ``beta`` are fitted (least squares) to the measured
collective times; the fitted model's value at each measured world size is printed beside
the measurement, and so are its projections to 1,024 and 16,384 ranks for the measured
payload, with the fitted constants and with stated network constants (not measured here).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import pickle
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from _args import check_output_path, cpu_model, positive_int

from moe_devkit.inspect import RouterInspector
from moe_devkit.inspect.adapters import decision_from_tensors
from moe_devkit.integrations.distributed import distributed_summary
from moe_devkit.reporting import write_atomic

PROJECT_WORLDS = (1024, 16384)
# stated, not measured: an InfiniBand-class fabric, 10 us per latency step, 25 GB/s a rank
NETWORK = {"alpha_s": 10e-6, "beta_s_per_byte": 1 / 25e9}


def _nbytes(args: tuple[Any, ...], name: str) -> int:
    if name.endswith("_object"):
        return len(pickle.dumps(args[1] if name == "all_gather_object" else args[0]))
    tensor = args[1] if name == "all_gather" else args[0]
    return int(tensor.numel() * tensor.element_size())


def _wrap(log: list[tuple[str, int, float]]) -> None:
    for name in ("all_reduce", "all_gather", "all_gather_object", "gather", "broadcast"):
        original = getattr(dist, name)

        def wrapper(*args: Any, _name: str = name, _orig: Any = original, **kw: Any) -> Any:
            start = time.perf_counter()
            out = _orig(*args, **kw)
            log.append((_name, _nbytes(args, _name), time.perf_counter() - start))
            return out

        setattr(dist, name, wrapper)


def _worker(rank: int, world: int, init: str, args: argparse.Namespace, results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    inspector = RouterInspector()
    g = torch.Generator().manual_seed(rank)
    for layer in range(args.layers):
        for _ in range(args.steps):
            scores = torch.rand(args.tokens, args.experts, generator=g)
            indices = scores.topk(args.max_k, dim=-1).indices
            k = torch.full((args.tokens,), args.max_k)
            complexity = torch.rand(args.tokens, generator=g)
            decision = decision_from_tensors(complexity, k, indices, args.experts)
            inspector.record(decision, layer=f"layers.{layer}.mlp.gate")
    log: list[tuple[str, int, float]] = []
    _wrap(log)
    distributed_summary(inspector, timeout=600)  # warm-up
    calls, totals, collective = [], [], []
    for _ in range(args.repeats):
        log.clear()
        start = time.perf_counter()
        distributed_summary(inspector, timeout=600)
        totals.append(time.perf_counter() - start)
        collective.append(sum(t for _, _, t in log))
        calls = [(name, size) for name, size, _ in log]
    results.put((rank, calls, statistics.median(totals), statistics.median(collective)))
    dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"{tmp}/init"
        procs = [
            ctx.Process(target=_worker, args=(r, world, init, args, results)) for r in range(world)
        ]
        for proc in procs:
            proc.start()
        got = sorted((results.get(timeout=1800) for _ in range(world)), key=lambda x: x[0])
        for proc in procs:
            proc.join()
    calls = got[0][1]
    return {
        "world": world,
        "same_calls_on_every_rank": all(item[1] == calls for item in got),
        "collectives": [name for name, _ in calls],
        "bytes_sent_per_rank": sum(size for _, size in calls),
        "ring_bytes_on_wire_per_rank": round(2 * (world - 1) / world * sum(s for _, s in calls)),
        "summary_s": max(item[2] for item in got),
        "collectives_s": max(item[3] for item in got),
    }


def ring_terms(world: int, calls: int, nbytes: int) -> tuple[float, float]:
    """(latency steps, bytes per rank) of ``calls`` ring all-reduces of ``nbytes`` in all."""
    return calls * 2 * (world - 1), 2 * (world - 1) / world * nbytes


def tree_terms(world: int, calls: int, nbytes: int) -> tuple[float, float]:
    return calls * 2 * math.ceil(math.log2(world)), 2.0 * nbytes


def fit(points: list[dict[str, Any]]) -> tuple[float, float]:
    """(alpha, beta) of the ring model, least squares over the measured collective times."""
    rows, times = [], []
    for p in points:
        rows.append(ring_terms(p["world"], len(p["collectives"]), p["bytes_sent_per_rank"]))
        times.append(p["collectives_s"])
    (alpha, beta), *_ = np.linalg.lstsq(np.array(rows), np.array(times), rcond=None)
    return max(float(alpha), 0.0), max(float(beta), 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worlds", default="2,4,8", help="comma-separated world sizes")
    parser.add_argument("--layers", type=positive_int, default=61)
    parser.add_argument("--experts", type=positive_int, default=256)
    parser.add_argument("--max-k", type=positive_int, default=8)
    parser.add_argument("--tokens", type=positive_int, default=64)
    parser.add_argument("--steps", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    check_output_path(parser, args.json, "--json")
    try:
        worlds = [int(w) for w in args.worlds.split(",")]
    except ValueError:
        parser.error(f"--worlds must be comma-separated ints; got {args.worlds!r}")
    if any(w < 2 for w in worlds) or args.max_k > args.experts:
        parser.error("--worlds must be >= 2 each, and --max-k <= --experts")
    points = [measure(w, args) for w in worlds]
    alpha, beta = fit(points)
    for p in points:
        steps, wire = ring_terms(p["world"], len(p["collectives"]), p["bytes_sent_per_rank"])
        p["model_collectives_s"] = alpha * steps + beta * wire
    calls, nbytes = len(points[0]["collectives"]), points[0]["bytes_sent_per_rank"]
    projections = []
    for world in PROJECT_WORLDS:
        ring, tree = ring_terms(world, calls, nbytes), tree_terms(world, calls, nbytes)
        a, b = NETWORK["alpha_s"], NETWORK["beta_s_per_byte"]
        projections.append(
            {
                "world": world,
                "bytes_sent_per_rank": nbytes,
                "ring_bytes_on_wire_per_rank": round(ring[1]),
                "fitted_ring_s": alpha * ring[0] + beta * ring[1],
                "network_ring_s": a * ring[0] + b * ring[1],
                "network_tree_s": a * tree[0] + b * tree[1],
            }
        )
    result = {
        "machine": f"{cpu_model()}, {mp.cpu_count()} cores, gloo",
        "torch": torch.__version__,
        "shape": {k: getattr(args, k) for k in ("layers", "experts", "max_k", "tokens", "steps")},
        "points": points,
        "fitted": {"alpha_s": alpha, "beta_s_per_byte": beta},
        "network": NETWORK,
        "projections": projections,
    }
    line = json.dumps(result)
    print(line)
    if args.json:
        write_atomic(args.json, line + "\n")


if __name__ == "__main__":
    main()

"""Measures the regression detector itself: false-alarm rate and detection rate.

Identical code is compared with itself many times (every "regression" is a false alarm),
and code made 5%, 10% and 20% slower is compared with the original (detection rate). A
second process loads the other core part of the time (random on/off phases), on top of
whatever the machine's other users do. Trial kinds are shuffled so each meets the same
load conditions.

The slower code does exactly more work: the baseline runs the reference router R times per
call, the candidate round(R * (1 + slowdown)) times (R = 20 gives 21, 22 and 24).

Usage:
    python benchmarks/bench_detector.py                     # ~10 minutes on 2 cores
    python benchmarks/bench_detector.py --identical 20 --per-slowdown 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from _args import check_output_path, check_range, non_negative_int, positive_float, positive_int

from moe_devkit.config import RouterConfig
from moe_devkit.diagnostics.regression import (
    ABSchedule,
    Comparison,
    DecisionPolicy,
    callable_sampler,
    compare_interleaved,
    decide,
)
from moe_devkit.routers.torch_router import DynamicMoERouter

LOAD_SCRIPT = """
import random, sys, time
rng = random.Random(int(sys.argv[1]))
while True:
    end = time.perf_counter() + rng.uniform(0.2, 3.0)
    while time.perf_counter() < end:
        pass
    time.sleep(rng.uniform(0.2, 3.0))
"""

REPS = 20


def make_work(reps: int) -> Callable[[], object]:
    """A call that runs the small reference router ``reps`` times."""
    torch.manual_seed(0)
    config = RouterConfig(hidden_size=128, num_experts=16, max_k=4, expert_hidden_size=256)
    router = DynamicMoERouter(config).eval()
    x = torch.randn(64, config.hidden_size)  # short calls: fewer samples time-sliced

    def work() -> None:
        with torch.no_grad():
            for _ in range(reps):
                router(x)

    return work


def wilson_upper(hits: int, n: int, z: float = 1.96) -> float:
    """Upper end of the 95% Wilson interval of a rate."""
    if n == 0:
        return 1.0
    p = hits / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre + half) / (1 + z * z / n)


def wilson_lower(hits: int, n: int, z: float = 1.96) -> float:
    return 1 - wilson_upper(n - hits, n, z)


def run_trials(args: argparse.Namespace) -> list[dict[str, object]]:
    trials = [0.0] * args.identical
    for slowdown in (0.05, 0.10, 0.20):
        trials += [slowdown] * args.per_slowdown
    random.Random(args.seed).shuffle(trials)
    works = {s: make_work(round(REPS * (1 + s))) for s in sorted({0.0, *trials})}
    baseline = callable_sampler(works[0.0])
    policy = DecisionPolicy(min_effect=args.min_effect)
    schedule = ABSchedule(
        budget_s=60.0, target_sample_s=args.sample_s, pairs=args.pairs, max_attempts=4
    )
    results: list[dict[str, object]] = []
    for i, slowdown in enumerate(trials):
        # The identical case gets a second, separate sampler of the same code.
        candidate = callable_sampler(make_work(REPS) if slowdown == 0 else works[slowdown])
        comp = compare_interleaved(
            f"trial{i}", baseline, candidate, clock="cpu", policy=policy, schedule=schedule
        )
        results.append(_record(comp, slowdown, policy))
        print(_line(i, len(trials), results[-1]), flush=True)
    return results


def _record(comp: Comparison, slowdown: float, policy: DecisionPolicy) -> dict[str, object]:
    wall = decide(comp.baseline_samples, comp.candidate_samples, clock="wall", policy=policy)
    # The same samples on the CPU clock without setting time-sliced pairs aside.
    unfiltered = replace(policy, max_slice_ratio=1e9)
    cpu_all = decide(comp.baseline_samples, comp.candidate_samples, policy=unfiltered)
    return {
        "slowdown": slowdown,
        "verdict": comp.decision.verdict,
        "ratio": comp.decision.ratio,
        "ci": [comp.decision.ci_low, comp.decision.ci_high],
        "pairs": comp.decision.pairs,
        "sliced": comp.decision.sliced,
        "attempts": comp.attempts,
        "elapsed": comp.elapsed,
        "wall_clock_verdict": wall.verdict,
        "wall_clock_ratio": wall.ratio,
        "cpu_unfiltered_verdict": cpu_all.verdict,
        "loadavg_1min": os.getloadavg()[0],
    }


def _line(i: int, n: int, r: dict[str, object]) -> str:
    return (
        f"[{i + 1}/{n}] slowdown={r['slowdown']:.2f} verdict={r['verdict']} "
        f"ratio={r['ratio']:.3f} pairs={r['pairs']} sliced={r['sliced']} "
        f"attempts={r['attempts']} {r['elapsed']:.1f}s wall-verdict={r['wall_clock_verdict']}"
    )


def summarise(results: list[dict[str, object]]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for slowdown in sorted({float(str(r["slowdown"])) for r in results}):
        group = [r for r in results if r["slowdown"] == slowdown]
        n = len(group)
        flagged = sum(r["verdict"] == "regression" for r in group)
        wall_flagged = sum(r["wall_clock_verdict"] == "regression" for r in group)
        unfiltered = sum(r["cpu_unfiltered_verdict"] == "regression" for r in group)
        loads = sorted(float(str(r["loadavg_1min"])) for r in group)
        inconclusive = sum(r["verdict"] == "inconclusive" for r in group)
        times = sorted(float(str(r["elapsed"])) for r in group)
        rows.append({
            "slowdown": slowdown, "trials": n, "regression": flagged,
            "rate": flagged / n, "rate_ci95": [wilson_lower(flagged, n), wilson_upper(flagged, n)],
            "inconclusive": inconclusive, "wall_clock_regression": wall_flagged,
            "cpu_unfiltered_regression": unfiltered, "median_loadavg": loads[n // 2],
            "median_ratio": sorted(float(str(r["ratio"])) for r in group)[n // 2],
            "median_s": times[n // 2], "max_s": times[-1],
        })  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identical", type=non_negative_int, default=50)
    parser.add_argument("--per-slowdown", type=non_negative_int, default=15)
    parser.add_argument("--pairs", type=positive_int, default=40)
    parser.add_argument("--sample-s", type=positive_float, default=0.004)
    parser.add_argument("--min-effect", type=float, default=0.05)
    parser.add_argument("--no-load", action="store_true", help="no second loading process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write trials and summary here")
    args = parser.parse_args()
    if args.identical == args.per_slowdown == 0:
        parser.error("--identical and --per-slowdown are both 0: no trials to run")
    check_range(parser, "--min-effect", args.min_effect, 0, 1, high_open=True)
    check_output_path(parser, args.json, "--json")  # before the ~10 minute run, not after it
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: end the load
    load = None
    if not args.no_load:
        load = subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT, str(args.seed)])
    start = time.perf_counter()
    try:
        results = run_trials(args)
    finally:
        if load is not None:
            load.kill()
            load.wait()
    summary = summarise(results)
    print(json.dumps(summary, indent=1))
    print(f"total {time.perf_counter() - start:.0f}s")
    if args.json:
        from moe_devkit.reporting import write_atomic

        payload = {"summary": summary, "trials": results, "args": vars(args) | {"json": None}}
        write_atomic(args.json, json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Step-time cost of recording a routing trace: a ``RoutingTraceRecorder`` attached to a model
against the same model without one, in one run.

The models are bench_training_overhead.py's (moe-devkit's reference MoEModel and a small
transformers Mixtral, built from config), in two modes: a training step (forward, backward,
optimizer) and a no-grad forward (the same call under ``torch.no_grad``, in eval mode: the
inference or rollout use). Per model and mode, four copies built from the same seed (same
weights, same batch, so the same routing and the same work) run side by side:

* ``plain``: no recorder;
* ``default``: ``RoutingTraceRecorder(model)``, its default bounded settings (65536 tokens, one
  chunk, no weights);
* ``weights``: the same with ``weights=True``;
* ``budget``: ``weights=True`` with a token budget that fills half way through the timed
  calls and chunks of two calls, so chunk flushes to the host are in the measurement and the
  later calls find the budget full.

Each round runs one block of ``--steps`` steps of every copy (the order rotates each round,
so machine load hits them alike); a case's ratio is the median over the rounds of its block
time over the plain block's of the same round, with a distribution-free 95% interval (order
statistics of the paired ratios). Beside it, the time spent inside the recorder's hooks as a
share of the recorded copy's step time (a direct reading, far less sensitive to load than a
ratio of two step times) and the aten ops those hooks issue per call (counted over one more
block, outside the timings). The goal (docs/traces.md: recording never waits for the device)
is a ratio of at most ``GOAL`` = 1.03.

    python benchmarks/bench_trace_recording.py                        # CPU, both models
    python benchmarks/bench_trace_recording.py --device cuda --json trace_recording.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _args import check_device, check_output_path, positive_int  # type: ignore[import-not-found]
from bench_moe_layer import machine_name  # type: ignore[import-not-found]
from bench_training_overhead import (  # type: ignore[import-not-found]
    MODELS,
    OpCounter,
    paired_interval,
    time_hooks,
)
from torch import nn

from moe_devkit.inspect.trace import RoutingTraceRecorder
from moe_devkit.reporting import write_atomic

GOAL = 1.03
MODES = ("train", "forward")
CASES = ("default", "weights", "budget")
CHUNK_CALLS = 2  # the budget case's chunk: two calls' tokens


@dataclass
class Copy:
    """One copy of the model, its step, and its recorder (None for the plain copy)."""

    model: nn.Module
    step: Callable[[], None]
    recorder: RoutingTraceRecorder | None
    spent: dict[str, float]
    counter: OpCounter


def tokens_per_call(name: str, device: torch.device) -> int:
    """Token positions one call of the model routes (read by a recorder on a throwaway copy)."""
    torch.manual_seed(0)
    model, loss_fn = MODELS[name](device)
    with RoutingTraceRecorder(model) as probe, torch.no_grad():
        loss_fn()
    if probe.rows_used >= probe.max_tokens:
        raise SystemExit(f"{name}: a call routes more than {probe.max_tokens} tokens")
    return probe.rows_used


def recorder_for(
    case: str, model: nn.Module, tokens: int, budget_calls: int
) -> RoutingTraceRecorder:
    if case == "default":
        return RoutingTraceRecorder(model)
    if case == "weights":
        return RoutingTraceRecorder(model, weights=True)
    return RoutingTraceRecorder(
        model,
        weights=True,
        max_tokens=tokens * budget_calls,
        chunk_tokens=tokens * CHUNK_CALLS,
    )


def build(
    name: str, mode: str, case: str, device: torch.device, tokens: int, budget_calls: int
) -> Copy:
    torch.manual_seed(0)  # the same weights and batch for every copy
    model, loss_fn = MODELS[name](device)
    model.train(mode == "train")
    spent = {"hooks": 0.0}
    counter = OpCounter()
    recorder = None
    if case != "plain":
        recorder = recorder_for(case, model, tokens, budget_calls).attach()
        time_hooks(recorder, spent, counter)  # the recorder's hooks, as the inspector's
    if mode == "train":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
            optimizer.step()

    else:

        def step() -> None:
            with torch.no_grad():
                loss_fn()

    return Copy(model, step, recorder, spent, counter)


def block(copy: Copy, steps: int, device: torch.device) -> float:
    """Milliseconds per step over ``steps`` steps (CUDA synchronised at both ends)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        copy.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def measure(name: str, mode: str, device: torch.device, reps: int, steps: int) -> dict[str, object]:
    tokens = tokens_per_call(name, device)
    # the warm-up and the op-count blocks, then half the timed calls
    budget_calls = 2 * steps + (reps * steps) // 2
    copies = {
        case: build(name, mode, case, device, tokens, budget_calls) for case in ("plain", *CASES)
    }
    for copy in copies.values():  # warm-up (lazy set-up, buffers allocated at the first call)
        block(copy, steps, device)
    for case in CASES:  # the recorder's aten ops while it records, over one block (not timed)
        copy = copies[case]
        with copy.counter:
            block(copy, steps, device)
        copy.spent["hooks"] = 0.0
    rows_before = {case: copies[case].recorder.rows_used for case in CASES}  # type: ignore[union-attr]
    flushes_before = {case: len(copies[case].recorder._chunks) for case in CASES}  # type: ignore[union-attr]
    names = list(copies)
    times: dict[str, list[float]] = {case: [] for case in names}
    for i in range(reps):  # one block of each copy a round, the order rotating
        order = names[i % len(names) :] + names[: i % len(names)]
        for case in order:
            times[case].append(block(copies[case], steps, device))
    plain = times["plain"]
    result: dict[str, object] = {
        "model": name,
        "mode": mode,
        "tokens_per_call": tokens,
        "plain_ms_per_step": statistics.median(plain),
        "cases": {},
    }
    for case in CASES:
        copy = copies[case]
        recorder = copy.recorder
        assert recorder is not None
        timed_rows = recorder.rows_used - rows_before[case]
        flushes = len(recorder._chunks) - flushes_before[case]
        ratios = [w / p for w, p in zip(times[case], plain, strict=True)]
        low, high = paired_interval(ratios)
        trace = recorder.trace()
        recorder.detach()
        result["cases"][case] = {  # type: ignore[index]
            "ms_per_step": statistics.median(times[case]),
            "ratio": statistics.median(ratios),
            "ratio_95": [low, high],
            "meets_goal": statistics.median(ratios) <= GOAL,
            "hook_share": copy.spent["hooks"] / (sum(times[case]) * steps / 1e3),
            "hook_ops_per_call": copy.counter.ops["hooks"] / steps,
            "max_tokens": recorder.max_tokens,
            "chunk_tokens": recorder.chunk_tokens,
            "weights": recorder.record_weights,
            "timed_calls_recorded": timed_rows // tokens,
            "timed_calls": reps * steps,
            "timed_chunk_flushes": flushes,
            "device_bytes": recorder.device_bytes,
            "trace_tokens": trace.num_tokens,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=("reference", "hf", "both"), default="both")
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both")
    parser.add_argument("--reps", type=positive_int, default=8, help="rounds (block pairs)")
    parser.add_argument("--steps", type=positive_int, default=4, help="steps per block")
    parser.add_argument("--threads", type=positive_int, help="torch intra-op threads")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    check_device(parser, args.device)
    check_output_path(parser, args.json, "--json")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = ("reference", "hf") if args.model == "both" else (args.model,)
    modes = MODES if args.mode == "both" else (args.mode,)
    results = [
        measure(name, mode, device, args.reps, args.steps) for name in names for mode in modes
    ]
    machine = machine_name(device)
    print(f"machine: {machine}")
    for r in results:
        print(
            f"{r['model']} {r['mode']}: plain {r['plain_ms_per_step']:.2f} ms/step "
            f"({r['tokens_per_call']} tokens a call; {args.reps} rounds of {args.steps} steps)"
        )
        for case, c in r["cases"].items():  # type: ignore[attr-defined]
            low, high = c["ratio_95"]
            print(
                f"  {case:8s} {c['ms_per_step']:.2f} ms/step, ratio {c['ratio']:.4f} "
                f"(95% {low:.4f}-{high:.4f}) {'<=' if c['meets_goal'] else '>'} {GOAL}; "
                f"inside the recorder {100 * c['hook_share']:.2f}% of the step, "
                f"{c['hook_ops_per_call']:.1f} aten ops a recorded call; recorded "
                f"{c['timed_calls_recorded']} of {c['timed_calls']} timed calls, "
                f"{c['timed_chunk_flushes']} chunk flushes, {c['device_bytes']} device bytes"
            )
    if args.json:
        payload = {
            "machine": machine,
            "device": str(device),
            "goal": GOAL,
            "reps": args.reps,
            "steps_per_block": args.steps,
            "threads": torch.get_num_threads(),
            "results": results,
        }
        write_atomic(args.json, json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()

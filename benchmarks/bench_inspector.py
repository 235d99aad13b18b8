"""RouterInspector overhead on a MoELayer forward, measured as a ratio in one run.

The layer is timed alternately with and without the inspector attached, so machine load hits
both alike; on CUDA each forward is timed with CUDA events and the inspector's recording is
also run under ``torch.cuda.set_sync_debug_mode("error")`` to prove it never synchronises.

    python benchmarks/bench_inspector.py                                  # CPU
    python benchmarks/bench_inspector.py --device cuda --preset olmoe --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from _args import check_device, check_output_path, positive_int  # type: ignore[import-not-found]
from bench_moe_layer import PRESETS, machine_name, timer  # type: ignore[import-not-found]

from moe_devkit import MoELayer, RouterConfig
from moe_devkit.inspect import InspectorConfig, RouterInspector
from moe_devkit.reporting import write_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--reps", type=positive_int, default=30)
    parser.add_argument(
        "--window",
        type=positive_int,
        default=16,
        help="forwards per sample (default 16; with --defer-steps N > 1 the inspector folds "
        "its deferred steps every N forwards under CUDA graphs, so pick a multiple of N)",
    )
    parser.add_argument(
        "--defer-steps",
        type=positive_int,
        default=None,
        help="InspectorConfig.defer_steps (default: its)",
    )
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    check_device(parser, args.device)
    check_output_path(parser, args.json, "--json")  # before the run, not after it
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    tokens, hidden, ffn, experts, max_k = PRESETS[args.preset]
    torch.manual_seed(0)
    config = RouterConfig(
        hidden_size=hidden, num_experts=experts, max_k=max_k, expert_hidden_size=ffn
    )
    layer = MoELayer(config).to(device, dtype)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    overrides = {} if args.defer_steps is None else {"defer_steps": args.defer_steps}
    inspector = RouterInspector(config=InspectorConfig(**overrides))
    time_ms = timer(device)
    samples: dict[str, list[float]] = {"plain": [], "inspected": []}
    with torch.inference_mode():
        for _ in range(3):
            layer(x)
        inspector.attach(layer)
        layer(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # raises if recording syncs
            layer(x)
            torch.cuda.set_sync_debug_mode(0)
        inspector.detach()

        def forwards() -> None:
            for _ in range(args.window):
                layer(x)

        for _ in range(args.reps):
            samples["plain"].append(time_ms(forwards) / args.window)
            inspector.attach(layer)
            samples["inspected"].append(time_ms(forwards) / args.window)
            inspector.detach()
    plain, inspected = (statistics.median(samples[k]) for k in ("plain", "inspected"))
    overhead = inspected / plain - 1
    result = {
        "machine": machine_name(device),
        "shape": dict(tokens=tokens, hidden=hidden, ffn=ffn, experts=experts, max_k=max_k),
        "dtype": args.dtype,
        "plain_ms": plain,
        "inspected_ms": inspected,
        "overhead": overhead,
        "forwards_per_sample": args.window,
        "recorded_steps": inspector.layers["router"].steps,
    }
    print(f"machine: {result['machine']}")
    print(
        f"shape {result['shape']} {args.dtype}, {args.reps} alternating reps of "
        f"{args.window} forwards (times per forward)"
    )
    print(f"plain {plain:.3f} ms, inspected {inspected:.3f} ms, overhead {100 * overhead:+.2f}%")
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

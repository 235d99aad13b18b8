"""NumericsGuard overhead on a reference MoELayer training step (default, non-strict mode).

Usage: python benchmarks/bench_numerics_guard.py [--device cpu|cuda] [--repeats 20]
       [--steps 10] [--tokens 1024] [--preset small|olmoe] [--dtype float32|bfloat16]

Presets: ``small`` (hidden 256, 16 experts, k = 2: launch-bound, the guard's worst case; the
CPU default) and ``olmoe`` (hidden 2048, expert FFN 1024, 64 experts, dynamic k up to 8,
bfloat16: the realistic size of the other GPU benchmarks; the CUDA default).

Alternates A (no guard) and B (guard attached) repetitions of ``--steps`` training steps in
the same process; each repetition is timed with CUDA events on the GPU (perf_counter on the
CPU), and the guard's flags are read once per B repetition, after the timed region (the
guard's contract: no host synchronisation between checks). Prints median times and the
overhead ratio B / A.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from _args import check_device, positive_int

from moe_devkit.config import RouterConfig
from moe_devkit.diagnostics.numerics import NumericsGuard
from moe_devkit.routers.torch_router import MoELayer

PRESETS = {
    "small": RouterConfig(hidden_size=256, num_experts=16, min_k=2, max_k=2),
    "olmoe": RouterConfig(hidden_size=2048, num_experts=64, max_k=8, expert_hidden_size=1024),
}


def make_step(
    device: torch.device,
    tokens: int,
    preset: str = "small",
    dtype: torch.dtype = torch.float32,
) -> tuple[MoELayer, Callable[[], None]]:
    torch.manual_seed(0)
    config = PRESETS[preset]
    layer = MoELayer(config).to(device, dtype)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1e-3)
    x = torch.randn(tokens // 128, 128, config.hidden_size, device=device, dtype=dtype)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = layer(x)
        (out.hidden_states.square().mean() + out.routing.aux_loss).backward()
        optimizer.step()

    return layer, step


def time_steps(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` training steps."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / 1e3
    begin = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument(
        "--tokens", type=positive_int, default=1024, help="a multiple of 128 (sequence length)"
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="default: olmoe on CUDA, small on the CPU"
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on CUDA, else float32"
    )
    args = parser.parse_args()
    if args.tokens % 128:
        parser.error(
            f"--tokens must be a multiple of 128 (sequences of 128 tokens); got {args.tokens}"
        )
    check_device(parser, args.device)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.preset = args.preset or ("olmoe" if cuda else "small")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    layer, step = make_step(device, args.tokens, args.preset, getattr(torch, args.dtype))
    guard = NumericsGuard(layer)
    for attached in (False, True, False, True):  # warm-up both paths
        if attached:
            guard.attach()
        time_steps(step, 2, device)
        guard.detach()
    plain, guarded = [], []
    for _ in range(args.repeats):
        plain.append(time_steps(step, args.steps, device))
        guard.attach()
        guarded.append(time_steps(step, args.steps, device))
        guard.detach()
        findings = guard.check()  # one read per repetition, outside the timed region
        if findings:
            raise SystemExit(f"unexpected finding: {findings[0].message}")
    a, b = statistics.median(plain) / args.steps, statistics.median(guarded) / args.steps
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"machine: {platform.machine()} {name or platform.platform()}, torch {torch.__version__}")
    print(
        f"threads: {torch.get_num_threads()}, preset {args.preset}, {args.dtype}, "
        f"tokens: {args.tokens}, steps/rep: {args.steps}"
    )
    print(f"no guard:   {a * 1e3:8.3f} ms/step (median of {args.repeats})")
    print(f"with guard: {b * 1e3:8.3f} ms/step")
    print(f"overhead: {100 * (b / a - 1):+.1f}% (ratio {b / a:.3f})")


if __name__ == "__main__":
    main()

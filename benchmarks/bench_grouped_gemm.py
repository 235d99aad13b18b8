"""GPU: grouped GEMM for the MoE experts, Triton vs torch._grouped_mm vs a loop over groups.

Default size: M=32768 rows, K=2048, N=2048, G=64 groups of random sizes (one group empty,
256 padding rows past offs[-1]), b read transposed from [G, N, K] weights as the experts do.
For each dtype (bfloat16, float32) it times, with CUDA events (median of --iters runs after
--warmup runs), the forward and the forward + backward of:

* ``triton``: ``moe_devkit.kernels.triton_grouped.grouped_mm`` (no host sync);
* ``torch._grouped_mm``: CUTLASS on sm90/sm100 for bfloat16; for float32 torch's fallback,
  which copies offs to the host (the sync this Triton kernel exists to avoid);
* ``looped``: one matmul per group over ``offs.tolist()`` (one host sync), the experts'
  fallback.

It also reports each method's largest error relative to a float64 reference on 4 groups.

Usage (on the GPU machine):
    python benchmarks/bench_grouped_gemm.py
    python benchmarks/bench_grouped_gemm.py --dtypes bfloat16 --m 8192 --json build/gg.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _args import check_output_path, non_negative_int, positive_int

from moe_devkit.kernels import triton_grouped
from moe_devkit.reporting import write_atomic

Matmul = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def triton_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return triton_grouped.grouped_mm(a, b, offs)


def torch_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


def looped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = a.new_zeros(a.shape[0], b.shape[2])
    start = 0
    for group, end in enumerate(offs.tolist()):  # one host sync
        if end > start:
            out[start:end] = a[start:end] @ b[group]
        start = end
    return out


METHODS: dict[str, Matmul] = {
    "triton": triton_mm,
    "torch._grouped_mm": torch_mm,
    "looped": looped_mm,
}


def make_offsets(rows: int, groups: int, padding: int, seed: int) -> torch.Tensor:
    """int32[G]: random group sizes summing to rows - padding, group 1 empty."""
    gen = torch.Generator().manual_seed(seed)
    choice = torch.randint(0, groups, (rows - padding,), generator=gen)
    choice = torch.where(choice == 1, 0, choice)
    counts = torch.bincount(choice, minlength=groups)
    return counts.cumsum(0).to(torch.int32).cuda()


def time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds of fn over iters runs, each between two CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def max_rel_error(method: Matmul, dtype: torch.dtype) -> float:
    """Largest error against float64 on a small case, relative to the largest value."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(1000, 256, generator=gen).cuda()
    w = torch.randn(4, 384, 256, generator=gen).cuda()
    offs = torch.tensor([0, 300, 301, 900], dtype=torch.int32, device="cuda")
    out = method(a.to(dtype), w.to(dtype).transpose(-2, -1), offs).double()
    ref = looped_mm(a.double(), w.double().transpose(-2, -1), offs)
    return float((out[:900] - ref[:900]).abs().max() / ref.abs().max())


def bench(args: argparse.Namespace, dtype: torch.dtype) -> list[dict[str, object]]:
    torch.manual_seed(0)
    a = torch.randn(args.m, args.k, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(args.groups, args.n, args.k, device="cuda") * args.k**-0.5).to(dtype)
    w.requires_grad_()
    offs = make_offsets(args.m, args.groups, args.padding, seed=0)
    grad_out = torch.randn(args.m, args.n, device="cuda", dtype=dtype)
    real_rows = args.m - args.padding
    flops = 2 * real_rows * args.k * args.n
    rows: list[dict[str, object]] = []
    for name, method in METHODS.items():

        def forward(method: Matmul = method) -> torch.Tensor:
            with torch.no_grad():
                return method(a, w.transpose(-2, -1), offs)

        def train(method: Matmul = method) -> None:
            method(a, w.transpose(-2, -1), offs).backward(grad_out)

        fwd = time_ms(forward, args.warmup, args.iters)
        fwd_bwd = time_ms(train, args.warmup, args.iters)
        rows.append(
            {
                "dtype": str(dtype).removeprefix("torch."),
                "method": name,
                "forward_ms": round(fwd, 3),
                "forward_tflops": round(flops / fwd / 1e9, 1),
                "fwd_bwd_ms": round(fwd_bwd, 3),
                "fwd_bwd_tflops": round(3 * flops / fwd_bwd / 1e9, 1),
                "max_rel_error": max_rel_error(method, dtype),
            }
        )
        a.grad = w.grad = None
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--m", type=positive_int, default=32768)
    parser.add_argument("--k", type=positive_int, default=2048)
    parser.add_argument("--n", type=positive_int, default=2048)
    parser.add_argument("--groups", type=positive_int, default=64)
    parser.add_argument("--padding", type=non_negative_int, default=256, help="rows past offs[-1]")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=("bfloat16", "float16", "float32"),
        default=["bfloat16", "float32"],
    )
    parser.add_argument("--warmup", type=non_negative_int, default=3)
    parser.add_argument("--iters", type=positive_int, default=20)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.padding >= args.m:
        parser.error(f"--padding must be in [0, --m) = [0, {args.m}); got {args.padding}")
    check_output_path(parser, args.json, "--json")  # before the run, not after it
    if not torch.cuda.is_available() or not triton_grouped.is_available():
        print("bench_grouped_gemm: needs a CUDA device and Triton", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"M={args.m} K={args.k} N={args.n} G={args.groups} padding={args.padding}")
    rows = [row for name in args.dtypes for row in bench(args, getattr(torch, name))]
    header = f"{'dtype':9} {'method':18} {'fwd ms':>8} {'TFLOP/s':>8} {'fwd+bwd ms':>11} "
    print(header + f"{'TFLOP/s':>8} {'max rel err':>11}")
    for r in rows:
        print(
            f"{r['dtype']:9} {r['method']:18} {r['forward_ms']:8.3f} {r['forward_tflops']:8.1f} "
            f"{r['fwd_bwd_ms']:11.3f} {r['fwd_bwd_tflops']:8.1f} {r['max_rel_error']:11.2e}"
        )
    if args.json is not None:
        write_atomic(args.json, json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Gradient statistics: the naive per-parameter ``.item()`` loop vs the fused path.

Usage: python benchmarks/bench_gradients.py [--device cpu|cuda] [--repeats 20]

Both run in the same process on the same gradients (a model with >= 100 parameter tensors);
the ratio printed is seed time / fused time, medians over alternating repetitions.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from _args import check_device, positive_int
from naive_reference import naive_debug_gradients as seed_debug_gradients
from torch import nn

from moe_devkit.diagnostics.gradients import gradient_statistics


def make_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(40):  # 40 x (Linear weight, bias, LayerNorm weight, bias) = 160 tensors
        layers += [nn.Linear(256, 256), nn.LayerNorm(256), nn.GELU()]
    model = nn.Sequential(*layers).to(device)
    model(torch.randn(64, 256, device=device)).square().mean().backward()
    return model


def timed(fn: object, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=positive_int, default=20)
    args = parser.parse_args()
    check_device(parser, args.device)
    device = torch.device(args.device)
    model = make_model(device)
    tensors = sum(1 for _ in model.parameters())
    for _ in range(3):  # warm-up
        seed_debug_gradients(model)
        gradient_statistics(model)
    seed, fused = [], []
    for _ in range(args.repeats):  # alternate A/B
        seed.append(timed(lambda: seed_debug_gradients(model), device))
        fused.append(timed(lambda: gradient_statistics(model), device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    s, f = statistics.median(seed), statistics.median(fused)
    print(f"machine: {platform.machine()} {name or platform.platform()}, torch {torch.__version__}")
    print(f"threads: {torch.get_num_threads()}, parameter tensors: {tensors}")
    print(f"seed per-parameter loop: {s * 1e3:8.2f} ms (median of {args.repeats})")
    print(f"fused (one transfer):    {f * 1e3:8.2f} ms")
    print(f"speed-up: {s / f:.1f}x")


if __name__ == "__main__":
    main()

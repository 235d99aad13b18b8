"""Per-call timing: ``measure`` and its ``Measurement`` summary (median, p10/p90/p99).

CUDA events on CUDA (no host sync inside the loop), ``perf_counter`` with the thread's CPU
time on CPU; always after a warm-up and never inside the profiler.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from moe_devkit._checks import require_int

Timer = Callable[[], float]


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """Timing summary of many iterations of one call; times in seconds per call.

    Attributes:
        name: what was measured.
        device: "cpu", "cuda:0", ...
        n: iterations measured (after warm-up).
        median, mean, p10, p90, p99, min: wall (CPU) or CUDA-event (GPU) times per call.
        cpu_median: median thread CPU time per call (host-side work on CUDA).
        method: "perf_counter" or "cuda_events".
    """

    name: str
    device: str
    n: int
    median: float
    mean: float
    p10: float
    p90: float
    p99: float
    min: float
    cpu_median: float
    method: str

    @classmethod
    def from_times(
        cls, name: str, device: str, times: Sequence[float], cpu_times: Sequence[float],
        method: str,
    ) -> Measurement:  # fmt: skip
        """Summarises per-iteration times (seconds)."""
        if not times:
            raise ValueError(f"times must hold at least one value; got none for {name!r}")
        t = np.asarray(times, dtype=np.float64)
        p10, p50, p90, p99 = np.percentile(t, [10, 50, 90, 99])
        cpu = float(np.median(cpu_times)) if cpu_times else math.nan
        return cls(
            name=name, device=device, n=len(t), median=float(p50), mean=float(t.mean()),
            p10=float(p10), p90=float(p90), p99=float(p99), min=float(t.min()),
            cpu_median=cpu, method=method,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        return cls(**data)


def measure(
    fn: Callable[[], object],
    *,
    name: str = "call",
    device: torch.device | str = "cpu",
    warmup: int = 10,
    iterations: int = 100,
    timer: Timer = time.perf_counter,
    cpu_timer: Timer = time.thread_time,
) -> Measurement:
    """Times ``fn`` per iteration after a warm-up.

    On CUDA each iteration is timed with a pair of CUDA events (device time, no host sync
    inside the loop) and the stream is synchronised once at the end; on CPU with ``timer``.

    Args:
        fn: the call to time (run under the caller's grad mode).
        name: label of the Measurement.
        device: where fn runs; selects the timing method.
        warmup: untimed calls first (allocator, caches, lazy init, autotuning).
        iterations: timed calls.
        timer, cpu_timer: wall and thread-CPU clocks (injectable for tests).

    Raises:
        TypeError, ValueError: iterations not an int >= 1, or warmup not an int >= 0.
    """
    require_int("iterations", iterations, 1)
    require_int("warmup", warmup, 0)
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    if dev.type == "cuda":
        return _measure_cuda(fn, name, dev, iterations, cpu_timer)
    times, cpu_times = [], []
    for _ in range(iterations):
        wall0, cpu0 = timer(), cpu_timer()
        fn()
        wall1, cpu1 = timer(), cpu_timer()
        times.append(wall1 - wall0)
        cpu_times.append(cpu1 - cpu0)
    return Measurement.from_times(name, str(dev), times, cpu_times, "perf_counter")


def _measure_cuda(
    fn: Callable[[], object], name: str, dev: torch.device, iterations: int, cpu_timer: Timer
) -> Measurement:
    torch.cuda.synchronize(dev)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iterations)]  # type: ignore[no-untyped-call]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iterations)]  # type: ignore[no-untyped-call]
    cpu_times = []
    for start, end in zip(starts, ends, strict=True):
        cpu0 = cpu_timer()
        start.record()
        fn()
        end.record()
        cpu_times.append(cpu_timer() - cpu0)
    torch.cuda.synchronize(dev)
    times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends, strict=True)]  # ms -> s
    return Measurement.from_times(name, str(dev), times, cpu_times, "cuda_events")

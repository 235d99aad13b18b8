"""Per-call timing: ``measure`` and its ``Measurement`` summary (median, p10/p90/p99);
``measure_in_turns`` times several calls alternately, for paired comparisons.

CUDA events on CUDA (no host sync inside the loop), ``perf_counter`` with the thread's CPU
time on CPU; always after a warm-up and never inside the profiler.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from moe_devkit._checks import require_int

Timer = Callable[[], float]
Samples = dict[str, tuple[list[float], list[float]]]  # name -> (times, cpu_times), seconds


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
        times: the per-iteration times the summary was made from, in order.
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
    times: tuple[float, ...] = field(default=(), repr=False)

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
            cpu_median=cpu, method=method, times=tuple(float(v) for v in t),
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        return cls(**{**data, "times": tuple(data.get("times", ()))})


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
    return measure_in_turns(
        {name: fn}, device=device, warmup=warmup, iterations=iterations, timer=timer,
        cpu_timer=cpu_timer,
    )[name]  # fmt: skip


def measure_in_turns(
    fns: Mapping[str, Callable[[], object]],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 10,
    iterations: int = 100,
    timer: Timer = time.perf_counter,
    cpu_timer: Timer = time.thread_time,
) -> dict[str, Measurement]:
    """Times several calls in turns: each iteration runs every call once, as ``measure`` does.

    The order of the calls is reversed every other iteration, so that a change in the
    machine's load, or the cache one call leaves behind, hits all of them alike: the i-th
    times of two Measurements form a pair.

    Args:
        fns: the calls to time, by name (the names of the Measurements).
        device, warmup, iterations, timer, cpu_timer: see ``measure``; warmup and iterations
            count the calls of each.

    Raises:
        TypeError, ValueError: iterations not an int >= 1, or warmup not an int >= 0.
    """
    require_int("iterations", iterations, 1)
    require_int("warmup", warmup, 0)
    dev = torch.device(device)
    for i in range(warmup):
        for _, fn in _turn(fns, i):
            fn()
    if dev.type == "cuda":
        samples, method = _times_cuda(fns, dev, iterations, cpu_timer), "cuda_events"
    else:
        samples, method = _times_host(fns, iterations, timer, cpu_timer), "perf_counter"
    return {
        name: Measurement.from_times(name, str(dev), times, cpu_times, method)
        for name, (times, cpu_times) in samples.items()
    }


def _turn(
    fns: Mapping[str, Callable[[], object]], i: int
) -> list[tuple[str, Callable[[], object]]]:
    """The calls of iteration i: in order on even i, reversed on odd i."""
    items = list(fns.items())
    return items if i % 2 == 0 else items[::-1]


def _times_host(
    fns: Mapping[str, Callable[[], object]], iterations: int, timer: Timer, cpu_timer: Timer
) -> Samples:
    samples: Samples = {name: ([], []) for name in fns}
    for i in range(iterations):
        for name, fn in _turn(fns, i):
            wall0, cpu0 = timer(), cpu_timer()
            fn()
            wall1, cpu1 = timer(), cpu_timer()
            samples[name][0].append(wall1 - wall0)
            samples[name][1].append(cpu1 - cpu0)
    return samples


def _times_cuda(
    fns: Mapping[str, Callable[[], object]], dev: torch.device, iterations: int, cpu_timer: Timer
) -> Samples:
    torch.cuda.synchronize(dev)
    events = {name: [_event_pair() for _ in range(iterations)] for name in fns}
    cpu_times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(iterations):
        for name, fn in _turn(fns, i):
            start, end = events[name][i]
            cpu0 = cpu_timer()
            start.record()
            fn()
            end.record()
            cpu_times[name].append(cpu_timer() - cpu0)
    torch.cuda.synchronize(dev)
    return {  # elapsed_time is in ms
        name: ([s.elapsed_time(e) / 1e3 for s, e in pairs], cpu_times[name])
        for name, pairs in events.items()
    }


def _event_pair() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    return start, torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]

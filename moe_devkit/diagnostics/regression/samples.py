"""Timed samples of the code under test: ``Sample``, the ``Sampler`` protocol and its clocks.

A Sample holds the wall and thread-CPU time per call of one batch of calls; the ratio of the
two tells whether the thread was time-sliced. ``callable_sampler`` wraps an in-process
callable; the perf suite's ``WorkerProcess.sampler`` (benchmarks/perf/worker.py) times a
revision in a worker process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Literal, NamedTuple

Clock = Literal["cpu", "wall"]


class Sample(NamedTuple):
    """One timed sample: ``number`` calls, times per call in seconds.

    Attributes:
        wall: wall-clock seconds per call (``time.perf_counter``).
        cpu: CPU seconds per call of the calling thread (``time.thread_time``).
        number: calls in the sample.
    """

    wall: float
    cpu: float
    number: int

    def value(self, clock: Clock) -> float:
        """The time per call on ``clock``."""
        return self.cpu if clock == "cpu" else self.wall

    def slicing_ratio(self) -> float:
        """wall / cpu; well above 1 means the thread waited for a core (time-sliced)."""
        return self.wall / self.cpu if self.cpu > 0 else math.inf


Sampler = Callable[[int], Sample]
"""Runs ``number`` calls of the code under test and returns their timings."""


def callable_sampler(
    fn: Callable[[], object],
    *,
    sync: Callable[[], None] | None = None,
    timer: Callable[[], float] = time.perf_counter,
    cpu_timer: Callable[[], float] = time.thread_time,
) -> Sampler:
    """Wraps a zero-argument callable as a Sampler.

    Args:
        fn: the code under test.
        sync: called before each clock read (e.g. ``torch.cuda.synchronize``).
        timer: wall clock (injectable for tests).
        cpu_timer: thread CPU clock (injectable for tests).
    """

    def sample(number: int) -> Sample:
        if sync is not None:
            sync()
        wall0, cpu0 = timer(), cpu_timer()
        for _ in range(number):
            fn()
        if sync is not None:
            sync()
        wall1, cpu1 = timer(), cpu_timer()
        return Sample((wall1 - wall0) / number, (cpu1 - cpu0) / number, number)

    return sample

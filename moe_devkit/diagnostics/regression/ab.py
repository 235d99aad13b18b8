"""Interleaved A/B runs: baseline and candidate sampled alternately (ABBA), then decided.

``compare_interleaved`` calibrates the calls per sample, collects pairs within a wall-clock
budget and repeats (bounded) while ``decide`` finds the run inconclusive.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from moe_devkit.diagnostics.regression.decision import Decision, DecisionPolicy, decide, is_sliced
from moe_devkit.diagnostics.regression.samples import Clock, Sample, Sampler
from moe_devkit.diagnostics.regression.stats import median_or_nan


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """An interleaved A/B comparison of one benchmark case.

    Attributes:
        name: the case.
        decision: the final verdict and its statistics.
        attempts: runs made (more than one when earlier ones were inconclusive).
        number: calls per sample.
        baseline_wall, candidate_wall: median wall seconds per call (clean pairs).
        baseline_cpu, candidate_cpu: median thread CPU seconds per call (clean pairs).
        elapsed: seconds the comparison took.
        baseline_samples, candidate_samples: every sample, pair i at index i.
    """

    name: str
    decision: Decision
    attempts: int
    number: int
    baseline_wall: float
    candidate_wall: float
    baseline_cpu: float
    candidate_cpu: float
    elapsed: float
    baseline_samples: tuple[Sample, ...] = ()
    candidate_samples: tuple[Sample, ...] = ()

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        """JSON-serialisable form; the raw samples only when ``samples`` is true."""
        data = {k: v for k, v in asdict(self).items() if not k.endswith("_samples")}
        data["decision"] = self.decision.to_dict()
        if samples:
            data["baseline_samples"] = [s._asdict() for s in self.baseline_samples]
            data["candidate_samples"] = [s._asdict() for s in self.candidate_samples]
        return data


@dataclass(frozen=True, kw_only=True)
class ABSchedule:
    """How much an interleaved comparison samples.

    Attributes:
        budget_s: wall-clock ceiling of one comparison, repeats included.
        target_sample_s: calls per sample are chosen so a sample lasts about this long.
        pairs: pairs per attempt.
        max_attempts: attempts while the result is inconclusive.
        warmup: warm-up samples of each side before measuring.
    """

    budget_s: float = 60.0
    target_sample_s: float = 0.02
    pairs: int = 40
    max_attempts: int = 4
    warmup: int = 2


def calibrate(sampler: Sampler, target_s: float, *, limit: int = 1 << 20) -> int:
    """Calls per sample so that a sample lasts at least ``target_s`` wall seconds."""
    number = 1
    while number < limit:
        sample = sampler(number)
        if sample.wall * number >= target_s:
            break
        grow = target_s / max(sample.wall * number, 1e-9)
        number = min(limit, max(number * 2, math.ceil(number * min(grow, 100.0))))
    return number


def _collect(
    baseline: Sampler, candidate: Sampler, number: int, pairs: int, deadline: float,
    timer: Callable[[], float], out_base: list[Sample], out_cand: list[Sample],
) -> None:  # fmt: skip
    for i in range(pairs):
        if timer() > deadline:
            return
        # ABBA order: a drift within a pair hurts each side equally often.
        if i % 2 == 0:
            b, c = baseline(number), candidate(number)
        else:
            c, b = candidate(number), baseline(number)
        out_base.append(b)
        out_cand.append(c)


def compare_interleaved(
    name: str,
    baseline: Sampler,
    candidate: Sampler,
    *,
    clock: Clock = "cpu",
    policy: DecisionPolicy | None = None,
    schedule: ABSchedule | None = None,
    timer: Callable[[], float] = time.perf_counter,
    settle: Callable[[], None] | None = None,
) -> Comparison:
    """Samples baseline and candidate alternately and decides; repeats while inconclusive.

    Both sides are warmed up alike before the first measured pair: ``schedule.warmup``
    single calls each, then the calls calibration gave the baseline, repeated on the
    candidate. Samples of all attempts accumulate; time-sliced pairs are set aside by
    ``decide``.

    Args:
        name: the case name reported.
        baseline, candidate: Samplers of the two versions.
        clock: the clock decided on ("cpu" for CPU code, "wall" for synchronised CUDA).
        policy: decision thresholds.
        schedule: sampling budget.
        timer: the clock of the budget (injectable for tests).
        settle: called before the warm-up and before each further attempt, while neither
            side runs (e.g. the perf suite's ``CorePlacement.settle``, benchmarks/perf/
            worker.py: move both workers to the quietest CPU); its time counts in the budget.
    """
    policy, schedule = policy or DecisionPolicy(), schedule or ABSchedule()
    start = timer()
    deadline = start + schedule.budget_s
    if settle is not None:
        settle()
    for _ in range(schedule.warmup):
        baseline(1)
        candidate(1)
    tried: list[int] = []

    def calibrating(n: int) -> Sample:
        tried.append(n)
        return baseline(n)

    number = calibrate(calibrating, schedule.target_sample_s)
    for n in tried:  # the candidate gets the very calls calibration gave the baseline
        candidate(n)
    base: list[Sample] = []
    cand: list[Sample] = []
    attempts = 0
    decision = decide(base, cand, clock=clock, policy=policy)
    while attempts < schedule.max_attempts and timer() < deadline:
        if attempts and settle is not None:
            settle()
        attempts += 1
        _collect(baseline, candidate, number, schedule.pairs, deadline, timer, base, cand)
        decision = decide(base, cand, clock=clock, policy=policy)
        if decision.verdict != "inconclusive":
            break
    keep = [
        (b, c) for b, c in zip(base, cand, strict=True)
        if clock == "wall" or not (is_sliced(b, policy) or is_sliced(c, policy))
    ] or list(zip(base, cand, strict=True))  # fmt: skip
    return Comparison(
        name=name,
        decision=decision,
        attempts=attempts,
        number=number,
        baseline_wall=median_or_nan([b.wall for b, _ in keep]),
        candidate_wall=median_or_nan([c.wall for _, c in keep]),
        baseline_cpu=median_or_nan([b.cpu for b, _ in keep]),
        candidate_cpu=median_or_nan([c.cpu for _, c in keep]),
        elapsed=timer() - start,
        baseline_samples=tuple(base),
        candidate_samples=tuple(cand),
    )

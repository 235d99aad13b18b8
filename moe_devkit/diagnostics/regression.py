"""Performance-regression detection that stays right on noisy, shared machines.

The seed's detector compared one timed call against a stored absolute number; on a shared
2-core machine that flags 42% of identical-code comparisons, and a stored number does not
transfer between two GPU machines of the same kind. This module decides instead from an
interleaved A/B run: baseline and candidate are sampled alternately (ABBA order) in the same
run, each sample records wall time and thread CPU time, and

* pairs whose wall/CPU ratio shows time-slicing are set aside; a run with too few clean
  pairs is *inconclusive* and repeated (bounded), never failed;
* a regression is confirmed only when it is significant (the bootstrap confidence interval
  of the median paired ratio excludes 1, and the one-sided Wilcoxon signed-rank test on the
  paired log-ratios agrees) AND at least the minimum effect size.

Why paired tests: on a shared machine a neighbour's load moves the CPU time of both sides by
up to 50% for seconds at a time; an unpaired test (Mann-Whitney U) sees that as noise and
loses its power, while the ratio within a pair, taken milliseconds apart, barely moves.

The deterministic gates (operator counts, FLOPs, host synchronisations, memory growth) live
in ``moe_devkit.diagnostics.perf_gates``; stored baselines in ``BaselineStore``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np

Clock = Literal["cpu", "wall"]
Verdict = Literal["pass", "regression", "improvement", "inconclusive"]
VERDICTS: tuple[Verdict, ...] = ("pass", "regression", "improvement", "inconclusive")


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


# ----------------------------------------------------------------------------- statistics


def _rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def mann_whitney_greater(candidate: Sequence[float], baseline: Sequence[float]) -> float:
    """One-sided p-value that ``candidate`` is stochastically greater than ``baseline``.

    Normal approximation with tie and continuity corrections (fine from ~8 samples a side).
    """
    x, y = np.asarray(candidate, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        return 1.0
    ranks = _rankdata(np.concatenate([x, y]))
    u1 = float(ranks[:n1].sum()) - n1 * (n1 + 1) / 2
    _, tie_counts = np.unique(np.concatenate([x, y]), return_counts=True)
    n = n1 + n2
    tie_term = float(((tie_counts**3) - tie_counts).sum()) / (n * (n - 1)) if n > 1 else 0.0
    variance = n1 * n2 / 12 * ((n + 1) - tie_term)
    if variance <= 0:
        return 1.0
    z = (u1 - n1 * n2 / 2 - 0.5) / math.sqrt(variance)
    return 0.5 * math.erfc(z / math.sqrt(2))


def signed_rank_greater(differences: Sequence[float]) -> float:
    """One-sided Wilcoxon signed-rank p-value that ``differences`` are centred above 0.

    Zeros are dropped; normal approximation with tie and continuity corrections.
    """
    d = np.asarray([v for v in differences if v != 0], dtype=np.float64)
    n = len(d)
    if n == 0:
        return 1.0
    ranks = _rankdata(np.abs(d))
    w_plus = float(ranks[d > 0].sum())
    _, tie_counts = np.unique(np.abs(d), return_counts=True)
    variance = n * (n + 1) * (2 * n + 1) / 24 - float((tie_counts**3 - tie_counts).sum()) / 48
    if variance <= 0:
        return 1.0
    z = (w_plus - n * (n + 1) / 4 - 0.5) / math.sqrt(variance)
    return 0.5 * math.erfc(z / math.sqrt(2))


def bootstrap_median_ci(
    values: Sequence[float], *, confidence: float, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Median of ``values`` and its percentile-bootstrap confidence interval.

    Returns:
        (median, low, high).
    """
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(data), size=(resamples, len(data)))
    medians = np.median(data[picks], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return float(np.median(data)), float(low), float(high)


@dataclass(frozen=True, kw_only=True)
class DecisionPolicy:
    """How samples become a verdict.

    Attributes:
        min_effect: smallest relative change reported (0.05: 5% slower); below it a
            significant change still passes.
        alpha: significance level; the confidence interval is at 1 - alpha.
        max_slice_ratio: a sample whose wall/CPU ratio exceeds this was time-sliced.
        max_sliced_fraction: above this share of time-sliced pairs the run is inconclusive.
        min_pairs: fewest clean pairs for a verdict.
        resamples: bootstrap resamples.
        seed: bootstrap seed (decisions are reproducible from the samples).
    """

    min_effect: float = 0.05
    alpha: float = 0.01
    max_slice_ratio: float = 1.3
    max_sliced_fraction: float = 0.9
    min_pairs: int = 20
    resamples: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.min_effect < 1:
            raise ValueError(f"min_effect must be in [0, 1); got min_effect={self.min_effect}")
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5); got alpha={self.alpha}")
        if self.max_slice_ratio <= 1:
            raise ValueError(f"max_slice_ratio must be > 1; got {self.max_slice_ratio}")
        if self.min_pairs < 3:
            raise ValueError(f"min_pairs must be >= 3; got min_pairs={self.min_pairs}")


@dataclass(frozen=True, kw_only=True)
class Decision:
    """The verdict on paired baseline/candidate samples.

    Attributes:
        verdict: "pass", "regression", "improvement" or "inconclusive".
        ratio: candidate / baseline time, median of the clean pairs' ratios.
        ci_low, ci_high: confidence interval of ``ratio`` at 1 - alpha.
        p_slower: one-sided signed-rank p-value (paired log-ratios) that the candidate is
            slower.
        p_faster: the same, that the candidate is faster.
        clock: the clock decided on ("cpu" or "wall").
        pairs: clean pairs used; sliced: pairs set aside as time-sliced.
        reason: one sentence explaining the verdict.
    """

    verdict: Verdict
    ratio: float
    ci_low: float
    ci_high: float
    p_slower: float
    p_faster: float
    clock: Clock
    pairs: int
    sliced: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_sliced(sample: Sample, policy: DecisionPolicy) -> bool:
    return sample.slicing_ratio() > policy.max_slice_ratio


def decide(
    baseline: Sequence[Sample],
    candidate: Sequence[Sample],
    *,
    clock: Clock = "cpu",
    policy: DecisionPolicy | None = None,
) -> Decision:
    """Decides whether ``candidate`` is slower than ``baseline`` from paired samples.

    Pair i is (baseline[i], candidate[i]), taken back to back. With clock "cpu", pairs in
    which either sample was time-sliced are set aside (their CPU time is polluted too).

    Args:
        baseline, candidate: samples of equal length.
        clock: "cpu" (thread CPU time; CPU code) or "wall" (synchronised; CUDA code).
        policy: thresholds; ``DecisionPolicy()`` by default.

    Raises:
        ValueError: the two sequences differ in length.
    """
    policy = policy or DecisionPolicy()
    if len(baseline) != len(candidate):
        raise ValueError(
            f"baseline and candidate must be paired; got {len(baseline)} and {len(candidate)}"
        )
    clean = [
        (b, c)
        for b, c in zip(baseline, candidate, strict=True)
        if clock == "wall" or not (_is_sliced(b, policy) or _is_sliced(c, policy))
    ]
    clean = [(b, c) for b, c in clean if b.value(clock) > 0 and c.value(clock) > 0]
    sliced = len(baseline) - len(clean)
    base_nan = dict(ratio=math.nan, ci_low=math.nan, ci_high=math.nan, p_slower=1.0, p_faster=1.0)
    if len(clean) < policy.min_pairs or (
        baseline and sliced / len(baseline) > policy.max_sliced_fraction
    ):
        reason = (
            f"{sliced} of {len(baseline)} pairs time-sliced (wall/CPU > "
            f"{policy.max_slice_ratio}); {len(clean)} clean, {policy.min_pairs} needed"
        )
        return Decision(
            verdict="inconclusive", clock=clock, pairs=len(clean), sliced=sliced,
            reason=reason, **base_nan,
        )  # fmt: skip
    return _decide_clean(clean, clock, sliced, policy)


def _decide_clean(
    clean: list[tuple[Sample, Sample]], clock: Clock, sliced: int, policy: DecisionPolicy
) -> Decision:
    base = [b.value(clock) for b, _ in clean]
    cand = [c.value(clock) for _, c in clean]
    # Paired log-ratios cancel slow drift (thermal, a neighbour's load) shared by a pair.
    log_ratios = [math.log(c / b) for b, c in zip(base, cand, strict=True)]
    med, low, high = bootstrap_median_ci(
        log_ratios, confidence=1 - policy.alpha, resamples=policy.resamples, seed=policy.seed
    )
    ratio, ci_low, ci_high = math.exp(med), math.exp(low), math.exp(high)
    p_slower = signed_rank_greater(log_ratios)
    p_faster = signed_rank_greater([-d for d in log_ratios])
    effect = (
        f"{100 * (ratio - 1):+.1f}% (CI {100 * (ci_low - 1):+.1f}..{100 * (ci_high - 1):+.1f}%)"
    )
    verdict: Verdict = "pass"
    if ci_low > 1 and p_slower < policy.alpha and ratio >= 1 + policy.min_effect:
        verdict, reason = "regression", f"slower by {effect}, p={p_slower:.2g}"
    elif ci_high < 1 and p_faster < policy.alpha and ratio <= 1 - policy.min_effect:
        verdict, reason = "improvement", f"faster by {effect}, p={p_faster:.2g}"
    elif ci_low > 1 or ci_high < 1:
        reason = f"change {effect} is below the minimum effect {100 * policy.min_effect:.0f}%"
    else:
        reason = f"no significant change: {effect}"
    return Decision(
        verdict=verdict, ratio=ratio, ci_low=ci_low, ci_high=ci_high, p_slower=p_slower,
        p_faster=p_faster, clock=clock, pairs=len(clean), sliced=sliced, reason=reason,
    )  # fmt: skip


# ----------------------------------------------------------------------------- A/B runs


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
) -> Comparison:
    """Samples baseline and candidate alternately and decides; repeats while inconclusive.

    Samples of all attempts accumulate; time-sliced pairs are set aside by ``decide``.

    Args:
        name: the case name reported.
        baseline, candidate: Samplers of the two versions.
        clock: the clock decided on ("cpu" for CPU code, "wall" for synchronised CUDA).
        policy: decision thresholds.
        schedule: sampling budget.
        timer: the clock of the budget (injectable for tests).
    """
    policy, schedule = policy or DecisionPolicy(), schedule or ABSchedule()
    start = timer()
    deadline = start + schedule.budget_s
    for _ in range(schedule.warmup):
        baseline(1)
        candidate(1)
    number = calibrate(baseline, schedule.target_sample_s)
    base: list[Sample] = []
    cand: list[Sample] = []
    attempts = 0
    decision = decide(base, cand, clock=clock, policy=policy)
    while attempts < schedule.max_attempts and timer() < deadline:
        attempts += 1
        _collect(baseline, candidate, number, schedule.pairs, deadline, timer, base, cand)
        decision = decide(base, cand, clock=clock, policy=policy)
        if decision.verdict != "inconclusive":
            break
    keep = [
        (b, c) for b, c in zip(base, cand, strict=True)
        if clock == "wall" or not (_is_sliced(b, policy) or _is_sliced(c, policy))
    ] or list(zip(base, cand, strict=True))  # fmt: skip
    return Comparison(
        name=name,
        decision=decision,
        attempts=attempts,
        number=number,
        baseline_wall=_median([b.wall for b, _ in keep]),
        candidate_wall=_median([c.wall for _, c in keep]),
        baseline_cpu=_median([b.cpu for b, _ in keep]),
        candidate_cpu=_median([c.cpu for _, c in keep]),
        elapsed=timer() - start,
        baseline_samples=tuple(base),
        candidate_samples=tuple(cand),
    )


def _median(values: Sequence[float]) -> float:
    return float(np.median(values)) if values else math.nan


# ----------------------------------------------------------------------------- monitor


@dataclass(frozen=True, kw_only=True)
class MetricRegression:
    """A metric of ``PerformanceMonitor.check_regression`` (the seed's dict, typed).

    Attributes:
        regression_percent: 100 * (current / baseline - 1), medians.
        baseline, current: medians of the baseline and current values.
        p_value: one-sided p-value that the current values are larger.
        verdict: "pass", "regression", "improvement" or "inconclusive".
        samples: number of current values.
    """

    regression_percent: float
    baseline: float
    current: float
    p_value: float
    verdict: Verdict
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sign_test_greater(values: Sequence[float], reference: float) -> float:
    """One-sided sign-test p-value that the median of ``values`` exceeds ``reference``."""
    above = sum(v > reference for v in values)
    n = sum(v != reference for v in values)
    return sum(math.comb(n, i) for i in range(above, n + 1)) / 2**n if n else 1.0


@dataclass
class PerformanceMonitor:
    """Records metrics (larger is worse, e.g. seconds) and checks them against a baseline.

    The seed's API (``record_metric``, ``check_regression(threshold)``) with a decision
    that needs significance as well as size: a baseline given as a list of values is
    compared with the Mann-Whitney U test; a single stored number with a sign test. The
    threshold is relative (0.1 = 10%), never an absolute time.

    Attributes:
        baseline_metrics: name -> a baseline value or list of baseline values.
        alpha: significance level.
        min_samples: fewer current values than this gives "inconclusive".
    """

    baseline_metrics: Mapping[str, float | Sequence[float]] = field(default_factory=dict)
    alpha: float = 0.01
    min_samples: int = 8
    current_metrics: dict[str, list[float]] = field(default_factory=dict)

    def record_metric(self, name: str, value: float) -> None:
        """Records one value of a metric."""
        self.current_metrics.setdefault(name, []).append(float(value))

    def record_comparison(self, comparison: Comparison) -> None:
        """Records an A/B comparison's samples as metric ``name`` against its baseline."""
        self.record_metric(comparison.name, comparison.candidate_cpu)

    def check_regression(self, threshold: float = 0.1) -> dict[str, MetricRegression]:
        """Returns the metrics that are significantly AND at least ``threshold`` worse.

        Args:
            threshold: minimum relative increase (0.1 = 10%).
        """
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0; got threshold={threshold}")
        results = self.evaluate(threshold)
        return {name: r for name, r in results.items() if r.verdict == "regression"}

    def evaluate(self, threshold: float = 0.1) -> dict[str, MetricRegression]:
        """Every metric with a baseline, with its verdict."""
        out: dict[str, MetricRegression] = {}
        for name, values in self.current_metrics.items():
            if name in self.baseline_metrics:
                out[name] = self._evaluate(values, self.baseline_metrics[name], threshold)
        return out

    def _evaluate(
        self, values: list[float], reference: float | Sequence[float], threshold: float
    ) -> MetricRegression:
        ref = [float(reference)] if isinstance(reference, int | float) else list(reference)
        base_med, cur_med = _median(ref), _median(values)
        ratio = cur_med / base_med if base_med > 0 else math.inf
        if len(ref) == 1:
            p = _sign_test_greater(values, ref[0] * (1 + threshold))
        else:
            p = mann_whitney_greater(values, ref)
        verdict: Verdict = "pass"
        if len(values) < self.min_samples:
            verdict = "inconclusive"
        elif ratio >= 1 + threshold and p < self.alpha:
            verdict = "regression"
        elif (
            len(ref) > 1
            and ratio <= 1 - threshold
            and mann_whitney_greater(ref, values) < self.alpha
        ):
            verdict = "improvement"
        return MetricRegression(
            regression_percent=100 * (ratio - 1), baseline=base_med, current=cur_med,
            p_value=p, verdict=verdict, samples=len(values),
        )  # fmt: skip

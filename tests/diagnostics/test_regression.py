"""The regression decision on synthetic samples, the A/B loop and the monitor (fake clocks)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from moe_devkit.diagnostics.regression import (
    ABSchedule,
    Decision,
    DecisionPolicy,
    PerformanceMonitor,
    Sample,
    Verdict,
    callable_sampler,
    compare_interleaved,
    confirm,
    decide,
    mann_whitney_greater,
    signed_rank_greater,
)


def paired(n: int, shift: float, noise: float, seed: int = 0, slice_every: int = 0):
    """n pairs with multiplicative noise; every slice_every-th pair time-sliced (wall = 3 cpu)."""
    rng = np.random.default_rng(seed)
    level = 1e-3 * (1 + 0.5 * rng.random(n))  # the machine's speed drifts by up to 50%
    base, cand = [], []
    for i in range(n):
        b = level[i] * (1 + noise * rng.standard_normal())
        c = level[i] * (1 + shift) * (1 + noise * rng.standard_normal())
        sliced = slice_every and i % slice_every == 0
        base.append(Sample(b * (3 if sliced else 1.02), b, 1))
        cand.append(Sample(c * (3 if sliced else 1.02), c, 1))
    return base, cand


def test_identical_samples_pass() -> None:
    base, cand = paired(40, 0.0, 0.02)
    d = decide(base, cand)
    assert d.verdict == "pass"
    assert d.ci_low < 1 < d.ci_high
    assert d.pairs == 40 and d.sliced == 0


@pytest.mark.parametrize("seed", range(5))
def test_identical_samples_never_alarm_across_seeds(seed: int) -> None:
    assert decide(*paired(40, 0.0, 0.03, seed=seed)).verdict == "pass"


def test_shifted_samples_are_a_regression() -> None:
    d = decide(*paired(40, 0.10, 0.02))
    assert d.verdict == "regression"
    assert 1.07 < d.ratio < 1.13
    assert d.p_slower < 0.01


def test_faster_samples_are_an_improvement() -> None:
    assert decide(*paired(40, -0.2, 0.02)).verdict == "improvement"


def test_significant_but_small_change_passes() -> None:
    d = decide(*paired(40, 0.02, 0.002))
    assert d.verdict == "pass"
    assert d.ci_low > 1
    assert "below the minimum effect" in d.reason


def test_time_sliced_pairs_are_set_aside() -> None:
    d = decide(*paired(60, 0.10, 0.02, slice_every=3))
    assert d.sliced == 20
    assert d.verdict == "regression"


def test_mostly_time_sliced_run_is_inconclusive_not_failed() -> None:
    base, cand = paired(30, 0.5, 0.02, slice_every=1)
    d = decide(base, cand)
    assert d.verdict == "inconclusive"
    assert d.sliced == 30


def test_wall_clock_does_not_filter_slicing() -> None:
    d = decide(*paired(30, 0.0, 0.02, slice_every=1), clock="wall")
    assert d.verdict == "pass"


def test_unpaired_samples_are_rejected() -> None:
    with pytest.raises(ValueError, match="paired"):
        decide([Sample(1, 1, 1)], [])


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="min_effect"):
        DecisionPolicy(min_effect=1.5)


def test_rank_tests() -> None:
    assert mann_whitney_greater([2, 3, 4, 5] * 3, [0, 1, 1, 0] * 3) < 0.001
    assert mann_whitney_greater([1] * 10, [1] * 10) == 1.0
    assert signed_rank_greater([0.1] * 20) < 0.001
    assert signed_rank_greater([-0.1] * 20) > 0.99


class FakeClock:
    """A clock advanced by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_callable_sampler_with_fake_timers() -> None:
    wall, cpu = FakeClock(), FakeClock()

    def work() -> None:
        wall.now += 0.003
        cpu.now += 0.002

    sample = callable_sampler(work, timer=wall, cpu_timer=cpu)(10)
    assert sample == Sample(pytest.approx(0.003), pytest.approx(0.002), 10)


def test_compare_interleaved_alternates_abba_and_decides() -> None:
    clock, calls = FakeClock(), []

    def sampler(name: str, per_call: float):
        def sample(number: int) -> Sample:
            calls.append(name)
            clock.now += per_call * number
            return Sample(per_call, per_call, number)

        return sample

    comp = compare_interleaved(
        "case", sampler("b", 1e-3), sampler("c", 1.2e-3), timer=clock,
        schedule=ABSchedule(target_sample_s=0.01, pairs=24, warmup=1),
    )  # fmt: skip
    assert comp.decision.verdict == "regression"
    assert comp.number == 10  # 1 call took 1 ms; 10 calls reach the 10 ms target
    measured = calls[-48:]
    assert measured[:4] == ["b", "c", "c", "b"]
    assert comp.attempts == 1
    json.dumps(comp.to_dict(samples=True))


def test_compare_interleaved_repeats_while_inconclusive_and_stops() -> None:
    clock = FakeClock()

    def sliced(number: int) -> Sample:
        clock.now += 0.01
        return Sample(3e-3, 1e-3, number)

    comp = compare_interleaved(
        "busy", sliced, sliced, timer=clock,
        schedule=ABSchedule(budget_s=1e6, pairs=10, max_attempts=3, warmup=0),
    )  # fmt: skip
    assert comp.decision.verdict == "inconclusive"
    assert comp.attempts == 3
    assert len(comp.baseline_samples) == 30


def test_compare_interleaved_respects_budget() -> None:
    clock = FakeClock()

    def slow(number: int) -> Sample:
        clock.now += 1.0
        return Sample(3e-3, 1e-3, number)

    comp = compare_interleaved("slow", slow, slow, timer=clock, schedule=ABSchedule(budget_s=20))
    assert comp.elapsed <= 25


def test_monitor_flags_a_regression_against_a_sample_baseline() -> None:
    monitor = PerformanceMonitor(baseline_metrics={"router": [1.0, 1.01, 0.99, 1.0] * 3})
    for v in itertools.islice(itertools.cycle([1.2, 1.21, 1.19]), 12):
        monitor.record_metric("router", v)
    monitor.record_metric("other", 5.0)
    regressions = monitor.check_regression(threshold=0.1)
    assert set(regressions) == {"router"}
    assert regressions["router"].regression_percent == pytest.approx(20.0, abs=1)
    assert monitor.check_regression(threshold=0.3) == {}


def test_monitor_scalar_baseline_and_too_few_samples() -> None:
    monitor = PerformanceMonitor(baseline_metrics={"m": 1.0})
    monitor.record_metric("m", 5.0)
    assert monitor.evaluate()["m"].verdict == "inconclusive"
    for _ in range(9):
        monitor.record_metric("m", 1.5)
    assert monitor.evaluate()["m"].verdict == "regression"


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m: m.record_metric("lat", float("nan")), ValueError,
         r"metric 'lat': value must be in \[0.0, inf\); got value=nan"),
        (lambda m: m.record_metric("lat", -1.0), ValueError, r"got value=-1.0"),
        (lambda m: m.record_metric("lat", "fast"), TypeError,
         r"metric 'lat': value must be a float; got 'fast' \(str\)"),
        (lambda m: m.record_metric("", 1.0), TypeError, r"name must be a non-empty str; got ''"),
        (lambda m: m.check_regression("lat"), TypeError,
         r"threshold must be a float; got 'lat' \(str\)"),
        (lambda m: m.check_regression(threshold=-0.1), ValueError,
         r"threshold must be in \[0.0, inf\); got threshold=-0.1"),
        (lambda m: m.evaluate(float("inf")), ValueError, r"got threshold=inf"),
    ],
)  # fmt: skip
def test_monitor_names_the_bad_argument(
    call: Callable[[PerformanceMonitor], object], error: type[Exception], message: str
) -> None:
    """A NaN recorded would make every later check of the metric NaN, and a threshold given
    positionally as a name would fail deep inside the comparison: both are refused at once."""
    monitor = PerformanceMonitor(baseline_metrics={"lat": 1.0})
    with pytest.raises(error, match=message):
        call(monitor)
    assert monitor.current_metrics == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.0}, r"alpha must be in \(0.0, 1.0\); got alpha=1.0"),
        ({"min_samples": 0}, r"min_samples must be >= 1; got min_samples=0"),
        ({"baseline_metrics": {"m": 0.0}}, r"baseline_metrics\['m'\] must be in \(0.0, inf\)"),
        ({"baseline_metrics": {"m": []}}, r"baseline_metrics\['m'\] must hold at least one"),
        ({"baseline_metrics": {"m": [1.0, float("nan")]}}, r"baseline_metrics\['m'\]\[1\]"),
    ],
)
def test_monitor_checks_its_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PerformanceMonitor(**kwargs)


def _decision(verdict: Verdict, ratio: float = 1.0) -> Decision:
    return Decision(
        verdict=verdict, ratio=ratio, ci_low=ratio - 0.02, ci_high=ratio + 0.02, p_slower=0.5,
        p_faster=0.5, clock="cpu", pairs=40, sliced=0, reason=f"{verdict} at {ratio}",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("first", "again", "final"),
    [
        ("regression", "regression", "regression"),
        ("improvement", "improvement", "improvement"),
        ("regression", "pass", "pass"),
        ("regression", "improvement", "pass"),  # opposite directions: neither is real
        ("improvement", "regression", "pass"),
        ("regression", "inconclusive", "inconclusive"),
    ],
)
def test_a_difference_stands_only_when_fresh_processes_find_it_again(
    first: Verdict, again: Verdict, final: str
) -> None:
    result = confirm(_decision(first, 1.06), _decision(again, 1.01))
    assert result.verdict == final
    assert result.ratio == 1.01  # the repeat's statistics
    assert first in result.reason and again in result.reason


def test_confirm_leaves_a_decision_without_a_difference_alone() -> None:
    for verdict in ("pass", "inconclusive"):
        first = _decision(verdict)  # type: ignore[arg-type]
        assert confirm(first, _decision("regression", 1.2)) is first

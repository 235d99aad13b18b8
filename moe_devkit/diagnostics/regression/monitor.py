"""``PerformanceMonitor``: record metrics, then check them against a baseline, significance-tested.

A baseline given as a list of values is compared with the Mann-Whitney U test, a single
stored number with a sign test; ``MetricRegression`` is the typed result per metric.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from moe_devkit._checks import require_float, require_int
from moe_devkit.diagnostics.regression.ab import Comparison
from moe_devkit.diagnostics.regression.decision import Verdict
from moe_devkit.diagnostics.regression.stats import mann_whitney_greater, median_or_nan


@dataclass(frozen=True, kw_only=True)
class MetricRegression:
    """One metric's result of ``PerformanceMonitor.check_regression``.

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

    Record values with ``record_metric``; ``check_regression(threshold)`` then reports the
    metrics that regressed, by a decision that needs significance as well as size: a
    baseline given as a list of values is compared with the Mann-Whitney U test, a single
    stored number with a sign test. The threshold is relative (0.1 = 10%), never an
    absolute time.

    Attributes:
        baseline_metrics: name -> a baseline value or list of baseline values.
        alpha: significance level.
        min_samples: fewer current values than this gives "inconclusive".
    """

    baseline_metrics: Mapping[str, float | Sequence[float]] = field(default_factory=dict)
    alpha: float = 0.01
    min_samples: int = 8
    current_metrics: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require_float("alpha", self.alpha, 0.0, 1.0, low_open=True, high_open=True)
        require_int("min_samples", self.min_samples, 1)
        for name, reference in self.baseline_metrics.items():
            label = f"baseline_metrics[{name!r}]"
            if isinstance(reference, Sequence) and not isinstance(reference, str):
                if not reference:
                    raise ValueError(f"{label} must hold at least one value; got []")
                for i, value in enumerate(reference):
                    require_float(f"{label}[{i}]", value, 0.0)
            else:  # one stored number: the reference of a ratio, so above 0
                require_float(label, reference, 0.0, low_open=True)

    def record_metric(self, name: str, value: float) -> None:
        """Records one value of a metric (a cost: a finite number >= 0).

        Raises:
            TypeError, ValueError: ``name`` is not a non-empty string, or ``value`` is not a
                finite number >= 0 (a NaN would make every later check of the metric NaN).
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str; got {name!r}")
        try:
            checked = require_float("value", value, 0.0)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"metric {name!r}: {exc}") from None
        self.current_metrics.setdefault(name, []).append(checked)

    def record_comparison(self, comparison: Comparison) -> None:
        """Records an A/B comparison's samples as metric ``name`` against its baseline."""
        self.record_metric(comparison.name, comparison.candidate_cpu)

    def check_regression(self, threshold: float = 0.1) -> dict[str, MetricRegression]:
        """Returns the metrics that are significantly AND at least ``threshold`` worse.

        Args:
            threshold: minimum relative increase (0.1 = 10%).
        """
        results = self.evaluate(threshold)
        return {name: r for name, r in results.items() if r.verdict == "regression"}

    def evaluate(self, threshold: float = 0.1) -> dict[str, MetricRegression]:
        """Every metric with a baseline, with its verdict."""
        threshold = require_float("threshold", threshold, 0.0)
        out: dict[str, MetricRegression] = {}
        for name, values in self.current_metrics.items():
            if name in self.baseline_metrics:
                out[name] = self._evaluate(values, self.baseline_metrics[name], threshold)
        return out

    def _evaluate(
        self, values: list[float], reference: float | Sequence[float], threshold: float
    ) -> MetricRegression:
        ref = [float(reference)] if isinstance(reference, int | float) else list(reference)
        base_med, cur_med = median_or_nan(ref), median_or_nan(values)
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

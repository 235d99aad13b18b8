"""Performance-regression detection that stays right on noisy, shared machines.

Comparing one timed call against a stored absolute number does not work: on a shared 2-core
machine it flags 42% of identical-code comparisons, and a stored number does not transfer
between two GPU machines of the same kind. This package decides instead from an interleaved
A/B run: baseline and candidate are sampled alternately (ABBA order) in the same
run, each sample records wall time and thread CPU time, and

* pairs whose wall/CPU ratio shows time-slicing are set aside; a run with too few clean
  pairs is *inconclusive* and repeated (bounded), never failed;
* a regression is confirmed only when it is significant (the bootstrap confidence interval
  of the median paired ratio excludes 1, and the one-sided Wilcoxon signed-rank test on the
  paired log-ratios agrees) AND at least the minimum effect size.

Why paired tests: on a shared machine a neighbour's load moves the CPU time of both sides by
up to 50% for seconds at a time; an unpaired test (Mann-Whitney U) sees that as noise and
loses its power, while the ratio within a pair, taken milliseconds apart, barely moves.

This package's modules, every public name of which is importable from here: samples and
samplers in ``samples``, the rank tests and bootstrap in ``stats``, the decision rule in
``decision``, the interleaved A/B loop in ``ab`` and ``PerformanceMonitor`` in ``monitor``.
The perf suite (``benchmarks/perf_suite.py``, ``nox -s perf``) builds on them: its worker
processes, deterministic gates (operator counts, FLOPs, host synchronisations, memory
growth) and stored baselines live with it, in ``benchmarks/perf/``.
"""

from __future__ import annotations

from moe_devkit.diagnostics.regression.ab import (
    ABSchedule,
    Comparison,
    calibrate,
    compare_interleaved,
)
from moe_devkit.diagnostics.regression.decision import (
    VERDICTS,
    Decision,
    DecisionPolicy,
    Verdict,
    confirm,
    decide,
)
from moe_devkit.diagnostics.regression.monitor import MetricRegression, PerformanceMonitor
from moe_devkit.diagnostics.regression.samples import Clock, Sample, Sampler, callable_sampler
from moe_devkit.diagnostics.regression.stats import (
    bootstrap_median_ci,
    mann_whitney_greater,
    signed_rank_greater,
)

__all__ = [
    "VERDICTS",
    "ABSchedule",
    "Clock",
    "Comparison",
    "Decision",
    "DecisionPolicy",
    "MetricRegression",
    "PerformanceMonitor",
    "Sample",
    "Sampler",
    "Verdict",
    "bootstrap_median_ci",
    "calibrate",
    "callable_sampler",
    "compare_interleaved",
    "confirm",
    "decide",
    "mann_whitney_greater",
    "signed_rank_greater",
]

"""The decision rule: paired baseline/candidate samples -> a ``Decision`` with its verdict.

Time-sliced pairs are set aside; a regression needs the bootstrap confidence interval of
the median paired ratio to exclude 1, the one-sided signed-rank test to agree, and at least
the policy's minimum effect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from moe_devkit.diagnostics.regression.samples import Clock, Sample
from moe_devkit.diagnostics.regression.stats import bootstrap_median_ci, signed_rank_greater

Verdict = Literal["pass", "regression", "improvement", "inconclusive"]
VERDICTS: tuple[Verdict, ...] = ("pass", "regression", "improvement", "inconclusive")


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


def is_sliced(sample: Sample, policy: DecisionPolicy) -> bool:
    """Whether ``sample`` was time-sliced (wall/CPU above ``policy.max_slice_ratio``)."""
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
        if clock == "wall" or not (is_sliced(b, policy) or is_sliced(c, policy))
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


def confirm(first: Decision, again: Decision) -> Decision:
    """The verdict of a difference that was measured twice, in independent processes.

    Two processes running identical code can differ by a few percent for their whole
    lifetime (where the allocator and the loader put things), which no number of samples
    from those two processes averages away; a real change shows again in fresh processes.
    So a regression or an improvement stands only when ``again`` (the same comparison
    between fresh processes) finds it too: the result is ``again`` with a reason naming both.
    When ``again`` is inconclusive, so is the result; otherwise the difference was not
    reproduced and the result passes, with ``again``'s statistics.

    Args:
        first: the decision that found the difference.
        again: the decision of the repeat in fresh processes.
    """
    if first.verdict not in ("regression", "improvement"):
        return first
    if again.verdict == first.verdict:
        reason = f"{again.reason}; confirmed in fresh processes (first: {first.reason})"
        return replace(again, reason=reason)
    if again.verdict == "inconclusive":
        reason = f"{first.verdict} not confirmed: fresh processes inconclusive ({again.reason})"
        return replace(again, reason=reason)
    reason = f"{first.verdict} ({first.reason}) not reproduced in fresh processes: {again.reason}"
    return replace(again, verdict="pass", reason=reason)

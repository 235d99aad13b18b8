"""Does dynamic-k routing pay off? The rule behind the ``dynamic-slower-than-static`` finding.

Dynamic routing pays off when the dynamic layer's time shrinks with its active token-expert
pairs, so that the time ratio (dynamic time / static time) stays near the pair ratio
(dynamic active pairs / static active pairs). The finding fires when the time ratio is
clearly above it:

    lower confidence bound of the time ratio  >  pair ratio x tolerance

The times come in pairs: ``compare_dynamic_static`` runs the two layers in turns, so the
i-th static and dynamic iterations ran under the same load of the machine, and the time
ratio is the median of the per-iteration ratios dynamic_i / static_i. Its lower bound
assumes no distribution: the l-th smallest ratio, with l the largest rank for which
P(Binomial(n, 1/2) <= l - 1) <= 1 - confidence, bounds the median ratio from below at
``confidence`` or better. A few slow iterations on a busy machine barely move it. With too
few iterations for such a bound (fewer than 5 at 95%) there is no verdict and no finding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from moe_devkit._checks import require_float
from moe_devkit.diagnostics.findings import Finding

CODE = "dynamic-slower-than-static"


@dataclass(frozen=True, kw_only=True)
class DynamicStaticVerdict:
    """The dynamic-vs-static decision and the numbers behind it.

    Attributes:
        iterations: pairs of timed iterations judged.
        time_ratio: median of the paired ratios dynamic_i / static_i.
        time_ratio_low: lower confidence bound of time_ratio; None with too few iterations.
        pairs_ratio: dynamic active token-expert pairs / static active pairs.
        tolerance: how far above pairs_ratio the bound must lie to count (e.g. 1.1).
        confidence: of time_ratio_low (e.g. 0.95).
        threshold: pairs_ratio x tolerance.
        slower: time_ratio_low > threshold; the finding fires.
    """

    iterations: int
    time_ratio: float
    time_ratio_low: float | None
    pairs_ratio: float
    tolerance: float
    confidence: float
    threshold: float
    slower: bool

    def finding(self) -> Finding | None:
        """The ``dynamic-slower-than-static`` error Finding when ``slower``, else None."""
        if not self.slower:
            return None
        message = (
            f"the dynamic layer takes {self.time_ratio:.3f}x the static layer's time (median of "
            f"{self.iterations} paired iterations; at least {self.time_ratio_low:.3f}x at "
            f"{self.confidence:.0%} confidence) for "
            f"{self.pairs_ratio:.3f}x its active token-expert pairs; expected at most "
            f"{self.threshold:.3f}x (pair ratio x {self.tolerance:g})"
        )
        return Finding(CODE, "error", message, details=self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def median_lower_rank(n: int, alpha: float) -> int | None:
    """Rank (1-based) of the order statistic that is a lower bound on the median of n samples.

    The largest l with P(x_(l) > median) = P(Binomial(n, 1/2) <= l - 1) <= alpha; by symmetry
    x_(n + 1 - l) is the matching upper bound. None when even the minimum is not such a bound
    (n too small for alpha).
    """
    rank, term, below = None, 1, 0  # term = C(n, candidate - 1), kept exact
    for candidate in range(1, n + 1):
        below += term
        if below / 2**n > alpha:
            break
        rank, term = candidate, term * (n - candidate + 1) // candidate
    return rank


def judge_dynamic_static(
    static_times: Sequence[float],
    dynamic_times: Sequence[float],
    *,
    pairs_ratio: float,
    tolerance: float = 1.1,
    confidence: float = 0.95,
) -> DynamicStaticVerdict:
    """Decides whether the dynamic layer is clearly slower than its active pairs allow.

    Args:
        static_times, dynamic_times: per-iteration times of each layer (any one unit), the
            i-th of each measured in the same turn (see ``measure_in_turns``).
        pairs_ratio: dynamic active token-expert pairs / static active pairs.
        tolerance: the time ratio's lower bound must exceed pairs_ratio x tolerance.
        confidence: of that lower bound.

    Raises:
        ValueError: no times, a time <= 0, times of unequal lengths, or pairs_ratio,
            tolerance or confidence out of range.
    """
    require_float("pairs_ratio", pairs_ratio, 0.0, low_open=True)
    require_float("tolerance", tolerance, 0.0, low_open=True)
    require_float("confidence", confidence, 0.0, 1.0, low_open=True, high_open=True)
    ratios = np.sort(_ratios(static_times, dynamic_times))
    rank = median_lower_rank(ratios.size, 1.0 - confidence)
    low = None if rank is None else float(ratios[rank - 1])
    threshold = pairs_ratio * tolerance
    return DynamicStaticVerdict(
        iterations=int(ratios.size),
        time_ratio=float(np.median(ratios)),
        time_ratio_low=low,
        pairs_ratio=pairs_ratio,
        tolerance=tolerance,
        confidence=confidence,
        threshold=threshold,
        slower=low is not None and low > threshold,
    )


def _ratios(
    static_times: Sequence[float], dynamic_times: Sequence[float]
) -> np.ndarray[Any, np.dtype[np.float64]]:
    """dynamic_i / static_i, float64[n]."""
    static = _checked("static_times", static_times)
    dynamic = _checked("dynamic_times", dynamic_times)
    if static.size != dynamic.size:
        raise ValueError(
            "static_times and dynamic_times must pair up (one of each per turn); got "
            f"{static.size} static and {dynamic.size} dynamic times"
        )
    return dynamic / static


def _checked(name: str, times: Sequence[float]) -> np.ndarray[Any, np.dtype[np.float64]]:
    values = np.asarray(times, dtype=np.float64)
    if values.size == 0:
        raise ValueError(f"{name} must hold at least one time; got none")
    bad = values[~(np.isfinite(values) & (values > 0))]
    if bad.size:
        raise ValueError(f"{name} must be finite and > 0; got {float(bad[0])!r}")
    return values

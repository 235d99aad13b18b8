"""The dynamic-slower-than-static rule on injected timings, and the finding in ``profile``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from moe_devkit.cli import main
from moe_devkit.diagnostics.latency import Measurement, compare
from moe_devkit.diagnostics.latency.verdict import judge_dynamic_static, median_lower_rank
from moe_devkit.reporting import load_report_json

STATIC = [float(t) for t in range(10, 30)]  # 20 iterations


@pytest.mark.parametrize(
    ("n", "alpha", "rank"),
    [(4, 0.05, None), (5, 0.05, 1), (20, 0.05, 6), (50, 0.05, 19), (6, 0.025, 1), (9, 0.25, 3)],
)
def test_median_lower_rank(n: int, alpha: float, rank: int | None) -> None:
    """P(Binomial(20, 1/2) <= 5) = 0.0207 <= 0.05 < P(<= 6) = 0.0577, so rank 6 for n=20."""
    assert median_lower_rank(n, alpha) == rank


def test_twice_the_time_for_the_same_pairs_is_slower() -> None:
    verdict = judge_dynamic_static(STATIC, [2 * t for t in STATIC], pairs_ratio=1.0)
    assert (verdict.iterations, verdict.time_ratio, verdict.time_ratio_low) == (20, 2.0, 2.0)
    assert verdict.threshold == 1.1
    assert verdict.slower is True
    finding = verdict.finding()
    assert finding is not None
    assert (finding.code, finding.severity) == ("dynamic-slower-than-static", "error")
    assert finding.message == (
        "the dynamic layer takes 2.000x the static layer's time (median of 20 paired "
        "iterations; at least 2.000x at 95% confidence) for 1.000x its active token-expert "
        "pairs; expected at most 1.100x (pair ratio x 1.1)"
    )
    assert finding.details == verdict.to_dict()


def test_time_following_the_pairs_is_no_finding() -> None:
    verdict = judge_dynamic_static(STATIC, [t / 2 for t in STATIC], pairs_ratio=0.5)
    assert (verdict.time_ratio, verdict.time_ratio_low, verdict.slower) == (0.5, 0.5, False)
    assert verdict.finding() is None


# paired ratios 0.75 + i/16 for i < 20: median 1.34375, 6th smallest 1.0625
SPREAD = [0.75 + i / 16 for i in range(20)]


def test_a_ratio_above_the_threshold_but_not_clearly_is_no_finding() -> None:
    verdict = judge_dynamic_static([1.0] * 20, SPREAD[::-1], pairs_ratio=1.0)
    assert (verdict.time_ratio, verdict.time_ratio_low) == (1.34375, 1.0625)
    assert verdict.slower is False  # 1.34 > 1.1, but the bound is not
    tight = judge_dynamic_static([1.0] * 20, SPREAD, pairs_ratio=1.0, tolerance=1.0)
    assert tight.slower is True  # 1.0625 > 1.0


def test_load_that_changes_between_turns_cancels_in_the_pairs() -> None:
    """The machine's load swings 4x between turns: the raw times overlap, their ratios not."""
    static = [t * (4.0 if i % 2 else 1.0) for i, t in enumerate(STATIC)]
    verdict = judge_dynamic_static(static, [1.25 * t for t in static], pairs_ratio=1.0)
    assert (verdict.time_ratio, verdict.time_ratio_low, verdict.slower) == (1.25, 1.25, True)


def test_slow_outliers_of_a_busy_machine_do_not_fire() -> None:
    """Five dynamic iterations 100x slow (another process ran) do not move the bound."""
    dynamic = [100 * t if i % 4 == 0 else t for i, t in enumerate(STATIC)]
    verdict = judge_dynamic_static(STATIC, dynamic, pairs_ratio=1.0)
    assert (verdict.time_ratio, verdict.time_ratio_low, verdict.slower) == (1.0, 1.0, False)


def test_too_few_iterations_give_no_verdict() -> None:
    verdict = judge_dynamic_static([1.0] * 4, [9.0] * 4, pairs_ratio=1.0)
    assert (verdict.time_ratio, verdict.time_ratio_low, verdict.slower) == (9.0, None, False)
    assert verdict.finding() is None


@pytest.mark.parametrize(
    ("static", "kwargs", "message"),
    [
        ([], {}, r"static_times must hold at least one time; got none"),
        ([1.0, 0.0], {}, r"static_times must be finite and > 0; got 0.0"),
        ([1.0, 1.0], {}, r"must pair up \(one of each per turn\); got 2 static and 1 dynamic"),
        ([1.0], {"pairs_ratio": 0.0}, r"pairs_ratio must be in \(0.0, inf\)"),
        ([1.0], {"tolerance": -1.0}, r"tolerance must be in \(0.0, inf\)"),
        ([1.0], {"confidence": 1.0}, r"confidence must be in \(0.0, 1.0\)"),
    ],
)
def test_bad_inputs_raise(static: list[float], kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        judge_dynamic_static(static, [1.0], **{"pairs_ratio": 1.0, **kwargs})


def test_comparison_judges_its_own_iterations() -> None:
    def measurement(name: str, times: Sequence[float]) -> Measurement:
        return Measurement.from_times(name, "cpu", times, [], "perf_counter")

    doubled = [2 * t for t in STATIC]
    verdict = compare.DynamicStaticComparison(
        static=measurement("static", STATIC), dynamic=measurement("dynamic", doubled),
        static_pairs=40, dynamic_pairs=20, mean_k=1.0, time_ratio=2.0, pairs_ratio=0.5,
        static_per_pair=0.5, dynamic_per_pair=1.95,
    ).verdict(tolerance=3.0)  # fmt: skip
    assert (verdict.time_ratio_low, verdict.threshold, verdict.slower) == (2.0, 1.5, True)


TINY = ["--hidden-size", "16", "--expert-hidden-size", "8", "--num-experts", "4", "--max-k", "2",
        "--tokens", "32", "--iterations", "20", "--warmup", "0", "--profile-steps", "1",
        "--device", "cpu"]  # fmt: skip


def fake_measure_in_turns(scale: float) -> Callable[..., dict[str, Measurement]]:
    """``measure_in_turns`` for compare_dynamic_static: static takes STATIC ms per iteration,
    dynamic ``scale`` times that."""

    def measure_in_turns(fns: dict[str, Callable[[], object]], **_: Any) -> dict[str, Measurement]:
        times = {"static": [t * 1e-3 for t in STATIC]}
        times["dynamic"] = [t * scale for t in times["static"]]
        return {name: Measurement.from_times(name, "cpu", times[name], [], "perf_counter")
                for name in fns}  # fmt: skip

    return measure_in_turns


def test_profile_reports_dynamic_slower_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(compare, "measure_in_turns", fake_measure_in_turns(3.0))
    assert main(["profile", *TINY, "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    (finding,) = load_report_json(tmp_path / "latency.json")["findings"]
    assert finding["code"] == "dynamic-slower-than-static"
    assert finding["details"]["time_ratio"] == pytest.approx(3.0)
    assert f"[error] dynamic-slower-than-static: {finding['message']}\n" in out
    pairs = finding["details"]["pairs_ratio"]
    assert (
        f"verdict: time ratio 3.000 (median of 20 paired iterations), pair ratio {pairs:.3f}; "
        f"time ratio >= 3.000 at 95% confidence, above pair ratio x 1.1 = {1.1 * pairs:.3f}\n"
    ) in out


def test_profile_without_finding_prints_both_ratios_and_exits_0(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """0.4x the time for at least 0.5x the pairs (min_k=1 of max_k=2): no finding."""
    monkeypatch.setattr(compare, "measure_in_turns", fake_measure_in_turns(0.4))
    assert main(["profile", *TINY, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = load_report_json(tmp_path / "latency.json")
    assert report["findings"] == []
    verdict = report["sections"]["latency"]["dynamic_vs_static_verdict"]
    assert verdict["slower"] is False
    pairs = verdict["pairs_ratio"]
    assert (
        f"verdict: time ratio 0.400 (median of 20 paired iterations), pair ratio {pairs:.3f}; "
        f"time ratio >= 0.400 at 95% confidence, within pair ratio x 1.1 = {1.1 * pairs:.3f}\n"
    ) in out
    assert "dynamic-slower-than-static" not in out

"""benchmarks/bench_perf_gate.py's counting: how a suite run's verdicts become its outcome."""

from __future__ import annotations

import math

import bench_perf_gate as gate
import pytest


def case(name: str, verdict: str = "pass", gates: tuple[str, ...] = ()) -> gate.CaseResult:
    return gate.CaseResult(name, verdict, 1.0, 0.98, 1.02, 40, gates, 0.0, 0.0)


@pytest.mark.parametrize(
    ("cases", "outcome"),
    [
        ([case("router.static"), case("model")], "pass"),
        ([case("router.static"), case("model", "regression")], "false alarm"),
        ([case("router.static", "improvement"), case("model")], "false alarm"),
        ([case("router.static", gates=("ops",)), case("model")], "false alarm"),
        ([case("router.static", "inconclusive"), case("model")], "inconclusive"),
        ([case("router.static", "inconclusive"), case("model", "improvement")], "false alarm"),
        ([case("router.static", "skipped"), case("model")], "pass"),
    ],
)
def test_identical_runs(cases: list[gate.CaseResult], outcome: str) -> None:
    assert gate.classify("idle", cases) == outcome
    assert gate.classify("busy", cases) == outcome


@pytest.mark.parametrize(
    ("cases", "outcome"),
    [
        ([case("layer.static", "regression"), case("router.static")], "caught"),
        ([case("inspector", "regression")], "caught"),
        ([case("router.static", "regression"), case("layer.static")], "missed"),
        ([case("layer.static", "inconclusive"), case("model")], "missed"),
        ([case("layer.static", "inconclusive"), case("router.static")], "inconclusive"),
        ([case("layer.static", gates=("ops",))], "missed"),
    ],
)
def test_planted_runs_are_caught_only_where_the_planted_code_runs(
    cases: list[gate.CaseResult], outcome: str
) -> None:
    assert gate.classify("planted", cases) == outcome


def test_case_results_read_a_suite_report() -> None:
    decision = {
        "verdict": "pass", "ratio": 1.01, "ci_low": 0.99, "ci_high": 1.03, "pairs": 40,
        "sliced": 3,
    }  # fmt: skip
    report = {
        "sections": {
            "perf": {
                "cases": [
                    {
                        "case": "model",
                        "status": "measured",
                        "comparison": {"decision": decision, "baseline_cpu": 0.004},
                        "first_comparison": {"decision": {**decision, "verdict": "regression"}},
                        "page_faults": {"baseline": 0.0, "candidate": 2.0},
                        "gate_results": [
                            {"gate": "ops", "regression": False},
                            {"gate": "flops", "regression": True},
                        ],
                    },
                    {"case": "gradients", "status": "skipped", "reason": "not here"},
                ]
            }
        }
    }
    model, gradients = gate.case_results(report)
    expected = gate.CaseResult(
        "model", "pass", 1.01, 0.99, 1.03, 40, ("flops",), 0.0, 2.0, 3, 4.0, "regression"
    )
    assert model == expected
    assert gradients.verdict == "skipped"
    assert math.isnan(gradients.ratio)
    assert gate.differing([model, gradients]) == ["model"]


def test_schedule_interleaves_the_conditions() -> None:
    assert gate.schedule(2, 3) == [
        ("idle", 0), ("busy", 0), ("planted", 0),
        ("idle", 1), ("busy", 1), ("planted", 1),
        ("planted", 2),
    ]  # fmt: skip


def test_goal_counts_passes_only() -> None:
    def run(outcome: str) -> gate.RunResult:
        return gate.RunResult("idle", 0, 0, outcome, 30.0, 1.0, 1.0)

    assert gate.goal_met("idle", [run("pass")] * 19 + [run("false alarm")])
    assert not gate.goal_met("idle", [run("pass")] * 18 + [run("inconclusive")] * 2)
    assert gate.goal_met("planted", [run("caught")] * 5)
    assert not gate.goal_met("planted", [run("caught")] * 4 + [run("missed")])

"""The perf suite's parent: a difference found in a case is measured again by fresh workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from perf import runner, suite


def _row(case: str, verdict: str, ratio: float) -> dict[str, Any]:
    decision = {
        "verdict": verdict, "ratio": ratio, "ci_low": ratio - 0.01, "ci_high": ratio + 0.01,
        "p_slower": 0.5, "p_faster": 0.5, "clock": "cpu", "pairs": 40, "sliced": 0,
        "reason": f"{verdict} {ratio}",
    }  # fmt: skip
    comparison = {"decision": decision, "candidate_wall": 1e-3, "candidate_cpu": 1e-3}
    return {"case": case, "status": "measured", "comparison": comparison}


def test_a_difference_is_measured_again_by_fresh_workers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Only the cases that differ are measured a second time, by a second pair of
    workers, and each keeps its difference only if the second pair finds it too."""
    first = {"a": ("pass", 1.0), "b": ("regression", 1.08), "c": ("improvement", 0.93),
             "d": ("regression", 1.2)}  # fmt: skip
    again = {"b": ("pass", 1.01), "c": ("improvement", 0.92), "d": ("inconclusive", 1.0)}
    calls: list[list[str]] = []

    def measure(args: Any, progress: Any, cases: list[str], *rest: Any) -> list[dict[str, Any]]:
        calls.append(list(cases))
        table = first if len(calls) == 1 else again
        return [_row(c, *table[c]) for c in cases]

    monkeypatch.setattr(runner, "_measure", measure)
    args = suite.build_parser().parse_args(["--device", "cpu"])
    rows = runner._run_cases(args, runner.Console(), list(first), tmp_path)
    assert calls == [["a", "b", "c", "d"], ["b", "c", "d"]]
    final = {r["case"]: r["comparison"]["decision"]["verdict"] for r in rows}
    assert final == {"a": "pass", "b": "pass", "c": "improvement", "d": "inconclusive"}
    assert rows[1]["first_comparison"]["decision"]["verdict"] == "regression"
    assert "not reproduced" in rows[1]["comparison"]["decision"]["reason"]
    assert "first_comparison" not in rows[0]
    assert not any(runner._is_regression(r) for r in rows)

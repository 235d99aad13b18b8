"""``moe-devkit gradients``: the tables, the JSON report and the verdict's findings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_support import TINY

from moe_devkit.cli import main


def test_gradients_table_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gradients.json"
    assert main(["gradients", *TINY, "--out", str(out)]) == 0
    section = json.loads(out.read_text())["sections"]["gradients"]
    assert set(section["groups"]) == {"rest", "router", "complexity_estimator", "experts"}
    assert "Gradient norm by MoE part" in capsys.readouterr().out


def test_gradients_findings_end_in_the_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    # every gradient norm is below 1e9: each parameter is flagged as vanishing (a warning)
    assert main(["gradients", *TINY, "--vanishing", "1e9"]) == 0
    out = capsys.readouterr().out
    verdict = out[out.index("verdict: ") :].splitlines()
    assert verdict[0].startswith("verdict: ") and verdict[0].endswith(" warnings")
    assert len(verdict) > 1
    assert all(line.startswith("  warning: gradient of ") for line in verdict[1:]), verdict

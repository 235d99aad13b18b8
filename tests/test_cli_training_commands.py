"""The numerics, gradients and memory subcommands: exit codes, reports, usage errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_devkit.cli import main

# min_k < max_k: dynamic routing, with padding rows in the experts' grouped matmul
TINY = ["--hidden-size", "16", "--num-experts", "4", "--min-k", "1", "--max-k", "2"]
TINY += ["--layers", "2", "--batch", "2", "--seq", "4", "--device", "cpu"]


def test_numerics_clean_and_planted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["numerics", *TINY, "--steps", "2"]) == 0
    out = tmp_path / "numerics.json"
    code = main(
        ["numerics", *TINY, "--steps", "3", "--plant-nan", "layers.1.moe", "--out", str(out)]
    )
    assert code == 1
    report = json.loads(out.read_text())
    (finding,) = report["findings"]
    assert (finding["location"], finding["step"]) == ("layers.1.moe", 2)
    assert report["sections"]["numerics"]["steps"] == 3
    assert "layers.1.moe" in capsys.readouterr().out


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


def test_memory_clean_and_planted_leak(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    # tolerance well above the Python caches' warm-up growth, well below the 256 KiB leak
    run = ["memory", *TINY, "--steps", "7", "--warmup", "2", "--tolerance", "32768"]
    assert main([*run, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["sections"]["memory"]["leak"]["leaking"] is False
    code = main([*run, "--plant-leak", "--out", str(out)])
    assert code == 1
    (finding,) = json.loads(out.read_text())["findings"]
    assert finding["code"] == "memory-leak"
    assert "commands/memory.py" in finding["location"]


@pytest.mark.parametrize(
    "argv",
    [
        ["numerics", "--plant-nan", "no.such.module", "--steps", "1"],
        ["numerics", "--steps", "0"],
        ["gradients", "--min-k", "3", "--max-k", "2"],
        ["gradients", "--device", "tpu"],
        ["memory", "--steps", "3", "--warmup", "5"],
        ["memory", "--tolerance", "-1"],
    ],
)
def test_bad_arguments_exit_2_without_traceback(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error" in err

"""``moe-devkit numerics``: the healthy reference model at its default size and a tiny one,
NaN-filled fresh buffers, and planted NaNs found at their module and step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_support import TINY

from moe_devkit.cli import main

SEEDS = range(10)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["complexity", "top_p"])
def test_healthy_model_is_clean_at_the_defaults(
    mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The default sizes route with padding (min_k < max_k), so the experts' grouped matmul
    # has rows past its last group; none of them may reach a watched tensor.
    for seed in SEEDS:
        assert main(["numerics", "--mode", mode, "--seed", str(seed)]) == 0, seed
        assert "no non-finite outputs or gradients" in capsys.readouterr().out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode", ["complexity", "top_p"])
def test_healthy_model_is_clean_with_nan_filled_fresh_buffers(
    poisoned_allocator: None, device: str, mode: str
) -> None:
    assert main(["numerics", "--mode", mode, "--device", device, "--steps", "3"]) == 0


@pytest.mark.parametrize(
    ("module", "step"), [("layers.0.moe.experts", 2), ("layers.1.moe.router", 3)]
)
def test_planted_nan_is_found_at_its_module(
    poisoned_allocator: None, tmp_path: Path, module: str, step: int
) -> None:
    out = tmp_path / "numerics.json"
    args = ["numerics", "--plant-nan", module, "--plant-step", str(step), "--out", str(out)]
    assert main(args) == 1
    (finding,) = json.loads(out.read_text())["findings"]
    assert (finding["location"], finding["step"]) == (module, step)


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

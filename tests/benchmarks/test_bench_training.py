"""benchmarks/bench_training.py: the CPU preset run whole (tiny reps) and its JSON checked, and
the peers shown to compute what moe-devkit's static layer and model compute (same work)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import bench_training as bt
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_training.py"
REPS = 3
DYNAMIC = [f"devkit dynamic k~{k:g}" for k in bt.PRESETS["cpu"].mean_k]
DEVKIT = ["devkit static", *DYNAMIC]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """The script's JSON and printed output for the CPU preset."""
    out = tmp_path_factory.mktemp("bench_training") / "train.json"
    argv = ["--preset", "cpu", "--reps", str(REPS), "--warmup", "1", "--threads", "1"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *argv, "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.parametrize("group", ["layer", "model"])
def test_every_case_is_timed_with_positive_times(
    run: tuple[dict[str, Any], str], group: str
) -> None:
    result, printed = run
    cases = result[group]["cases"]
    peers_run = [name for name in bt.PEERS if name not in result[group]["skipped"]]
    assert list(cases) == DEVKIT + peers_run
    for name, row in cases.items():
        assert len(row["samples_ms"]) == REPS, name
        assert all(ms > 0 for ms in row["samples_ms"]), name
        assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"], name
        assert any(line.startswith(name) for line in printed.splitlines()), name
    assert cases["devkit static"]["time_ratio_vs_static"] == 1.0
    fastest = result[group]["fastest_peer"]
    assert cases[fastest]["vs_fastest_peer"] == 1.0
    assert all(cases[p]["vs_fastest_peer"] >= 1.0 for p in peers_run)
    assert result[group]["step"] == bt.STEPS[group]
    assert result["machine"] and result["preset"] == "cpu" and result["dtype"] == "float32"


@pytest.mark.parametrize("group", ["layer", "model"])
def test_dynamic_cases_run_their_mean_k_with_a_spread_of_k(
    run: tuple[dict[str, Any], str], group: str
) -> None:
    result, _ = run
    preset = bt.PRESETS["cpu"]
    layers = 1 if group == "layer" else bt.NUM_LAYERS
    static_pairs = preset.tokens * preset.max_k * layers
    cases = result[group]["cases"]
    assert cases["devkit static"]["pair_ratio"] == 1.0
    assert cases["devkit static"]["active_pairs"] == static_pairs
    for name, k in zip(DYNAMIC, preset.mean_k, strict=True):
        row = cases[name]
        assert 0 < row["pair_ratio"] <= 1, name
        assert row["target_mean_k"] == k
        assert abs(row["mean_k"] - k) < 0.1, (name, row["mean_k"])  # calibrated, no drift
        assert abs(row["active_pairs_first"] - row["active_pairs"]) <= 0.01 * static_pairs
        # no capacity limit: every selected pair runs, so pairs / static = mean k / max_k
        assert row["pair_ratio"] == pytest.approx(row["mean_k"] / preset.max_k)
        assert row["k_std"] > 0.5 and row["k_min"] >= 1 and row["k_max"] <= preset.max_k, row
        assert len(row["top_p"]) == layers and all(0 < p <= 1 for p in row["top_p"])


def test_peers_run_or_are_skipped_with_the_reason(run: tuple[dict[str, Any], str]) -> None:
    result, printed = run
    for group in ("layer", "model"):
        cases, skipped = result[group]["cases"], result[group]["skipped"]
        for name in bt.PEERS:
            assert (name in cases) != (name in skipped), name
        # transformers is in the dev extra, so OLMoE's two experts implementations run
        assert {"olmoe grouped_mm", "olmoe eager"} <= set(cases)
        if not torch.cuda.is_available():
            assert "needs a CUDA device" in skipped["liger fused_moe"]
    for reason in result["model"]["skipped"].values():
        assert f"skipped: {reason}" in printed


def test_peers_compute_what_the_static_layer_and_model_compute() -> None:
    """The OLMoE peers get moe-devkit's static router and expert weights: the same top-k
    routing and the same outputs, so each step does the same work."""
    device = torch.device("cpu")
    reference = bt.devkit_model(bt.PRESETS["cpu"], device, torch.float32)
    static = bt.make_static(reference, device, torch.float32)
    x = torch.randn(64, static.config.hidden_size, generator=torch.Generator().manual_seed(3))
    layer = static.layers[0].moe
    with torch.no_grad():
        expected = layer(x).hidden_states
        for implementation in ("grouped_mm", "eager"):
            block = bt.olmoe_block(layer, implementation)
            torch.testing.assert_close(block(x[None])[0], expected, rtol=1e-5, atol=1e-5)
        blocks = [bt.olmoe_block(b.moe, "grouped_mm") for b in static.layers]
        peer = bt.PeerModel(static, blocks)
        torch.testing.assert_close(peer(x), static(x).hidden_states, rtol=1e-5, atol=1e-5)


def test_dynamic_copy_keeps_the_weights_and_hits_each_mean_k() -> None:
    device = torch.device("cpu")
    preset = bt.PRESETS["cpu"]
    reference = bt.devkit_model(preset, device, torch.float32)
    x = torch.randn(preset.tokens, preset.hidden, generator=torch.Generator().manual_seed(4))
    dynamic, thresholds = bt.make_dynamic(reference, x, 3.0)
    assert len(thresholds) == bt.NUM_LAYERS
    for ours, theirs in zip(dynamic.parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours, theirs)
    with torch.no_grad():
        routings = dynamic(x).routings
    for routing, top_p in zip(routings, thresholds, strict=True):
        assert abs(float(routing.k_per_token.float().mean()) - 3.0) < 0.05
        assert routing.k_per_token.unique().numel() > 2  # a spread of k, not one k for all
        assert 0 < top_p < 1

"""benchmarks/bench_trace_recording.py run whole on the CPU (one round of one step) and its
JSON checked: every model, mode and recorder case is timed, and what each recorder recorded
matches its settings (the default budget holds every call, the small budget fills and
copies its chunks to the host inside the timed calls)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_trace_recording.py"
TOKENS = 8 * 128  # a call of either model (bench_training_overhead's batch)
LAYERS_K = {"reference": (2, 4), "hf": (4, 2)}  # MoE layers and the widest k
TOKEN_IDS = {"reference": False, "hf": True}  # the reference model is called on embeddings
REPS = 2  # rounds of one step: the budget (3 calls) fills in the first timed call


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench_trace_recording") / "trace.json"
    argv = ["--reps", str(REPS), "--steps", "1", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *argv],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


def test_every_model_mode_and_case_is_timed(run: tuple[dict[str, Any], str]) -> None:
    result, printed = run
    assert result["machine"] and printed.startswith(f"machine: {result['machine']}")
    assert (result["device"], result["goal"], result["reps"], result["steps_per_block"]) == (
        "cpu",
        1.03,
        REPS,
        1,
    )
    pairs = [(r["model"], r["mode"]) for r in result["results"]]
    assert pairs == [(m, mode) for m in ("reference", "hf") for mode in ("train", "forward")]
    for r in result["results"]:
        assert r["tokens_per_call"] == TOKENS and r["plain_ms_per_step"] > 0
        assert f"{r['model']} {r['mode']}: plain " in printed
        assert list(r["cases"]) == ["default", "weights", "budget"]
        for case, c in r["cases"].items():
            low, high = c["ratio_95"]
            assert c["ms_per_step"] > 0 and low <= c["ratio"] <= high, case
            assert c["meets_goal"] == (c["ratio"] <= result["goal"])
            assert 0 < c["hook_share"] < 1, case
            # Counted over one recorded call after the first: the hooks only hold references,
            # except the detach of each layer's weights when they require grad (training)
            layers = LAYERS_K[r["model"]][0]
            detached = case != "default" and r["mode"] == "train"
            assert c["hook_ops_per_call"] == (layers if detached else 0), case


def test_each_recorder_records_what_its_settings_say(run: tuple[dict[str, Any], str]) -> None:
    result, _ = run
    for r in result["results"]:
        layers, k = LAYERS_K[r["model"]]
        default, weights, budget = (r["cases"][c] for c in ("default", "weights", "budget"))
        for c in (default, weights):  # 65536 tokens, one chunk: the 4 calls, no copy yet
            assert (c["max_tokens"], c["chunk_tokens"]) == (65536, 65536)
            assert (c["timed_calls_recorded"], c["timed_calls"]) == (REPS, REPS)
            assert c["timed_chunk_flushes"] == 0 and c["trace_tokens"] == (2 + REPS) * TOKENS
        assert not default["weights"] and weights["weights"] and budget["weights"]
        # The budget holds the warm-up, the op-count call and the first timed call: that
        # call copies the full two-call chunk to the host, records, and copies itself once
        # it filled the budget; the second timed call finds the budget full.
        assert budget["max_tokens"] == 3 * TOKENS and budget["chunk_tokens"] == 2 * TOKENS
        assert budget["timed_calls_recorded"] == 1 and budget["timed_chunk_flushes"] == 2
        assert budget["trace_tokens"] == 3 * TOKENS
        # device_bytes: the most the recorder held at once, the model's own tensors by
        # reference (int64 token ids, each layer's int64 expert ids, float32 weights): every
        # call of the run for the default budget (fewer than a batch), a chunk for the small
        # one.
        for c, calls in ((default, 2 + REPS), (weights, 2 + REPS), (budget, 2)):
            per_token = 8 * TOKEN_IDS[r["model"]] + layers * k * (8 + (4 if c["weights"] else 0))
            assert c["device_bytes"] == calls * TOKENS * per_token

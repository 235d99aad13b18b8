"""``moe-devkit compare-routing A B``: the report of two traces of a real tiny Mixtral, exit 1
when a layer's expert sets differ beyond ``--tolerance`` (0 otherwise), and every error as one
line, exit 2, with nothing written."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_zoo import build_tiny

from moe_devkit.cli import main
from moe_devkit.inspect.trace import RoutingTrace, RoutingTraceRecorder, compare_traces
from moe_devkit.reporting import load_report_json

PROG = "moe-devkit compare-routing"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trace(model: torch.nn.Module, seed: int) -> RoutingTrace:
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(seed))
    with RoutingTraceRecorder(model, weights=True) as recorder, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return recorder.trace()


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_tiny("mixtral").eval()
        perturbed = copy.deepcopy(model)
        with torch.no_grad():
            for name, parameter in perturbed.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    parameter.add_(0.5 * parameter.std() * torch.randn_like(parameter))
        folder = tmp_path_factory.mktemp("traces")
        made = {
            "a": _trace(model, 1),
            "a_again": _trace(copy.deepcopy(model), 1),
            "b": _trace(perturbed, 1),
            "other_inputs": _trace(model, 2),
        }
        renamed = copy.copy(made["a"])
        renamed.layers = [f"other.{name}" for name in renamed.layers]
        made["renamed"] = renamed
        paths = {name: trace.save(folder / f"{name}.npz") for name, trace in made.items()}
    finally:
        torch.set_num_threads(threads)
    np.savez(folder / "plain.npz", x=np.zeros(3))
    (folder / "text.npz").write_text("not a trace\n")
    paths["plain"] = folder / "plain.npz"
    paths["text"] = folder / "text.npz"
    return paths


def test_report_of_two_traces(
    traces: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    assert main(["compare-routing", str(traces["a"]), str(traces["b"]), "--out", str(out)]) == 1
    report = load_report_json(out / "routing_comparison.json")
    section = report["sections"]["routing_comparison"]
    expected = compare_traces(RoutingTrace.load(traces["a"]), RoutingTrace.load(traces["b"]))
    assert section["tokens_compared"] == 30 and section["traces"] == [
        str(traces["a"]),
        str(traces["b"]),
    ]
    assert section["layers"] == json.loads(json.dumps(expected.to_section()["layers"]))
    assert 0 < section["any_layer_differs"] == expected.any_layer_differs < 1
    assert section["identical"] is False
    page = (out / "routing_comparison.html").read_text()
    assert page.count('src="data:image/png;base64,') == 1
    assert all(layer["layer"] in page for layer in section["layers"])
    printed = capsys.readouterr().out
    assert "30 tokens compared" in printed and "routing_comparison.html" in printed
    # every layer whose sets differ at all is one routing-differs error, at tolerance 0
    differing = [layer.layer for layer in expected.layers if layer.set_differs > 0]
    assert differing and section["tolerance"] == 0.0
    assert [f["location"] for f in report["findings"]] == differing
    assert {f["code"] for f in report["findings"]} == {"routing-differs"}
    assert {f["severity"] for f in report["findings"]} == {"error"}
    assert f"verdict: {len(differing)} error" in printed
    assert page.count("routing-differs") == len(differing)


def test_tolerance_decides_the_exit_code(
    traces: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = compare_traces(RoutingTrace.load(traces["a"]), RoutingTrace.load(traces["b"]))
    fractions = sorted({layer.set_differs for layer in expected.layers})
    worst = fractions[-1]
    assert 0 < worst < 1
    args = ["compare-routing", str(traces["a"]), str(traces["b"])]
    # at the worst layer's own fraction nothing is over: exit 0, no findings
    out = tmp_path / "at_worst"
    assert main([*args, "--tolerance", repr(worst), "--out", str(out)]) == 0
    report = load_report_json(out / "routing_comparison.json")
    assert (
        report["findings"] == [] and report["sections"]["routing_comparison"]["tolerance"] == worst
    )
    assert "verdict: no alarms" in capsys.readouterr().out
    # just below it, the worst layer (and only the layers at that fraction) are findings
    below = worst - 1e-9
    out = tmp_path / "below_worst"
    assert main([*args, "--tolerance", repr(below), "--out", str(out)]) == 1
    over = [layer.layer for layer in expected.layers if layer.set_differs > below]
    assert [
        f["location"] for f in load_report_json(out / "routing_comparison.json")["findings"]
    ] == over
    assert [layer.layer for layer in expected.layers_over(below)] == over


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan", "half"])
def test_tolerance_outside_0_1_is_a_usage_error(
    traces: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    out = tmp_path / "out"
    argv = ["compare-routing", str(traces["a"]), str(traces["b"]), "--tolerance", value]
    assert main([*argv, "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"{PROG}: error: argument --tolerance: expected a fraction from 0 to 1; got {value!r}\n"
    )
    assert not out.exists()


@pytest.mark.parametrize("other", ["a", "a_again"])
def test_same_weights_compare_identical_exit_0(
    traces: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], other: str
) -> None:
    out = tmp_path / "same"
    argv = ["compare-routing", str(traces["a"]), str(traces[other]), "--out", str(out)]
    assert main(argv) == 0
    report = load_report_json(out / "routing_comparison.json")
    section = report["sections"]["routing_comparison"]
    assert section["identical"] is True and section["any_layer_differs"] == 0.0
    assert all(layer["jaccard"] == 1.0 for layer in section["layers"])
    assert report["findings"] == []
    assert capsys.readouterr().out.rstrip().endswith("verdict: no alarms")


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        ("missing", "b", "trace file {a!r} does not exist"),
        ("a", "missing", "trace file {b!r} does not exist"),
        (
            "text",
            "b",
            "trace file {a!r} cannot be read: {a}: not a readable .npy/.npz file (neither a "
            "numpy array nor an archive)",
        ),
        ("a", "plain", "trace file {b!r} cannot be read: {b}: not a routing record: expected"),
        ("a", "other_inputs", "the traces cannot be compared: the traces are not of the same"),
        ("a", "renamed", "the traces cannot be compared: the traces share no layer"),
    ],
)
def test_errors_are_one_line_and_write_nothing(
    traces: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    a: str,
    b: str,
    message: str,
) -> None:
    path_a = str(traces.get(a, tmp_path / "missing.npz"))
    path_b = str(traces.get(b, tmp_path / "missing.npz"))
    out = tmp_path / "out"
    assert main(["compare-routing", path_a, path_b, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"{PROG}: error: {message.format(a=path_a, b=path_b)}")
    assert not out.exists()


def test_out_that_is_a_file_is_refused(
    traces: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "taken"
    out.write_text("keep")
    assert main(["compare-routing", str(traces["a"]), str(traces["b"]), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"{PROG}: error: --out must be a directory; {str(out)!r} is a file\n"
    )
    assert out.read_text() == "keep"


def _as_vllm(path: Path, out: Path) -> Path:
    """The trace at ``path`` written as vLLM's routed experts of 3 requests: int16
    [requests, tokens, layers, k], k padded with E (a tiny Mixtral's traces have none)."""
    trace = RoutingTrace.load(path)
    ids = trace.expert_ids.astype(np.int16)
    ids[ids < 0] = 8
    np.save(out, ids.reshape(3, 10, *ids.shape[1:]))
    return out


def test_vllm_record_against_a_trace(
    traces: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    same = _as_vllm(traces["a"], tmp_path / "a_vllm.npy")
    other = _as_vllm(traces["b"], tmp_path / "b_vllm.npy")
    out = tmp_path / "same"
    argv = ["compare-routing", str(traces["a"]), str(same), "--num-experts", "8"]
    assert main([*argv, "--format-b", "vllm", "--out", str(out)]) == 0
    section = load_report_json(out / "routing_comparison.json")["sections"]["routing_comparison"]
    # the vLLM side's numbered layers took the trace's names: every layer compared
    assert [layer["layer"] for layer in section["layers"]] == RoutingTrace.load(traces["a"]).layers
    assert section["tokens_compared"] == 30 and section["any_layer_differs"] == 0.0
    # auto-detected, the perturbed model's record differs exactly as its own trace does
    out = tmp_path / "other"
    assert main(["compare-routing", str(traces["a"]), str(other), "--num-experts", "8",
                 "--out", str(out)]) == 1  # fmt: skip
    section = load_report_json(out / "routing_comparison.json")["sections"]["routing_comparison"]
    expected = compare_traces(RoutingTrace.load(traces["a"]), RoutingTrace.load(traces["b"]))
    assert [layer["set_differs"] for layer in section["layers"]] == [
        layer.set_differs for layer in expected.layers
    ]
    capsys.readouterr()
    # without --num-experts: one line saying what to pass
    assert main(["compare-routing", str(traces["a"]), str(same), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.rstrip().endswith("needs num_experts (pass --num-experts)")
    assert not (tmp_path / "x").exists()


def test_sglang_dump_compares_expert_loads(
    traces: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = RoutingTrace.load(traces["a"])
    counts = np.zeros((len(trace.layers), 8), np.int64)
    for layer in range(len(trace.layers)):
        np.add.at(counts[layer], trace.expert_ids[:, layer].reshape(-1), 1)
    dump = tmp_path / "expert_distribution_recorder_1.pt"
    torch.save({"rank": 0, "logical_count": torch.from_numpy(counts[None].astype(np.int32))}, dump)
    out = tmp_path / "same"
    assert main(["compare-routing", str(dump), str(traces["a"]), "--out", str(out)]) == 0
    report = load_report_json(out / "routing_count_comparison.json")
    section = report["sections"]["routing_count_comparison"]
    assert [layer["total_variation"] for layer in section["layers"]] == [0.0] * len(trace.layers)
    assert [layer["pairs_a"] for layer in section["layers"]] == [60] * len(trace.layers)
    assert report["findings"] == [] and "verdict: no alarms" in capsys.readouterr().out
    # against the perturbed model's trace the loads move: a finding per layer that moved
    out = tmp_path / "other"
    code = main(["compare-routing", str(dump), str(traces["b"]), "--out", str(out)])
    report = load_report_json(out / "routing_count_comparison.json")
    moved = [x["layer"] for x in report["sections"]["routing_count_comparison"]["layers"]
             if x["total_variation"] > 0]  # fmt: skip
    assert moved and code == 1
    assert [f["location"] for f in report["findings"]] == moved
    assert {f["code"] for f in report["findings"]} == {"routing-load-differs"}


@pytest.mark.parametrize("value", ["0", "8,x", "-1", ""])
def test_num_experts_must_be_positive_integers(
    traces: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    argv = ["compare-routing", str(traces["a"]), str(traces["b"]), "--num-experts", value]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"{PROG}: error: argument --num-experts: expected a positive integer or a "
        f"comma-separated list of them; got {value!r}\n"
    )

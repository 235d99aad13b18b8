"""``moe-devkit compare-routing A B``: the report of two traces of a real tiny Mixtral, and
every error as one line, exit 2, with nothing written."""

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
    assert main(["compare-routing", str(traces["a"]), str(traces["b"]), "--out", str(out)]) == 0
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


def test_a_trace_against_itself_is_identical(traces: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "same"
    assert main(["compare-routing", str(traces["a"]), str(traces["a"]), "--out", str(out)]) == 0
    section = load_report_json(out / "routing_comparison.json")["sections"]["routing_comparison"]
    assert section["identical"] is True and section["any_layer_differs"] == 0.0
    assert all(layer["jaccard"] == 1.0 for layer in section["layers"])


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        ("missing", "b", "trace file {a!r} does not exist"),
        ("a", "missing", "trace file {b!r} does not exist"),
        ("text", "b", "trace file {a!r} cannot be read: {a}: not an .npz routing trace"),
        ("a", "plain", "trace file {b!r} cannot be read: {b}: not a routing trace: no "),
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

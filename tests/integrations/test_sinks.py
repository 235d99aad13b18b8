"""Metric sinks: TensorBoard (a real SummaryWriter, read back) and JSON lines."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_devkit import RouterConfig
from moe_devkit.inspect import RouterInspector
from moe_devkit.inspect.live import METRIC_KEYS
from moe_devkit.inspect.summary import InspectorSummary
from moe_devkit.integrations.sinks import (
    TENSORBOARD_HINT,
    JsonLinesSink,
    MetricSink,
    TensorBoardSink,
    heatmap_image,
    k_histogram,
    k_histogram_record,
    mlflow_metric_name,
    utilization_matrix,
)
from moe_devkit.routers.torch_router import MoEModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def recorded() -> tuple[RouterInspector, list[dict[str, float]], InspectorSummary]:
    """Three windows of a 2-layer x 6-expert reference model, and its summary."""
    torch.manual_seed(0)
    model = MoEModel(RouterConfig(hidden_size=16, num_experts=6, min_k=1, max_k=3), num_layers=2)
    windows = []
    with RouterInspector(model) as inspector:
        for _ in range(3):
            for _ in range(2):
                model(torch.randn(4, 8, 16))
            windows.append(inspector.metrics(prefix="moe/"))
    return inspector, windows, inspector.summary()


def test_sinks_follow_the_protocol(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    tb = TensorBoardSink(tmp_path / "tb")
    jl = JsonLinesSink(tmp_path / "m.jsonl")
    assert isinstance(tb, MetricSink) and isinstance(jl, MetricSink)
    tb.close()
    jl.close()


def test_tensorboard_sink_writes_scalars_heatmap_and_k_histogram(
    tmp_path: Path, recorded: tuple[RouterInspector, list[dict[str, float]], InspectorSummary]
) -> None:
    pytest.importorskip("tensorboard")
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, windows, summary = recorded
    sink = TensorBoardSink(tmp_path / "tb")
    for step, metrics in zip((10, 20, 30), windows, strict=True):
        sink.log(metrics, step)
    sink.log_images(summary, 30)
    sink.close()

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {f"moe/{k}" for k in METRIC_KEYS}
    for key in METRIC_KEYS:
        events = acc.Scalars(f"moe/{key}")
        assert [e.step for e in events] == [10, 20, 30]
        for event, metrics in zip(events, windows, strict=True):
            expected = np.float32(metrics[f"moe/{key}"])
            assert event.value == expected or (math.isnan(event.value) and np.isnan(expected))

    # the heatmap: one row per layer, one column per expert, each layer's share of its pairs
    matrix = utilization_matrix(summary)
    counts = np.array([layer["utilization"]["counts"] for layer in summary.layers.values()])
    assert matrix.shape == (2, 6)
    np.testing.assert_allclose(matrix, counts / counts.sum(axis=1, keepdims=True))
    (image,) = acc.Images("moe/utilization")
    assert image.step == 30
    pixels = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(pixels, heatmap_image(matrix))
    assert pixels.shape == (2 * 8, 6 * 8, 3)

    # the k histogram: tokens per executed k, summed over the layers
    hist = k_histogram(summary)
    expected_hist = sum(np.array(layer["k"]["histogram"]) for layer in summary.layers.values())
    np.testing.assert_array_equal(hist, expected_hist)
    (histogram,) = acc.Histograms("moe/k")
    assert histogram.step == 30
    value = histogram.histogram_value
    assert value.num == hist.sum() == 2 * 6 * 4 * 8  # layers x forwards x tokens
    assert list(value.bucket) == hist.tolist()
    assert value.sum == pytest.approx(float((hist * np.arange(len(hist))).sum()))


def test_tensorboard_sink_leaves_a_callers_writer_open(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    sink = TensorBoardSink(writer)
    sink.log({"moe/tokens": 3.0}, 1)
    sink.close()
    writer.add_scalar("after", 1.0, 2)  # still open
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("moe/tokens")] == [3.0]
    assert [e.step for e in acc.Scalars("after")] == [2]


def test_tensorboard_sink_without_tensorboard_names_the_extra(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['tensorboard'] = None\n"
        "from moe_devkit.integrations.sinks import TensorBoardSink\n"
        f"TensorBoardSink({str(tmp_path / 'tb')!r})\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ModuleNotFoundError: {TENSORBOARD_HINT}"), run.stderr
    assert 'pip install "moe-devkit[tensorboard]"' in last


def test_json_lines_sink_writes_one_whole_flushed_line_per_step(
    tmp_path: Path, recorded: tuple[RouterInspector, list[dict[str, float]], InspectorSummary]
) -> None:
    _, windows, summary = recorded
    path = tmp_path / "logs" / "moe.jsonl"
    sink = JsonLinesSink(path)
    sink.log(windows[0], 5)
    # flushed: a reader sees the whole line before the sink is closed
    (first,) = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(first)["step"] == 5
    sink.log({"moe/tokens": 1.0, "moe/k_drift": math.nan}, 10)
    sink.log_images(summary, 10)  # scalars only: writes nothing
    sink.close()
    with pytest.raises(ValueError, match="closed"):
        sink.log({"moe/tokens": 1.0}, 15)

    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]
    assert [r["step"] for r in records] == [5, 10]
    assert all(isinstance(r["time"], float) for r in records)
    assert records[0]["metrics"] == {
        k: (None if math.isnan(v) else v) for k, v in windows[0].items()
    }
    assert records[1]["metrics"] == {"moe/tokens": 1.0, "moe/k_drift": None}  # NaN -> null

    JsonLinesSink(path).close()  # reopening appends, never truncates
    assert path.read_text(encoding="utf-8") == text


def test_mlflow_names_keep_valid_keys_and_replace_the_rest() -> None:
    for key in METRIC_KEYS:
        assert mlflow_metric_name(f"moe/{key}") == f"moe/{key}"
    assert mlflow_metric_name("moe/layer/model.layers.0.mlp/mean_k") == (
        "moe/layer/model.layers.0.mlp/mean_k"
    )
    assert mlflow_metric_name("moe/expert_share/a[0](b)/3") == "moe/expert_share/a_0__b_/3"


def test_k_histogram_record_is_the_summed_histogram_as_json(
    recorded: tuple[RouterInspector, list[dict[str, float]], InspectorSummary],
) -> None:
    _, _, summary = recorded
    record = k_histogram_record(summary, 30)
    hist = k_histogram(summary)
    assert json.loads(json.dumps(record)) == record
    assert record == {"step": 30, "k": list(range(len(hist))), "tokens": hist.tolist()}
    assert record["tokens"][0] == 0 and sum(record["tokens"]) == 2 * 6 * 4 * 8

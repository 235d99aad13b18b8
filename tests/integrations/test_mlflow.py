"""MLflow: the Trainer's ``report_to=["mlflow"]`` run and MLflowSink, read back from a local
MLflow store with ``MlflowClient``.

MLflow 3 refuses a ``file:`` tracking store unless ``MLFLOW_ALLOW_FILE_STORE`` is set; the
tests use the local store its docs name instead, SQLite (``sqlite:///<tmp>/mlflow.db``),
with artifacts under ``<tmp>/mlruns`` (the default artifact root, relative to the working
directory).
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")

from training_support import reference_windows  # noqa: E402

from moe_devkit.inspect.live import METRIC_KEYS  # noqa: E402
from moe_devkit.integrations.sinks import (  # noqa: E402
    MLFLOW_HINT,
    MetricSink,
    MLflowSink,
    heatmap_image,
    k_histogram,
    utilization_matrix,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A local MLflow store in tmp_path; no telemetry, no run left active."""
    monkeypatch.chdir(tmp_path)  # the default artifact root ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def history(client: Any, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def artifacts(client: Any, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for info in client.list_artifacts(run_id, path):
        out.extend(artifacts(client, run_id, info.path) if info.is_dir else [info.path])
    return out


def test_trainer_reports_every_key_at_every_logging_step_to_mlflow(
    tmp_path: Path, store: str
) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from reported_training import LOGGING_STEPS, train_reported

    _, _, reference = train_reported(
        tmp_path,
        ["mlflow"],
        max_steps=20,
        on_alarm="raise",
        images_every=10,  # the images go to the Trainer's own run, with no sink given
    )

    steps = list(range(LOGGING_STEPS, 21, LOGGING_STEPS))
    assert sorted(reference.by_step) == steps
    run = mlflow.last_active_run()
    assert run is not None and run.info.status == "FINISHED"  # the Trainer's MLflowCallback
    client = mlflow.MlflowClient()
    for key in METRIC_KEYS:
        # transformers' MLflowCallback logs the keys as given: "moe/..." is a valid name
        logged = history(client, run.info.run_id, f"moe/{key}")
        assert sorted(logged) == steps, key
        for step in steps:
            expected = reference.by_step[step][f"moe/{key}"]
            assert same(logged[step], expected), (key, step, logged[step], expected)
    assert history(client, run.info.run_id, "moe/steps") == dict.fromkeys(steps, LOGGING_STEPS)
    assert set(history(client, run.info.run_id, "loss")) == set(steps)
    # one value per step: the image sink (scalars=False) added none
    assert len(client.get_metric_history(run.info.run_id, "moe/mean_k")) == len(steps)

    files = artifacts(client, run.info.run_id)
    pngs = [f for f in files if f.startswith("images/moe~utilization+") and f.endswith(".png")]
    assert sorted(int(p.split("+step+")[1].split("+")[0]) for p in pngs) == [10, 20], files
    assert sorted(f for f in files if f.startswith("moe/k/")) == [
        "moe/k/step_00000010.json",
        "moe/k/step_00000020.json",
    ]


@pytest.fixture
def windows() -> tuple[list[dict[str, float]], Any]:
    """Three windows of a 2-layer x 6-expert reference model in a plain loop, and a summary."""
    return reference_windows()


def test_mlflow_sink_writes_scalars_heatmap_and_k_histogram(
    store: str, windows: tuple[list[dict[str, float]], Any]
) -> None:
    from PIL import Image

    metrics, summary = windows
    client = mlflow.MlflowClient()
    with mlflow.start_run() as run:
        sink = MLflowSink()  # the active run
        assert isinstance(sink, MetricSink)
        for step, window in zip((10, 20, 30), metrics, strict=True):
            sink.log(window, step)
        sink.log({"moe/k_drift": math.nan}, 40)  # a window with no value (no tokens)
        sink.log_images(summary, 20)
        sink.log_images(summary, 30)
        sink.close()
    run_id = run.info.run_id

    for key in METRIC_KEYS:
        logged = history(client, run_id, f"moe/{key}")
        assert sorted(logged) == ([10, 20, 30, 40] if key == "k_drift" else [10, 20, 30]), key
        for step, window in zip((10, 20, 30), metrics, strict=True):
            assert logged[step] == window[f"moe/{key}"], (key, step)
    assert math.isnan(history(client, run_id, "moe/k_drift")[40])  # NaN is stored as NaN

    files = artifacts(client, run_id)
    # step-tracked images: images/moe~utilization+step+<step>+..., a PNG per step
    pngs = sorted(
        f for f in files if f.startswith("images/moe~utilization+") and f.endswith(".png")
    )
    assert [int(p.split("+step+")[1].split("+")[0]) for p in pngs] == [20, 30], files
    local = Path(client.download_artifacts(run_id, pngs[-1], dst_path=str(Path.cwd() / "dl")))
    pixels = np.asarray(Image.open(io.BytesIO(local.read_bytes())).convert("RGB"))
    np.testing.assert_array_equal(pixels, heatmap_image(utilization_matrix(summary)))

    assert sorted(f for f in files if f.startswith("moe/k/")) == [
        "moe/k/step_00000020.json",
        "moe/k/step_00000030.json",
    ]
    path = client.download_artifacts(run_id, "moe/k/step_00000030.json", str(Path.cwd()))
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    hist = k_histogram(summary)
    assert record == {"step": 30, "k": list(range(len(hist))), "tokens": hist.tolist()}
    assert sum(record["tokens"]) == 2 * 6 * 4 * 8  # layers x forwards x tokens


def test_mlflow_sink_writes_to_a_given_run_and_needs_one(store: str) -> None:
    client = mlflow.MlflowClient(store)
    experiment = client.create_experiment("given")
    run_id = client.create_run(experiment).info.run_id
    sink = MLflowSink(run_id, client)
    sink.log({"moe/tokens": 3.0, "moe/layer/model.layers.0(mlp)/share": 0.5}, 7)
    assert history(client, run_id, "moe/tokens") == {7: 3.0}
    # a character MLflow refuses becomes "_", as transformers' MLflowCallback does it
    assert history(client, run_id, "moe/layer/model.layers.0_mlp_/share") == {7: 0.5}

    with pytest.raises(ValueError, match="no active MLflow run"):
        MLflowSink().log({"moe/tokens": 1.0}, 1)
    with pytest.raises(ValueError, match="not both"):
        MLflowSink(client=client, tracking_uri=store)


def test_mlflow_sink_without_mlflow_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['mlflow'] = None\n"
        "from moe_devkit.integrations.sinks import MLflowSink\n"
        "MLflowSink('0')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ModuleNotFoundError: {MLFLOW_HINT}"), run.stderr
    assert 'pip install "moe-devkit[mlflow]"' in last

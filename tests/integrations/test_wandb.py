"""Weights & Biases: the Trainer's ``report_to=["wandb"]`` run and WandbSink, offline, read
back from the run's transaction log (``run-<id>.wandb``).

wandb 0.31 has no Python reader of that file any more (its internal process, wandb-core,
writes it), so ``wandb_records`` reads the format itself: a 7-byte header (``:W&B``, magic,
version), then LevelDB log records (32 KiB blocks; a 7-byte record header of checksum,
length and type, FULL/FIRST/MIDDLE/LAST), each a ``wandb_internal_pb2.Record`` parsed with
wandb's own protobuf classes. A history record's items hold JSON values (NaN as ``NaN``).
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

wandb = pytest.importorskip("wandb")

from training_support import reference_windows  # noqa: E402

from moe_devkit.inspect.live import METRIC_KEYS  # noqa: E402
from moe_devkit.integrations.sinks import (  # noqa: E402
    WANDB_HINT,
    MetricSink,
    WandbSink,
    heatmap_image,
    k_histogram,
    utilization_matrix,
)

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[Any]:
    """The ``Record`` messages of an offline run's ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        assert kind in (FULL, FIRST, MIDDLE, LAST), kind
        if kind in (FULL, FIRST):
            pending = b""
        pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def history_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Every history row of the one offline run under ``run_dir``: key -> decoded value."""
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows = []
    for record in wandb_records(log):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def finish(run: Any) -> None:
    """Finishes ``run`` and stops wandb's service process: only then is the run's ``.wandb``
    file complete (``finish()`` alone can return before its last records are written)."""
    run.finish()
    wandb.teardown()


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """wandb offline, every file it writes under tmp_path, no credentials read."""
    home = tmp_path / "wandb_home"
    for name, sub in [
        ("WANDB_DIR", ""),
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ]:
        (home / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(name, str(home / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "moe-devkit-test")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    monkeypatch.setenv("NETRC", str(home / "netrc"))  # absent: no ~/.netrc either
    for name in ("WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    yield home
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()  # the wandb-core service process ends here


def test_trainer_reports_every_key_at_every_logging_step_to_wandb(
    tmp_path: Path, offline: Path
) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from reported_training import LOGGING_STEPS, train_reported

    _, _, reference = train_reported(
        tmp_path, ["wandb"], max_steps=20, on_alarm="raise", images_every=10
    )  # the images go to the Trainer's own run, with no sink given
    assert wandb.run is not None and wandb.run.offline
    finish(wandb.run)  # transformers' WandbCallback leaves the run open

    steps = list(range(LOGGING_STEPS, 21, LOGGING_STEPS))
    assert sorted(reference.by_step) == steps
    # transformers' WandbCallback logs "train/<key>" with "train/global_step" in the row
    rows = [r for r in history_rows(offline) if "train/loss" in r]
    assert [r["train/global_step"] for r in rows] == steps
    for row in rows:
        step = row["train/global_step"]
        for key in METRIC_KEYS:
            expected = reference.by_step[step][f"moe/{key}"]
            value = row[f"train/moe/{key}"]
            assert value == expected or (math.isnan(value) and math.isnan(expected)), (key, step)
        assert row["train/moe/steps"] == LOGGING_STEPS
    # the images, in the Trainer's run on the Trainer's x axis (and no scalars)
    image_rows = [r for r in history_rows(offline) if "train/moe/utilization/_type" in r]
    assert [r["train/global_step"] for r in image_rows] == [10, 20]
    for row in image_rows:
        assert row["train/moe/utilization/_type"] == "image-file"
        assert row["train/moe/k/_type"] == "histogram"
        assert "train/moe/mean_k" not in row


@pytest.fixture
def windows() -> tuple[list[dict[str, float]], Any]:
    """Three windows of a 2-layer x 6-expert reference model in a plain loop, and a summary."""
    return reference_windows()


def test_wandb_sink_writes_scalars_heatmap_and_k_histogram(
    offline: Path, windows: tuple[list[dict[str, float]], Any]
) -> None:
    from PIL import Image

    metrics, summary = windows
    run = wandb.init()
    sink = WandbSink()  # the current run
    assert isinstance(sink, MetricSink)
    for step, window in zip((10, 20, 30), metrics, strict=True):
        run.log({"loss": 1.0})  # the loop's own rows move wandb's _step past the sink's steps
        sink.log(window, step)
    sink.log({"moe/k_drift": math.nan}, 40)
    sink.log_images(summary, 40)
    sink.close()
    run_dir = Path(run.dir).parent
    finish(run)

    rows = [r for r in history_rows(offline) if "moe/global_step" in r]
    assert [r["moe/global_step"] for r in rows] == [10, 20, 30, 40, 40]
    for row, window in zip(rows, metrics, strict=False):
        assert {k: v for k, v in row.items() if not k.startswith(("_", "moe/global"))} == window
    assert math.isnan(rows[3]["moe/k_drift"])  # NaN is stored as NaN

    images = rows[4]
    assert images["moe/utilization/_type"] == "image-file"
    png = run_dir / "files" / images["moe/utilization/path"]
    pixels = np.asarray(Image.open(png).convert("RGB"))
    np.testing.assert_array_equal(pixels, heatmap_image(utilization_matrix(summary)))
    assert images["moe/k/_type"] == "histogram"
    hist = k_histogram(summary)
    assert images["moe/k/values"] == hist.tolist()
    assert images["moe/k/bins"] == [k - 0.5 for k in range(len(hist) + 1)]
    assert sum(images["moe/k/values"]) == 2 * 6 * 4 * 8  # layers x forwards x tokens

    # the sink declared the training step as the x axis of every key it wrote
    metric_names = set()
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "metric":
            metric_names.add((record.metric.name, record.metric.step_metric))
    assert ("moe/mean_k", "moe/global_step") in metric_names
    assert ("moe/utilization", "moe/global_step") in metric_names


def test_wandb_sink_with_step_none_passes_the_step_and_needs_a_run(offline: Path) -> None:
    run = wandb.init()
    WandbSink(run, step_metric=None).log({"moe/tokens": 3.0}, 7)
    finish(run)
    (row,) = [r for r in history_rows(offline) if "moe/tokens" in r]
    assert row["moe/tokens"] == 3.0 and row["_step"] == 7

    with pytest.raises(ValueError, match="no current wandb run"):
        WandbSink().log({"moe/tokens": 1.0}, 1)


def test_wandb_sink_without_wandb_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['wandb'] = None\n"
        "from moe_devkit.integrations.sinks import WandbSink\n"
        "WandbSink()\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ModuleNotFoundError: {WANDB_HINT}"), run.stderr
    assert 'pip install "moe-devkit[wandb]"' in last

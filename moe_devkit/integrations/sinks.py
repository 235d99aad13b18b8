"""Metric sinks: thin adapters that write the inspector's live metrics where training is watched.

A sink takes the scalars of ``RouterInspector.metrics()`` at a step (``log``), optionally the
layer x expert utilization heatmap and the k histogram of a summary (``log_images``), and is
closed at the end (``close``):

- ``TensorBoardSink(log_dir_or_writer)``: ``torch.utils.tensorboard``'s ``SummaryWriter``
  (needs ``pip install "moe-devkit[tensorboard]"``). Scalars with ``add_scalar``, the heatmap
  with ``add_image`` and the k histogram with ``add_histogram_raw``.
- ``JsonLinesSink(path)``: one JSON object per logged step (``step``, ``time``, ``metrics``),
  each line written whole and flushed, so a reader never sees half a line.
- ``MLflowSink(run_id=None, client=None, tracking_uri=None)``: an MLflow run (needs
  ``pip install "moe-devkit[mlflow]"``). The scalars of a step in one ``log_batch`` call, the
  heatmap with ``log_image`` (a PNG per step) and the k histogram as a JSON artifact.
- ``WandbSink(run=None, step_metric="moe/global_step")``: a Weights & Biases run (needs
  ``pip install "moe-devkit[wandb]"``). One ``run.log`` call per step; the heatmap as a
  ``wandb.Image`` and the k histogram as a ``wandb.Histogram``.

None imports anything beyond the standard library until it is created.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from moe_devkit.inspect.summary import InspectorSummary

TENSORBOARD_HINT = 'TensorBoardSink needs tensorboard: pip install "moe-devkit[tensorboard]"'
MLFLOW_HINT = 'MLflowSink needs mlflow: pip install "moe-devkit[mlflow]"'
WANDB_HINT = 'WandbSink needs wandb: pip install "moe-devkit[wandb]"'


@runtime_checkable
class MetricSink(Protocol):
    """Where live metrics go: ``log`` each logging step, ``log_images`` now and then."""

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_images(self, summary: InspectorSummary, step: int) -> None: ...

    def close(self) -> None: ...


def utilization_matrix(summary: InspectorSummary) -> np.ndarray:
    """float[layers, experts]: each layer's share of executed pairs per expert (rows sum to 1).

    Layers with fewer experts than the widest are padded with NaN; a layer with no pairs is 0.
    """
    import numpy as np

    rows = [layer["utilization"]["counts"] for layer in summary.layers.values()]
    width = max((len(row) for row in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        counts = np.asarray(row, dtype=np.float64)
        total = counts.sum()
        out[i, : len(counts)] = counts / total if total > 0 else 0.0
    return out


def k_histogram(summary: InspectorSummary) -> np.ndarray:
    """int[max_k + 1]: tokens per number of experts executed, summed over layers."""
    import numpy as np

    hists = [
        np.asarray(layer["k"]["histogram"], dtype=np.int64) for layer in summary.layers.values()
    ]
    out = np.zeros(max((len(h) for h in hists), default=0), dtype=np.int64)
    for hist in hists:
        out[: len(hist)] += hist
    return out


def heatmap_image(matrix: np.ndarray, cell: int = 8) -> np.ndarray:
    """uint8[H, W, 3]: ``matrix`` (values in [0, 1], NaN for no expert) as a viridis image,
    each layer x expert cell ``cell`` pixels square; NaN cells are black."""
    import numpy as np
    from matplotlib import colormaps

    scale = np.nanmax(matrix) if matrix.size and np.isfinite(matrix).any() else 1.0
    normed = np.nan_to_num(matrix / (scale if scale > 0 else 1.0), nan=0.0)
    rgb = colormaps["viridis"](normed)[..., :3]
    rgb[np.isnan(matrix)] = 0.0
    rgb = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
    image: np.ndarray = np.asarray((rgb * 255).round(), dtype=np.uint8)
    return image


class TensorBoardSink:
    """Writes metrics to TensorBoard through ``torch.utils.tensorboard.SummaryWriter``.

    Args:
        log_dir_or_writer: a directory for a new writer, or a ``SummaryWriter`` to write to
            (one the caller owns is flushed by ``close()``, not closed).
        image_tag: the tag prefix of the heatmap and k histogram (``<prefix>utilization``,
            ``<prefix>k``).

    Raises:
        ModuleNotFoundError: tensorboard is not installed (the message names the extra).
    """

    def __init__(self, log_dir_or_writer: str | Path | Any, *, image_tag: str = "moe/") -> None:
        if isinstance(log_dir_or_writer, (str, Path)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # tensorboard missing, or older than torch needs
                raise ModuleNotFoundError(f"{TENSORBOARD_HINT} ({err})") from None
            self.writer: Any = SummaryWriter(log_dir=str(log_dir_or_writer))
            self._owned = True
        else:
            self.writer = log_dir_or_writer
            self._owned = False
        self.image_tag = image_tag

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """One scalar per key at ``step``."""
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), global_step=step)

    def log_images(self, summary: InspectorSummary, step: int) -> None:
        """The utilization heatmap (rows: layers, columns: experts) and the k histogram."""
        import numpy as np

        matrix = utilization_matrix(summary)
        if matrix.size:
            image = heatmap_image(matrix)
            self.writer.add_image(
                f"{self.image_tag}utilization", image, global_step=step, dataformats="HWC"
            )
        hist = k_histogram(summary)
        total = int(hist.sum())
        if total:
            ks = np.arange(len(hist), dtype=np.float64)
            present = np.nonzero(hist)[0]
            self.writer.add_histogram_raw(
                f"{self.image_tag}k",
                min=float(present[0]),
                max=float(present[-1]),
                num=total,
                sum=float((hist * ks).sum()),
                sum_squares=float((hist * ks**2).sum()),
                bucket_limits=(ks + 0.5).tolist(),  # bucket i holds k = i
                bucket_counts=hist.astype(np.float64).tolist(),
                global_step=step,
            )

    def close(self) -> None:
        """Flushes; closes the writer if this sink created it."""
        self.writer.flush()
        if self._owned:
            self.writer.close()


class JsonLinesSink:
    """Appends one JSON object per logged step to ``path``: ``{"step", "time", "metrics"}``.

    Each line is written in one call and flushed, so a reader sees whole lines only.
    Non-finite values are written as ``null`` (JSON has no NaN). Images are not written.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._file is None:
            raise ValueError(f"JsonLinesSink({str(self.path)!r}) is closed")
        values = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        line = json.dumps({"step": int(step), "time": time.time(), "metrics": values})
        self._file.write(line + "\n")
        self._file.flush()

    def log_images(self, summary: InspectorSummary, step: int) -> None:
        """JSON lines hold scalars only: nothing is written."""

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def k_histogram_record(summary: InspectorSummary, step: int) -> dict[str, Any]:
    """The k histogram of ``summary`` as JSON: ``{"step", "k", "tokens"}``, where
    ``tokens[i]`` tokens executed ``k[i]`` experts (summed over layers)."""
    hist = k_histogram(summary)
    return {"step": int(step), "k": list(range(len(hist))), "tokens": hist.tolist()}


_MLFLOW_BAD_CHARACTER = re.compile(r"[^0-9A-Za-z_\-. :/]")


def mlflow_metric_name(key: str) -> str:
    """``key`` as an MLflow metric name: a character MLflow refuses becomes ``_`` (the rule of
    transformers' ``MLflowCallback``, so both write the same names)."""
    return _MLFLOW_BAD_CHARACTER.sub("_", key)


class MLflowSink:
    """Writes metrics to an MLflow run through ``mlflow.MlflowClient``.

    - ``log``: every scalar of the step in one ``log_batch`` call (synchronous). Keys keep
      their names (``moe/mean_k``); a character MLflow does not accept becomes ``_``. NaN
      (``k_drift`` in the first window, for instance) is logged as NaN, which MLflow stores
      and returns as NaN; MLflow stores +-inf as +-``sys.float_info.max``.
    - ``log_images``: the utilization heatmap with ``log_image(key=<prefix>utilization,
      step=step)`` (MLflow's step-tracked images: a PNG per step under ``images/``) and the
      k histogram, which MLflow has no type for, as the JSON artifact
      ``<prefix>k/step_<step, 8 digits>.json`` (``{"step", "k", "tokens"}``).
    - ``close``: nothing to flush; the run is left open (it belongs to the caller).

    Args:
        run_id: the run to write to (default: the active run, ``mlflow.active_run()``, at each
            call; a call with no active run raises ``ValueError``).
        client: the ``MlflowClient`` to use (default: a new one for ``tracking_uri``).
        tracking_uri: the tracking URI of a new client (default: MLflow's current one).
        image_tag: the prefix of the heatmap key and of the k histogram's artifact folder.
        scalars: ``False`` makes ``log`` write nothing, for a run that gets the scalars
            another way (a Trainer's ``report_to=["mlflow"]``) and only the images here.

    Raises:
        ModuleNotFoundError: mlflow is not installed (the message names the extra).
    """

    def __init__(
        self,
        run_id: str | None = None,
        client: Any = None,
        *,
        tracking_uri: str | None = None,
        image_tag: str = "moe/",
        scalars: bool = True,
    ) -> None:
        if client is not None and tracking_uri is not None:
            raise ValueError("MLflowSink: pass a client or a tracking_uri, not both")
        try:
            import mlflow
        except ImportError as err:
            raise ModuleNotFoundError(f"{MLFLOW_HINT} ({err})") from None
        self._mlflow: Any = mlflow
        self.client: Any = client if client is not None else mlflow.MlflowClient(tracking_uri)
        self.run_id = run_id
        self.image_tag = image_tag
        self.scalars = scalars

    def _run(self) -> str:
        if self.run_id is not None:
            return self.run_id
        active = self._mlflow.active_run()
        if active is None:
            raise ValueError("MLflowSink: no run_id given and no active MLflow run")
        return str(active.info.run_id)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """One ``log_batch`` call: every key at ``step`` (nothing if ``scalars`` is off)."""
        if not self.scalars:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [
            Metric(mlflow_metric_name(key), float(value), stamp, int(step))
            for key, value in metrics.items()
        ]
        if batch:
            self.client.log_batch(self._run(), metrics=batch, synchronous=True)

    def log_images(self, summary: InspectorSummary, step: int) -> None:
        """The utilization heatmap (rows: layers, columns: experts) and the k histogram."""
        run_id = self._run()
        matrix = utilization_matrix(summary)
        if matrix.size:
            self.client.log_image(
                run_id,
                heatmap_image(matrix),
                key=mlflow_metric_name(f"{self.image_tag}utilization"),
                step=int(step),
                synchronous=True,
            )
        if int(k_histogram(summary).sum()):
            self.client.log_dict(
                run_id,
                k_histogram_record(summary, step),
                f"{self.image_tag}k/step_{int(step):08d}.json",
            )

    def close(self) -> None:
        """Writes are synchronous: nothing is pending, and the run stays open."""


class WandbSink:
    """Writes metrics to a Weights & Biases run.

    wandb's own step (``_step``) counts ``run.log`` calls that commit a row, and a
    ``run.log(..., step=s)`` with ``s`` below it is dropped with a warning; a training loop
    that logs its loss with ``run.log`` every step moves it past the step of a later call.
    So by default each call logs the training step as a metric of its own,
    ``step_metric`` (default ``moe/global_step``), declared with ``run.define_metric`` as the
    x axis of every key this sink writes, and leaves ``_step`` to the run (the way
    transformers' ``WandbCallback`` logs ``train/global_step``). With ``step_metric=None`` it
    passes ``step=`` to ``run.log``, for a run whose ``_step`` is the training step.

    - ``log``: one ``run.log`` call with every key of the step. NaN is logged as NaN, and
      the run's history stores it as NaN.
    - ``log_images``: one ``run.log`` call: ``<prefix>utilization``, the heatmap as a
      ``wandb.Image``, and ``<prefix>k``, the k histogram as a
      ``wandb.Histogram(np_histogram=...)`` with one bin per k (edges k - 0.5, k + 0.5).
    - ``close``: the run is left open (``run.finish()`` is the caller's).

    Args:
        run: the run to write to (default: ``wandb.run``, the current run, at each call; a
            call with none raises ``ValueError``).
        step_metric: the key that carries the training step, or ``None`` for ``step=``.
        image_tag: the prefix of the heatmap and k histogram keys.
        scalars: ``False`` makes ``log`` write nothing, for a run that gets the scalars
            another way (a Trainer's ``report_to=["wandb"]``) and only the images here.

    Raises:
        ModuleNotFoundError: wandb is not installed (the message names the extra).
    """

    def __init__(
        self,
        run: Any = None,
        *,
        step_metric: str | None = "moe/global_step",
        image_tag: str = "moe/",
        scalars: bool = True,
    ) -> None:
        try:
            import wandb
        except ImportError as err:
            raise ModuleNotFoundError(f"{WANDB_HINT} ({err})") from None
        self._wandb: Any = wandb
        self.run: Any = run
        self.step_metric = step_metric
        self.image_tag = image_tag
        self.scalars = scalars
        self._defined: dict[int, set[str]] = {}  # per run (by id): the keys given an x axis

    def _current(self) -> Any:
        run = self.run if self.run is not None else self._wandb.run
        if run is None:
            raise ValueError("WandbSink: no run given and no current wandb run (wandb.init)")
        return run

    def _write(self, data: dict[str, Any], step: int) -> None:
        run = self._current()
        if self.step_metric is None:
            run.log(data, step=int(step))
            return
        defined = self._defined.setdefault(id(run), set())
        if not defined:
            run.define_metric(self.step_metric)
        for key in data.keys() - defined:
            run.define_metric(key, step_metric=self.step_metric)
            defined.add(key)
        run.log({**data, self.step_metric: int(step)})

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """One ``run.log`` call: every key at ``step`` (nothing if ``scalars`` is off)."""
        if not self.scalars:
            return
        self._write({key: float(value) for key, value in metrics.items()}, step)

    def log_images(self, summary: InspectorSummary, step: int) -> None:
        """The utilization heatmap (rows: layers, columns: experts) and the k histogram."""
        import numpy as np

        data: dict[str, Any] = {}
        matrix = utilization_matrix(summary)
        if matrix.size:
            data[f"{self.image_tag}utilization"] = self._wandb.Image(
                heatmap_image(matrix), caption="rows: layers, columns: experts"
            )
        hist = k_histogram(summary)
        if int(hist.sum()):
            edges = np.arange(len(hist) + 1, dtype=np.float64) - 0.5  # bin i holds k = i
            data[f"{self.image_tag}k"] = self._wandb.Histogram(
                np_histogram=(hist.tolist(), edges.tolist())
            )
        if data:
            self._write(data, step)

    def close(self) -> None:
        """The run is the caller's to finish: nothing to do."""


__all__ = [
    "MLFLOW_HINT",
    "TENSORBOARD_HINT",
    "WANDB_HINT",
    "JsonLinesSink",
    "MLflowSink",
    "MetricSink",
    "TensorBoardSink",
    "WandbSink",
    "heatmap_image",
    "k_histogram",
    "k_histogram_record",
    "mlflow_metric_name",
    "utilization_matrix",
]

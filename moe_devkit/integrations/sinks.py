"""Metric sinks: thin adapters that write the inspector's live metrics where training is watched.

A sink takes the scalars of ``RouterInspector.metrics()`` at a step (``log``), optionally the
layer x expert utilization heatmap and the k histogram of a summary (``log_images``), and is
closed at the end (``close``):

- ``TensorBoardSink(log_dir_or_writer)``: ``torch.utils.tensorboard``'s ``SummaryWriter``
  (needs ``pip install "moe-devkit[tensorboard]"``). Scalars with ``add_scalar``, the heatmap
  with ``add_image`` and the k histogram with ``add_histogram_raw``.
- ``JsonLinesSink(path)``: one JSON object per logged step (``step``, ``time``, ``metrics``),
  each line written whole and flushed, so a reader never sees half a line.

Neither imports anything beyond the standard library until it is created.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from moe_devkit.inspect.summary import InspectorSummary

TENSORBOARD_HINT = 'TensorBoardSink needs tensorboard: pip install "moe-devkit[tensorboard]"'


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


__all__ = [
    "TENSORBOARD_HINT",
    "JsonLinesSink",
    "MetricSink",
    "TensorBoardSink",
    "heatmap_image",
    "k_histogram",
    "utilization_matrix",
]

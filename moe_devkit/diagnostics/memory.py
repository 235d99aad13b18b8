"""Memory snapshots and a leak verdict: ``take_snapshot`` during a run, then ``leak_verdict``.

Each labelled snapshot records host memory through tracemalloc (current and peak bytes of
Python allocations), the bytes of live tensors by device and by the source line that made
them (tensor storage is allocated outside tracemalloc's view, so live tensors are found
by a ``TorchFunctionMode`` that notes the line that made each tensor while tracking),
and, where CUDA is present, the CUDA caching allocator's allocated, reserved and peak bytes.

The leak verdict fits the retained bytes (traced Python bytes + live CPU tensor bytes + CUDA
allocated bytes, after ``gc.collect()``) against the step with the Theil-Sen estimator (the
median of pairwise slopes, robust to a few outlying steps) over the steps after warm-up, and
calls it a leak when the slope exceeds a tolerance in bytes per step. It names the source
lines whose retained bytes grew the most between the first and the last measured step.

Snapshots cost a ``gc.collect()`` (of objects made since tracking started; older ones are
frozen) and a tracemalloc snapshot: milliseconds, meant for a debugging run.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from moe_devkit.diagnostics.findings import Finding

_THIS_FILE = os.path.abspath(__file__)
_IGNORED_FILES = (tracemalloc.__file__, _THIS_FILE, "<frozen importlib._bootstrap>")


@dataclass(frozen=True)
class LineGrowth:
    """Bytes retained by one source line, and their change between two snapshots."""

    location: str  # "path/to/file.py:42"
    size: int
    size_diff: int

    def to_dict(self) -> dict[str, Any]:
        return {"location": self.location, "size": self.size, "size_diff": self.size_diff}


@dataclass(frozen=True)
class MemorySnapshot:
    """Memory at one labelled point.

    Attributes:
        label: the caller's label ("Initial", "step 3", ...).
        step: the step number, if the snapshot belongs to a loop (used by the leak verdict).
        host_current: bytes of Python allocations traced by tracemalloc now (excluding the
            tracker's own records).
        host_peak: the peak of those bytes since tracing started.
        tensor_bytes: bytes of live tensor storage by device type ("cpu", "cuda").
        cuda_allocated, cuda_reserved, cuda_peak: the CUDA caching allocator's counters
            (None without CUDA).
        line_bytes: retained bytes by source line (Python objects and tensor storage).
    """

    label: str
    step: int | None
    host_current: int
    host_peak: int
    tensor_bytes: dict[str, int]
    cuda_allocated: int | None
    cuda_reserved: int | None
    cuda_peak: int | None
    line_bytes: dict[str, int] = field(repr=False, compare=False)

    @property
    def retained(self) -> int:
        """Bytes the leak verdict tracks: traced Python + CPU tensors + CUDA allocated."""
        cuda = self.cuda_allocated or 0
        return self.host_current + self.tensor_bytes.get("cpu", 0) + cuda

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "step": self.step,
            "host_current": self.host_current,
            "host_peak": self.host_peak,
            "tensor_bytes": dict(self.tensor_bytes),
            "cuda_allocated": self.cuda_allocated,
            "cuda_reserved": self.cuda_reserved,
            "cuda_peak": self.cuda_peak,
            "retained": self.retained,
        }


@dataclass(frozen=True)
class LeakVerdict:
    """Whether retained memory grows with the step.

    Attributes:
        leaking: slope above tolerance.
        slope_bytes_per_step: Theil-Sen slope of retained bytes over the measured steps.
        tolerance_bytes_per_step: the threshold the slope was compared with.
        steps: number of steps measured (after warm-up).
        warmup: steps skipped before measuring.
        growing_lines: source lines whose retained bytes grew most, largest first.
    """

    leaking: bool
    slope_bytes_per_step: float
    tolerance_bytes_per_step: float
    steps: int
    warmup: int
    growing_lines: tuple[LineGrowth, ...]

    def findings(self) -> tuple[Finding, ...]:
        if not self.leaking:
            return ()
        where = self.growing_lines[0].location if self.growing_lines else None
        message = (
            f"retained memory grows by {self.slope_bytes_per_step:,.0f} bytes per step over "
            f"{self.steps} steps (tolerance {self.tolerance_bytes_per_step:,.0f})"
            + (f"; most growth at {where}" if where else "")
        )
        details = {"lines": [g.to_dict() for g in self.growing_lines]}
        return (Finding("memory-leak", "error", message, location=where, details=details),)

    def to_dict(self) -> dict[str, Any]:
        return {
            "leaking": self.leaking,
            "slope_bytes_per_step": self.slope_bytes_per_step,
            "tolerance_bytes_per_step": self.tolerance_bytes_per_step,
            "steps": self.steps,
            "warmup": self.warmup,
            "growing_lines": [g.to_dict() for g in self.growing_lines],
        }


def theil_sen_slope(x: list[float] | np.ndarray, y: list[float] | np.ndarray) -> float:
    """Median of the pairwise slopes (y_j - y_i) / (x_j - x_i) over i < j with x_i != x_j."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y must be 1-D of one length; got {xs.shape} and {ys.shape}")
    i, j = np.triu_indices(xs.size, k=1)
    dx = xs[j] - xs[i]
    keep = dx != 0
    if not keep.any():
        raise ValueError("theil_sen_slope needs at least two distinct x values")
    return float(np.median((ys[j] - ys[i])[keep] / dx[keep]))


class MemoryTracker:
    """Labelled memory snapshots, line growth, CUDA memory history and a leak verdict.

    Example::

        with MemoryTracker() as tracker:
            tracker.take_snapshot("Initial")
            for step in range(50):
                train_step()
                tracker.take_snapshot(f"step {step}", step=step)
        verdict = tracker.leak_verdict(warmup=5)

    Args:
        track_tensors: remember the source line that made each tensor (a TorchFunctionMode,
            some Python overhead per torch call while the tracker runs) and report live
            tensor storage by line.
        history_path: if set and CUDA is present, record the CUDA allocator's history and
            write a snapshot there on ``stop()`` (open it at https://pytorch.org/memory_viz).
        trace_frames: frames tracemalloc keeps per allocation (1 is enough for lines).
        top_n: how many growing lines to keep.
    """

    def __init__(
        self,
        *,
        track_tensors: bool = True,
        history_path: str | os.PathLike[str] | None = None,
        trace_frames: int = 1,
        top_n: int = 10,
    ) -> None:
        if isinstance(trace_frames, bool) or not isinstance(trace_frames, int) or trace_frames < 1:
            raise ValueError(f"trace_frames must be an int >= 1; got {trace_frames!r}")
        if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
            raise ValueError(f"top_n must be an int >= 0; got {top_n!r}")
        self.track_tensors = track_tensors
        self.history_path = Path(history_path) if history_path is not None else None
        self.trace_frames = trace_frames
        self.top_n = top_n
        self.snapshots: list[MemorySnapshot] = []
        self._started_tracing = False
        self._recording = False
        self.history_file: Path | None = None
        self._origins: _TensorOrigins | None = None

    def start(self) -> MemoryTracker:
        """Starts tracemalloc (if not already tracing) and the CUDA memory history."""
        if not tracemalloc.is_tracing():
            tracemalloc.start(self.trace_frames)
            self._started_tracing = True
        # Objects older than the tracker are frozen: gc.collect() per snapshot then walks
        # only what the tracked code made (milliseconds instead of a full-heap pass).
        gc.freeze()
        if self.track_tensors and self._origins is None:
            self._origins = _TensorOrigins()
            self._origins.__enter__()  # type: ignore[no-untyped-call]
        if self.history_path is not None and torch.cuda.is_available():
            torch.cuda.memory._record_memory_history(max_entries=100_000)
            self._recording = True
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def stop(self) -> None:
        """Writes the CUDA history snapshot (atomically) and stops what ``start`` started."""
        if self._recording and self.history_path is not None:
            self.history_file = _dump_history(self.history_path)
            torch.cuda.memory._record_memory_history(enabled=None)
            self._recording = False
        if self._origins is not None:
            self._origins.__exit__(None, None, None)  # type: ignore[no-untyped-call]
            self._origins = None
        gc.unfreeze()
        if self._started_tracing:
            tracemalloc.stop()
            self._started_tracing = False

    def __enter__(self) -> MemoryTracker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def take_snapshot(self, label: str, *, step: int | None = None) -> MemorySnapshot:
        """Collects garbage and records memory under ``label``.

        Raises:
            RuntimeError: tracemalloc is not tracing (call ``start()`` or use ``with``).
            TypeError: ``label`` is not a string.
        """
        if not isinstance(label, str):
            raise TypeError(f"label must be a str; got {type(label).__name__}")
        if not tracemalloc.is_tracing():
            raise RuntimeError("tracemalloc is not tracing; call tracker.start() or use `with`")
        gc.collect()
        _, peak = tracemalloc.get_traced_memory()
        lines = _python_lines()
        current = sum(lines.values())  # without the tracker's own records
        tensor_bytes: dict[str, int] = {}
        if self._origins is not None:
            tensor_bytes, tensor_lines = self._origins.usage()
            lines.update(tensor_lines)
        cuda = _cuda_counters()
        snapshot = MemorySnapshot(
            label, step, current, peak, tensor_bytes, *cuda, line_bytes=dict(lines)
        )
        self.snapshots.append(snapshot)
        return snapshot

    def growth(self, first: int = 0, last: int = -1) -> tuple[LineGrowth, ...]:
        """The ``top_n`` source lines whose retained bytes grew most between two snapshots."""
        if len(self.snapshots) < 2:
            return ()
        before, after = self.snapshots[first].line_bytes, self.snapshots[last].line_bytes
        diffs = [
            LineGrowth(loc, after.get(loc, 0), after.get(loc, 0) - before.get(loc, 0))
            for loc in set(before) | set(after)
        ]
        growing = sorted((d for d in diffs if d.size_diff > 0), key=lambda d: -d.size_diff)
        return tuple(growing[: self.top_n])

    def leak_verdict(
        self, *, warmup: int = 3, tolerance_bytes_per_step: float = 4096.0
    ) -> LeakVerdict:
        """Fits retained bytes against the step over the step snapshots after ``warmup``.

        Raises:
            ValueError: fewer than 3 step snapshots after warm-up, or a negative tolerance.
        """
        if tolerance_bytes_per_step < 0:
            raise ValueError(f"tolerance must be >= 0; got {tolerance_bytes_per_step}")
        stepped = [(i, s) for i, s in enumerate(self.snapshots) if s.step is not None]
        measured = stepped[warmup:]
        if len(measured) < 3:
            raise ValueError(
                f"the leak verdict needs at least 3 step snapshots after warmup={warmup}; "
                f"got {len(measured)} (take_snapshot(label, step=...) once per step)"
            )
        steps = [float(s.step) for _, s in measured if s.step is not None]
        slope = theil_sen_slope(steps, [float(s.retained) for _, s in measured])
        leaking = slope > tolerance_bytes_per_step
        span = max(steps[-1] - steps[0], 1.0)
        floor = 0.25 * tolerance_bytes_per_step * span
        lines = tuple(
            g for g in self.growth(measured[0][0], measured[-1][0]) if g.size_diff > floor
        )
        return LeakVerdict(
            leaking,
            slope,
            tolerance_bytes_per_step,
            len(measured),
            warmup,
            lines if leaking else (),
        )

    def to_dict(self, verdict: LeakVerdict | None = None) -> dict[str, Any]:
        """The report's ``memory`` section."""
        return {
            "snapshots": [s.to_dict() for s in self.snapshots],
            "growth": [g.to_dict() for g in self.growth()],
            "leak": verdict.to_dict() if verdict is not None else None,
            "cuda_history_file": str(self.history_file) if self.history_file else None,
        }


def find_leak(
    step_fn: Callable[[int], object],
    *,
    steps: int,
    warmup: int = 3,
    tolerance_bytes_per_step: float = 4096.0,
    tracker: MemoryTracker | None = None,
) -> LeakVerdict:
    """Runs ``step_fn(step)`` for ``steps`` steps, a snapshot after each, and judges leaks.

    Raises:
        TypeError: ``step_fn`` is not callable.
        ValueError: ``steps`` is too small for ``warmup`` (see ``leak_verdict``).
    """
    if not callable(step_fn):
        raise TypeError(f"step_fn must be callable; got {type(step_fn).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < warmup + 3:
        raise ValueError(f"steps must be an int >= warmup + 3 = {warmup + 3}; got {steps!r}")
    tracker = tracker if tracker is not None else MemoryTracker()
    with tracker:
        tracker.take_snapshot("Initial")
        for step in range(steps):
            step_fn(step)
            tracker.take_snapshot(f"step {step}", step=step)
        return tracker.leak_verdict(
            warmup=warmup, tolerance_bytes_per_step=tolerance_bytes_per_step
        )


# ----------------------------------------------------------------------------- helpers


def _location(frame: tracemalloc.Frame) -> str:
    return f"{frame.filename}:{frame.lineno}"


def _python_lines() -> Counter[str]:
    lines: Counter[str] = Counter()
    for stat in tracemalloc.take_snapshot().statistics("lineno"):
        frame = stat.traceback[0]
        if frame.filename not in _IGNORED_FILES:
            lines[_location(frame)] += stat.size
    return lines


_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _caller_line() -> str | None:
    """The first frame outside torch and this module: where the user's code made a tensor."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_TORCH_DIR) and filename != _THIS_FILE:
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


class _TensorOrigins(TorchFunctionMode):
    """Remembers the source line that made each tensor created while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.origins: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and not isinstance(out, torch.nn.Parameter):
            line = _caller_line()
            if line is not None:
                self.origins[out] = line
        return out

    def usage(self) -> tuple[dict[str, int], Counter[str]]:
        """Live storage bytes of the remembered tensors, by device type and by line."""
        by_device: Counter[str] = Counter()
        by_line: Counter[str] = Counter()
        seen: set[tuple[str, int]] = set()
        for tensor, line in list(self.origins.items()):  # type: ignore[no-untyped-call]
            try:
                storage = tensor.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse or wrapper tensors
                continue
            key = (tensor.device.type, storage.data_ptr())
            if key in seen or storage.data_ptr() == 0:
                continue
            seen.add(key)
            by_device[tensor.device.type] += storage.nbytes()
            by_line[line] += storage.nbytes()
        return dict(by_device), by_line


def _cuda_counters() -> tuple[int | None, int | None, int | None]:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return None, None, None
    return (
        torch.cuda.memory_allocated(),
        torch.cuda.memory_reserved(),
        torch.cuda.max_memory_allocated(),
    )


def _dump_history(path: Path) -> Path:
    """Writes the CUDA memory-history pickle beside ``path`` and renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.cuda.memory._dump_snapshot(tmp)  # type: ignore[no-untyped-call]
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

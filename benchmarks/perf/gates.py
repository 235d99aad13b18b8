"""Deterministic performance gates: what can be counted instead of timed.

Timing on a shared machine is noisy; operator counts, FLOPs, CUDA host synchronisations
and memory growth per step are not, so a change in them is a regression (or an intended
change, accepted with ``--update-baseline``) without any statistics.

Both worker processes count their gates with this module, the working tree's (so both sides
count alike); it imports nothing from moe_devkit, since the baseline worker imports an older
revision of the package.
"""

from __future__ import annotations

import gc
import math
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from perf.describe import describe_value


class _OpCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts every aten operator dispatched (after autograd, before the kernels)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> Counter[str]:
    """aten operator name -> calls in one run of ``fn``."""
    counter = _OpCounter()
    with counter:
        fn()
    return counter.counts


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one run of ``fn`` (matmuls and convolutions, ``FlopCounterMode``)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def count_host_syncs(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """CUDA host synchronisations in one run of ``fn``; None on a non-CUDA device.

    Uses ``torch.cuda.set_sync_debug_mode("warn")``, which warns on each synchronising
    call (``.item()``, ``.tolist()``, ``nonzero``, a blocking copy to the host, ...).
    """
    if torch.device(device).type != "cuda":
        return None
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def _live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every tensor the garbage collector sees."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor):  # type(): no attribute access on obj
            continue
        try:
            if obj.device.type == "cpu":
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, ReferenceError):  # meta/sparse tensors, dead weakrefs
            continue
    return sum(seen.values())


def memory_growth(fn: Callable[[], object], device: torch.device | str, steps: int = 5) -> float:
    """Bytes of memory still held per step after ``steps`` runs of ``fn`` (0 when none leaks).

    CUDA: ``torch.cuda.memory_allocated``. CPU: the storages of live tensors (a leak keeps
    tensors referenced, e.g. an inspector that appends every routing to a list).
    """
    dev = torch.device(device)
    fn()  # first-call caches are not growth
    gc.collect()
    before = _allocated(dev)
    for _ in range(steps):
        fn()
    gc.collect()
    return (_allocated(dev) - before) / steps


def _allocated(dev: torch.device) -> int:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return int(torch.cuda.memory_allocated(dev))
    return _live_tensor_bytes()


@dataclass(frozen=True, kw_only=True)
class Gates:
    """The deterministic counts of one benchmark case.

    Attributes:
        ops: aten operators dispatched per call.
        flops: FLOPs per call.
        host_syncs: CUDA host synchronisations per call (None on CPU).
        memory_growth: bytes still held per call after several calls.
        top_ops: the most frequent operators and their counts.
    """

    ops: int
    flops: int
    host_syncs: int | None
    memory_growth: float
    top_ops: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Gates:
        """The gates of ``to_dict`` (a stored baseline's, a worker's reply), checked.

        Raises:
            ValueError: a field is missing, unknown or of the wrong kind; the message starts
                with the field's name, e.g. ``ops: expected a non-negative integer; got -1``.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"expected an object of gates; got {describe_value(data)}")
        fields = {"ops", "flops", "host_syncs", "memory_growth", "top_ops"}
        missing = sorted(fields - {"top_ops"} - set(data))
        unknown = sorted(set(data) - fields)
        if missing or unknown:
            what = f"missing {missing}" if missing else f"unknown {unknown}"
            raise ValueError(f"expected the fields {sorted(fields)}; {what}")
        top_ops = data.get("top_ops", {})
        if not isinstance(top_ops, Mapping):
            raise ValueError(
                f"top_ops: expected an object of op -> count; got {describe_value(top_ops)}"
            )
        host_syncs = data["host_syncs"]
        return cls(
            ops=_count("ops", data["ops"]),
            flops=_count("flops", data["flops"]),
            host_syncs=None if host_syncs is None else _count("host_syncs", host_syncs),
            memory_growth=_finite("memory_growth", data["memory_growth"]),
            top_ops={str(op): _count(f"top_ops[{op!r}]", n) for op, n in top_ops.items()},
        )


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected a non-negative integer; got {describe_value(value)}")
    return value


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number; got {describe_value(value)}")
    return float(value)


def measure_gates(fn: Callable[[], object], device: torch.device | str) -> Gates:
    """Counts ops, FLOPs, host syncs and memory growth of ``fn`` (warm: run once first)."""
    fn()
    ops = count_ops(fn)
    return Gates(
        ops=sum(ops.values()),
        flops=count_flops(fn),
        host_syncs=count_host_syncs(fn, device),
        memory_growth=memory_growth(fn, device),
        top_ops=dict(ops.most_common(8)),
    )


@dataclass(frozen=True, kw_only=True)
class GateResult:
    """One gate compared between baseline and candidate.

    Attributes:
        gate: "ops", "flops", "host_syncs" or "memory_growth".
        baseline, candidate: the values (None where not measured).
        regression: the candidate is worse.
    """

    gate: str
    baseline: float | None
    candidate: float | None
    regression: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MEMORY_SLACK_BYTES = 4096.0
"""Growth per call tolerated beyond the baseline's (allocator and cache bookkeeping)."""


def compare_gates(baseline: Gates, candidate: Gates) -> tuple[GateResult, ...]:
    """Each gate of ``candidate`` against ``baseline``; any increase is a regression."""
    results = []
    for gate in ("ops", "flops", "host_syncs"):
        b, c = getattr(baseline, gate), getattr(candidate, gate)
        worse = b is not None and c is not None and c > b
        results.append(GateResult(gate=gate, baseline=b, candidate=c, regression=worse))
    b_mem, c_mem = baseline.memory_growth, candidate.memory_growth
    grew = c_mem > max(b_mem, 0.0) + MEMORY_SLACK_BYTES
    results.append(
        GateResult(gate="memory_growth", baseline=b_mem, candidate=c_mem, regression=grew)
    )
    return tuple(results)

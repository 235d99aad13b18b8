"""NaN/Inf detection: a cheap one-tensor check and a guard that watches every module of a model.

``check_numerical_stability`` checks one tensor for NaN and Inf and returns a ``Finding``
(nothing is printed): one fused reduction (the max-abs norm, which is NaN when any
element is NaN) decides; counts and positions are computed only when something is wrong.

``NumericsGuard`` hooks a model: forward hooks see every module's outputs (tensors, tuples,
NamedTuples, dicts and dataclasses such as ``RoutingDecision``, so the router's complexity,
logits and weights are checked along with every other module's outputs), and tensor hooks see
the gradient each module hands back to its inputs during backward. It names the first module,
by qualified name, whose output or gradient became non-finite, with the step and the tensor.

Synchronisation: in the default mode nothing is read on the host between checks. Watched
tensors are batched: each flush (the end of a training step's backward pass, or of a
forward without backward, and every 1 GiB or 256 tensors in between) computes their max-abs
with one multi-tensor reduction per dtype and writes it into this step's row of a ring of 64
device rows. Every 64 steps, and at each check, the ring is folded into device state that
keeps the row of the first bad step. ``check()`` (or every ``check_every`` steps) reads that
state with one device-to-host transfer. Memory: a training step's watched outputs are held
until its backward pass ends (at most 1 GiB of them; most are saved for backward anyway).
``strict=True`` reads every tensor's flag at once and raises ``NonFiniteError`` at the first
offending module: one host synchronisation per watched tensor, so use it to pin a failure
down, not for training throughput.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from moe_devkit.diagnostics.findings import Finding

logger = logging.getLogger(__name__)

ROOT = "<model>"
"""Location used for the watched model itself (its qualified name is the empty string)."""

_INF = float("inf")
_MAX_DEPTH = 4
_MAX_ROW = 1 << 16
_MAX_PENDING_BYTES = 1 << 30  # tensors kept for a batched norm before a flush


# ----------------------------------------------------------------------------- one tensor


def check_numerical_stability(
    tensor: object, name: str = "tensor", *, threshold: float = 1e6, max_positions: int = 5
) -> Finding | None:
    """Checks one tensor for NaN, Inf and values whose magnitude exceeds ``threshold``.

    Costs one reduction and one host read when the tensor is clean; counts and the first
    ``max_positions`` positions are computed only when it is not.

    Args:
        tensor: any tensor; integer and boolean tensors are always finite.
        name: what to call the tensor in the finding.
        threshold: magnitude above which finite values are reported (a warning).
        max_positions: how many offending positions to list.

    Returns:
        None when the tensor is clean; otherwise a Finding, code "nonfinite-values"
        (severity error) or "large-values" (warning), with counts, max_abs and positions.

    Raises:
        TypeError: ``tensor`` is not a torch.Tensor.
        ValueError: ``threshold`` is not a positive number or ``max_positions`` < 0.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor; got {type(tensor).__name__}")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not threshold > 0:
        raise ValueError(f"threshold must be a positive number; got threshold={threshold!r}")
    if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 0:
        raise ValueError(f"max_positions must be an int >= 0; got max_positions={max_positions!r}")
    values = _as_real(tensor.detach())
    if values is None or values.numel() == 0:
        return None
    max_abs = float(torch.linalg.vector_norm(values, _INF))  # NaN if any element is NaN
    if math.isfinite(max_abs) and max_abs <= threshold:
        return None
    return _describe_problem(values, name, threshold, max_positions)


def _as_real(tensor: torch.Tensor) -> torch.Tensor | None:
    """The floating-point values to check, or None for integer/boolean tensors."""
    if tensor.is_complex():
        return torch.view_as_real(tensor)
    return tensor if tensor.is_floating_point() else None


def _describe_problem(
    values: torch.Tensor, name: str, threshold: float, max_positions: int
) -> Finding:
    nan = torch.isnan(values)
    inf = torch.isinf(values)
    finite_abs = torch.where(nan | inf, 0.0, values.abs())
    counts = torch.stack([nan.sum(), inf.sum(), (finite_abs > threshold).sum()]).tolist()
    nan_count, inf_count, large_count = (int(c) for c in counts)
    details: dict[str, Any] = {
        "shape": list(values.shape),
        "dtype": str(values.dtype).removeprefix("torch."),
        "nan_count": nan_count,
        "inf_count": inf_count,
        "large_count": large_count,
        "threshold": threshold,
        "max_abs_finite": float(finite_abs.max()),
    }
    if nan_count or inf_count:
        details["positions"] = _positions(nan | inf, max_positions)
        message = f"{name} holds {nan_count} NaN and {inf_count} Inf value(s)"
        return Finding("nonfinite-values", "error", message, location=name, details=details)
    details["positions"] = _positions(finite_abs > threshold, max_positions)
    message = (
        f"{name} holds {large_count} value(s) with magnitude above {threshold:g} "
        f"(max {details['max_abs_finite']:.4g})"
    )
    return Finding("large-values", "warning", message, location=name, details=details)


def _positions(mask: torch.Tensor, limit: int) -> list[list[int]]:
    """The first ``limit`` indices where ``mask`` is true, in row-major order."""
    if limit == 0:
        return []
    flat = torch.nonzero(mask.reshape(-1)).reshape(-1)[:limit]
    if mask.dim() == 0:
        return [[] for _ in flat.tolist()]
    coords = torch.stack(torch.unravel_index(flat, mask.shape), dim=-1)
    return [list(map(int, row)) for row in coords.tolist()]


# ----------------------------------------------------------------------------- the guard


class NonFiniteError(ArithmeticError):
    """Raised by a strict NumericsGuard at the first non-finite output or gradient."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.message)
        self.finding = finding


class WatchSite(NamedTuple):
    """One watched tensor of a step: which module, forward or backward, and which tensor.

    A NamedTuple: sites are built and hashed every step, and tuples do both in C.
    """

    module: str
    phase: str  # "forward" or "backward"
    tensor: str  # e.g. "output.routing.router_logits", "gradient of input[0]"


def iter_tensors(value: object, prefix: str, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (description, tensor) for the floating-point tensors nested in ``value``.

    Follows tuples, lists, NamedTuples, dicts and dataclass instances (``RoutingDecision``).
    """
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield prefix, value
        return
    if depth >= _MAX_DEPTH:
        return
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        for field_name, item in zip(value._fields, value, strict=True):
            yield from iter_tensors(item, f"{prefix}.{field_name}", depth + 1)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from iter_tensors(item, f"{prefix}[{i}]", depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from iter_tensors(item, f"{prefix}[{key!r}]", depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for name in _field_names(type(value)):
            yield from iter_tensors(getattr(value, name), f"{prefix}.{name}", depth + 1)


@functools.lru_cache(maxsize=256)
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


class _DeviceState:
    """Per-device flags: a ring of step rows (max-abs per watched tensor) and the first bad one.

    Each step writes its row in the ring; nothing else runs per step. Every ``RING`` steps,
    and at each check, the filled rows are folded at once (a dozen launches) into the row,
    step and signature of the first step that saw a non-finite value; then the ring is
    zeroed, so a row's unused tail always reads as finite.
    """

    RING = 64

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.device = device
        self.rows = torch.zeros(self.RING, capacity, dtype=torch.float32, device=device)
        self.first_row = torch.zeros(capacity, dtype=torch.float32, device=device)
        # found, step of the first bad row, signature id of that step
        self.meta = torch.zeros(3, dtype=torch.float64, device=device)
        self.slot = 0
        self.labels: list[tuple[int, int]] = []  # (step, signature id) of each filled slot

    @property
    def capacity(self) -> int:
        return self.rows.shape[1]

    def grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        if extra > 0:
            self.rows = torch.cat([self.rows, self.rows.new_zeros(self.RING, extra)], dim=1)
            self.first_row = torch.cat([self.first_row, self.first_row.new_zeros(extra)])

    def end_row(self, step: int, signature: int) -> None:
        """Closes the current slot; folds the ring when it is full."""
        self.labels.append((step, signature))
        self.slot += 1
        if self.slot == self.RING:
            self.fold()

    def fold(self) -> None:
        """Keeps the first filled row with a non-finite value, if none is kept yet; no sync."""
        if not self.labels:
            return
        filled = self.rows[: len(self.labels)]
        bad = filled.isfinite().all(dim=1).logical_not()  # [slots]
        first = bad.byte().argmax()  # the first bad slot (0 when none is bad)
        host = torch.tensor(self.labels, dtype=torch.float64)  # [slots, 2]
        labels = _to_device(host, self.device)
        take = bad.any() & (self.meta[0] == 0)
        # index_select, not filled[first]: a 0-d index tensor is read on the host
        first = first.reshape(1)
        self.first_row = torch.where(take, filled.index_select(0, first)[0], self.first_row)
        update = torch.cat([self.meta.new_ones(1), labels.index_select(0, first)[0]])
        self.meta = torch.where(take, update, self.meta)
        self.rows.zero_()
        self.slot = 0
        self.labels = []


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-device copy that does not synchronise (pinned memory, non-blocking)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class NumericsGuard:
    """Watches every module of a model for non-finite outputs and gradients.

    A step is one forward of the watched model and the backward that follows it; the step
    counter advances at each forward of the model.

    Example::

        guard = NumericsGuard(model, check_every=100)
        with guard:
            for batch in data:
                loss = model(batch).hidden_states.square().mean()
                loss.backward()
        findings = guard.check()

    Args:
        model: the module to watch (all of its submodules are watched).
        check_every: read the flags every N steps (one host synchronisation each); None
            reads them only when ``check()`` is called.
        strict: raise ``NonFiniteError`` at the first offending tensor (one host
            synchronisation per watched tensor).
        gradients: also watch the gradients handed back to each module's inputs.

    Raises:
        TypeError: ``model`` is not an nn.Module or an option has the wrong type.
        ValueError: ``check_every`` < 1.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        check_every: int | None = None,
        strict: bool = False,
        gradients: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if check_every is not None and (
            isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1
        ):
            raise ValueError(f"check_every must be None or an int >= 1; got {check_every!r}")
        self.model = model
        self.check_every = check_every
        self.strict = bool(strict)
        self.gradients = bool(gradients)
        self.findings: list[Finding] = []
        self._names = {id(m): (name or ROOT) for name, m in model.named_modules()}
        self._handles: list[RemovableHandle] = []
        self._state: _DeviceState | None = None
        self._step = 0
        self._checks = 0
        self._seen = 0  # watched tensors this step (execution order)
        self._row_sites: list[WatchSite] = []  # this step's row, in row order
        self._row_order: list[int] = []  # execution order of each row position
        self._pending: list[tuple[int, WatchSite, torch.Tensor]] = []
        self._pending_bytes = 0
        self._flush_queued = False  # a flush is queued for the end of this backward pass
        self._claims: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}
        self._watched: dict[int, weakref.ref[torch.Tensor]] = {}  # this step's outputs
        # module calls of this forward not walked yet: (name, args, kwargs, output, claim)
        self._log: list[tuple[str, tuple[Any, ...], dict[str, Any], Any, bool]] = []
        self._signatures: dict[tuple[tuple[WatchSite, ...], tuple[int, ...]], int] = {}

    # -- attaching

    def attach(self) -> NumericsGuard:
        """Registers the hooks; returns self. Attaching twice is a no-op."""
        if self._handles:
            return self
        root = self.model
        self._handles.append(root.register_forward_pre_hook(self._on_root_pre, with_kwargs=True))
        for module in root.modules():
            self._handles.append(module.register_forward_hook(self._on_forward, with_kwargs=True))
        self._handles.append(root.register_forward_hook(self._on_root_post))
        return self

    def detach(self) -> None:
        """Removes the hooks (the flags gathered so far stay readable by ``check()``)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> NumericsGuard:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def step(self) -> int:
        """Number of forwards of the watched model seen so far (the current step, 1-based)."""
        return self._step

    # -- hooks

    def _on_root_pre(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._end_step()
        if self.check_every is not None and self._step and self._step % self.check_every == 0:
            self.check()
        self._step += 1
        for desc, tensor in iter_tensors((args, kwargs), "input"):
            self._watch(ROOT, "forward", _input_desc(desc), tensor)

    def _on_forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        name = self._names.get(id(module), type(module).__name__)
        claim = self.gradients and torch.is_grad_enabled()
        if self.strict:  # check now, to raise at this very module
            self._record_module(name, args, kwargs, output, claim)
            return
        # Only a note here: the walk over outputs and inputs runs at the end of the model's
        # forward, when the GPU is busy with the last layers' work, not in the middle of a
        # stretch of small kernels that the CPU has to launch.
        self._log.append((name, args, kwargs, output, claim))
        if len(self._log) >= 256:
            self._process_log()

    def _process_log(self) -> None:
        log, self._log = self._log, []
        for entry in log:
            self._record_module(*entry)

    def _record_module(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, claim: bool
    ) -> None:
        """Watches a module call's outputs and hooks its inputs' gradients (``claim``)."""
        if isinstance(output, torch.Tensor):  # the common case, without the generic walk
            if output.is_floating_point():
                self._watch(name, "forward", "output", output)
        else:
            for desc, tensor in iter_tensors(output, "output"):
                self._watch(name, "forward", desc, tensor)
        if claim:
            if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
                for i, tensor in enumerate(args):
                    if tensor.requires_grad:
                        self._claim(name, f"input[{i}]", tensor)
                return
            for desc, tensor in iter_tensors((args, kwargs), "input"):
                if tensor.requires_grad:
                    self._claim(name, _input_desc(desc), tensor)

    def _on_root_post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._process_log()
        claimed = False
        if self.gradients and torch.is_grad_enabled():
            for desc, tensor in iter_tensors(output, "output"):
                if tensor.requires_grad:
                    self._claim(ROOT, f"{desc} (from the loss)", tensor)
                    claimed = True
        if not claimed:  # no backward to wait for: read the outputs now
            self._flush()
        # else the outputs wait (up to _MAX_PENDING_BYTES) for the flush at the end of the
        # backward pass: one flush per training step, not two.

    # -- recording

    def _watch(self, module: str, phase: str, desc: str, tensor: torch.Tensor) -> None:
        # A tensor already watched this step (a container's output is often its last
        # child's, and the layer's output holds the router's decision) is read once, under
        # the first (innermost) module that returned it.
        key = id(tensor)
        known = self._watched.get(key)
        if known is not None and known() is tensor:
            return
        self._watched[key] = weakref.ref(tensor)
        site = WatchSite(module, phase, desc)
        if self.strict:
            self._strict_check(site, tensor)
            return
        self._enqueue(site, tensor.detach())

    def _enqueue(self, site: WatchSite, tensor: torch.Tensor) -> None:
        if self._seen >= _MAX_ROW:  # a step that never ends: close its row and go on
            self._end_step()
        self._pending.append((self._seen, site, tensor))
        self._seen += 1
        self._pending_bytes += tensor.numel() * tensor.element_size()
        if len(self._pending) >= 256 or self._pending_bytes >= _MAX_PENDING_BYTES:
            self._flush()

    def _claim(self, module: str, desc: str, tensor: torch.Tensor) -> None:
        """Hooks the gradient of ``tensor`` once; the first (innermost) module claims it."""
        key = id(tensor)
        claim = self._claims.get(key)
        if claim is not None and claim[0]() is tensor:
            return
        self._claims[key] = (weakref.ref(tensor), module)
        site = WatchSite(module, "backward", f"gradient of {desc}")
        tensor.register_hook(self._gradient_hook(site))  # type: ignore[no-untyped-call]

    def _gradient_hook(self, site: WatchSite) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if self.strict:
                self._strict_check(site, grad)
                return
            # Batched like the forward outputs: the first gradient of a backward pass queues
            # one flush for the end of that pass (gradients are held until then, or until
            # _MAX_PENDING_BYTES), not two kernels per gradient.
            if not self._flush_queued:
                self._flush_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
            self._enqueue(site, grad.detach())

        return hook

    def _backward_done(self) -> None:
        self._flush_queued = False
        self._flush()

    def _strict_check(self, site: WatchSite, tensor: torch.Tensor) -> None:
        if not bool(torch.isfinite(tensor.detach()).all()):  # host sync: strict mode only
            finding = self._finding(site, self._step, [])
            self.findings.append(finding)
            raise NonFiniteError(finding)

    def _row(self, size: int, device: torch.device) -> torch.Tensor:
        """This step's slot in the ring, grown to hold at least ``size`` positions."""
        if self._state is None:
            self._state = _DeviceState(device, max(64, size))
        elif size > self._state.capacity:
            self._state.grow(min(max(2 * self._state.capacity, size), _MAX_ROW))
        return self._state.rows[self._state.slot]

    def _flush(self) -> None:
        """Writes the max-abs of the pending tensors into this step's row.

        One multi-tensor reduction per (device, dtype), stacked and written into the
        float32 row: three or four launches per group, however many tensors are pending.
        """
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, (_, _, tensor) in enumerate(pending):
            groups.setdefault((tensor.device, tensor.dtype), []).append(i)
        start = len(self._row_sites)
        row = self._row(start + len(pending), pending[0][2].device)
        for members in groups.values():
            end = start + len(members)
            # (a model split over devices: flags live on one; the copy converts and moves)
            _write_max_abs([pending[i][2] for i in members], row[start:end])
            start = end
            self._row_sites.extend(pending[i][1] for i in members)
            self._row_order.extend(pending[i][0] for i in members)

    def _end_step(self) -> None:
        """Closes this step's row in the ring; no host synchronisation."""
        self._process_log()
        self._flush()
        self._flush_queued = False  # (a backward pass that raised never ran its callback)
        self._claims.clear()
        self._watched.clear()
        self._seen = 0
        if self._state is None or not self._row_sites:
            self._row_sites, self._row_order = [], []
            return
        signature = (tuple(self._row_sites), tuple(self._row_order))
        sig_id = self._signatures.setdefault(signature, len(self._signatures))
        self._state.end_row(self._step, sig_id)
        self._row_sites, self._row_order = [], []

    # -- reading

    def check(self) -> list[Finding]:
        """Reads the flags (one device-to-host transfer) and returns new findings.

        Returns the first non-finite output or gradient seen since the previous check (an
        empty list when there is none), and appends it to ``self.findings``. The flags are
        reset, so a later check reports a later failure.
        """
        self._checks += 1
        self._end_step()
        state = self._state
        if state is None:
            return []
        state.fold()
        packed = torch.cat([state.meta, state.first_row.double()]).cpu().tolist()
        found, step, sig_id = bool(packed[0]), int(packed[1]), int(packed[2])
        if not found:
            return []
        state.meta.zero_()
        sites, order = next(sig for sig, i in self._signatures.items() if i == sig_id)
        values = packed[3 : 3 + len(sites)]
        bad = sorted((order[i], i) for i, v in enumerate(values) if not math.isfinite(v))
        others = [f"{sites[i].module}: {sites[i].tensor}" for _, i in bad[1:11]]
        finding = self._finding(sites[bad[0][1]], step, others)
        self.findings.append(finding)
        logger.warning("%s", finding.message)
        return [finding]

    def _finding(self, site: WatchSite, step: int, others: list[str]) -> Finding:
        what = "gradient" if site.phase == "backward" else "output"
        message = f"first non-finite {what} at step {step}: module {site.module!r}, {site.tensor}"
        return Finding(
            f"nonfinite-{what}",
            "error",
            message,
            location=site.module,
            step=step,
            details={"phase": site.phase, "tensor": site.tensor, "also_nonfinite": others},
        )

    def to_dict(self) -> dict[str, Any]:
        """The report's ``numerics`` section."""
        return {
            "steps": self._step,
            "checks": self._checks,
            "strict": self.strict,
            "check_every": self.check_every,
            "watched_modules": len(self._names),
            "gradients": self.gradients,
            "first_nonfinite": [f.to_dict() for f in self.findings],
        }


def _write_max_abs(tensors: list[torch.Tensor], out: torch.Tensor) -> None:
    """out[i] = max |tensors[i]| (NaN if it holds a NaN), for same-dtype, same-device tensors.

    One multi-tensor reduction in the tensors' own dtype (its fast path; asking for a float32
    result makes CUDA fall back to one reduction per tensor), stacked, then written into the
    float32 ``out`` with one conversion. Max-abs is exact in any float dtype, and a low
    precision dtype keeps NaN and Inf. An empty tensor (an expert that received no rows)
    has max-abs 0.
    """
    if all(t.numel() for t in tensors):
        norms = list(torch._foreach_norm(tensors, _INF))
    else:
        nonempty = [t for t in tensors if t.numel()]
        filled = iter(torch._foreach_norm(nonempty, _INF) if nonempty else ())
        norms = [next(filled) if t.numel() else t.new_zeros(()) for t in tensors]
    if norms[0].dtype == out.dtype and norms[0].device == out.device:
        torch.stack(norms, out=out)
    else:
        out.copy_(torch.stack(norms), non_blocking=True)


def _input_desc(desc: str) -> str:
    """'input[0][0]' -> 'input[0]', "input[1]['x']" -> "input['x']": args then kwargs."""
    if desc.startswith("input[0]"):
        return "input" + desc[len("input[0]") :]
    if desc.startswith("input[1]"):
        return "input" + desc[len("input[1]") :]
    return desc

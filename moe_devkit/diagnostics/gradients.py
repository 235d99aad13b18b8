"""Gradient statistics after backward, computed with fused ops and one device-to-host transfer.

Reading five statistics per parameter with one ``.item()`` each costs, on a GPU, five host
synchronisations per parameter. Instead, on a GPU, the gradients of each (device, dtype)
group are concatenated once and four segmented reductions (float64 sums and sums of squares,
maxima, minima) give every parameter's statistics in a fixed handful of launches; on the
CPU, where launches cost nothing, each tensor gets a norm, a sum and a min/max pass. Every
statistic of every parameter is stacked into one [P, 5] float64 tensor read with a single
transfer.

Memory (GPU): gradients are concatenated in runs of at most 2**26 elements; a run and its
float64 copies take about 1.3 GB (float32 gradients) for the duration of the call.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from moe_devkit.diagnostics.findings import Finding

DEFAULT_GROUPS: tuple[tuple[str, str], ...] = (
    ("complexity_estimator", r"(^|\.)complexity_estimator\."),
    ("router", r"(^|\.)(router|router_network|gate)\."),
    ("experts", r"(^|\.)experts?\."),
)
"""(group, regex) pairs tried in order on parameter names; a name matching none is "rest"."""

_STATS = ("norm", "mean", "std", "max", "min")
_CHUNK_ELEMENTS = 1 << 26  # GPU: gradients concatenated per call (bounds the temporary memory)


class ParameterGradient(NamedTuple):
    """Statistics of one parameter's gradient (float64 on the host).

    A NamedTuple rather than a frozen dataclass: a report builds one per parameter, and
    tuple construction is several times cheaper.
    """

    name: str
    group: str
    numel: int
    norm: float
    mean: float
    std: float
    max: float
    min: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group": self.group,
            "numel": self.numel,
            **{s: getattr(self, s) for s in _STATS},
        }


@dataclass(frozen=True)
class GradientReport:
    """Gradient statistics of a model after one backward.

    Attributes:
        total_norm: L2 norm over all gradients (as ``clip_grad_norm_`` computes it).
        parameters: per-parameter statistics, in ``named_parameters`` order.
        top: the ``top_n`` parameters by gradient norm, largest first.
        groups: per MoE part: parameters, elements and the L2 norm of the part.
        missing: parameters that require grad but have no gradient.
        findings: non-finite, exploding and vanishing gradients, missing gradients.
    """

    total_norm: float
    parameters: tuple[ParameterGradient, ...]
    top: tuple[ParameterGradient, ...]
    groups: dict[str, dict[str, float]]
    missing: tuple[str, ...]
    thresholds: dict[str, float]
    findings: tuple[Finding, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """The report's ``gradients`` section."""
        return {
            "total_norm": self.total_norm,
            "thresholds": self.thresholds,
            "groups": self.groups,
            "top": [p.name for p in self.top],
            "missing": list(self.missing),
            "parameters": [p.to_dict() for p in self.parameters],
        }


@dataclass(frozen=True)
class PendingGradientStats:
    """Statistics still on the device; ``resolve()`` reads them with one transfer.

    ``raw`` holds float64[P, 5] rows (norm, mean, centred sum of squares, max, min),
    grouped by (device, dtype);
    ``order[k]`` is the position in ``names`` of row k.
    """

    names: tuple[str, ...]
    numels: tuple[int, ...]
    raw: torch.Tensor
    order: tuple[int, ...]
    missing: tuple[str, ...]

    def resolve(
        self,
        *,
        top_n: int = 5,
        vanishing: float = 1e-8,
        exploding: float = 1e3,
        groups: Iterable[tuple[str, str]] = DEFAULT_GROUPS,
    ) -> GradientReport:
        """Reads the statistics (one device-to-host transfer) and builds the report."""
        rows: list[list[float]] = [[] for _ in self.order]
        for k, row in zip(self.order, self.raw.cpu().tolist(), strict=True):
            rows[k] = row
        labels = _assign_groups(self.names, tuple((str(g), str(p)) for g, p in groups))
        params = tuple(map(_parameter, self.names, labels, self.numels, rows))
        total = math.sqrt(sum(p.norm**2 for p in params))
        top = tuple(sorted(params, key=_sort_key)[:top_n])
        thresholds = {"vanishing": vanishing, "exploding": exploding}
        findings = _findings(params, total, self.missing, thresholds)
        return GradientReport(
            total, params, top, _group_totals(params), self.missing, thresholds, findings
        )


def _parameter(name: str, group: str, numel: int, row: list[float]) -> ParameterGradient:
    norm, mean, centred_sq, high, low = row
    std = math.sqrt(centred_sq / (numel - 1)) if numel > 1 else math.nan  # unbiased, as .std()
    return ParameterGradient(name, group, numel, norm, mean, std, high, low)


def _sort_key(p: ParameterGradient) -> float:
    return -p.norm if not math.isnan(p.norm) else -math.inf


def collect_gradient_stats(
    parameters: nn.Module | Iterable[tuple[str, nn.Parameter]],
) -> PendingGradientStats:
    """Computes every parameter's gradient statistics on its device, without host reads.

    Args:
        parameters: a module, or (name, parameter) pairs such as ``named_parameters()``.

    Returns:
        PendingGradientStats; call ``resolve()`` for the report.

    Raises:
        TypeError: not a module or an iterable of (name, parameter) pairs.
        ValueError: no parameters, or no parameter has a gradient (call backward first).
    """
    named = _named(parameters)
    with_grad = [(n, p.grad) for n, p in named if p.grad is not None]
    missing = tuple(n for n, p in named if p.grad is None and p.requires_grad)
    if not with_grad:
        raise ValueError(
            f"no parameter has a gradient ({len(named)} parameter(s)); "
            "call loss.backward() before collecting gradient statistics"
        )
    grads = [g for _, g in with_grad]  # read under no_grad below: no detach per tensor
    if any(g.is_sparse for g in grads):
        raise ValueError("sparse gradients are not supported; densify them first")
    groups = _groups(grads)
    target = grads[0].device
    with torch.no_grad():
        parts = [_group_stats([grads[i] for i in idx], device) for (device, _), idx in groups]
    raw = torch.cat([p.to(target, non_blocking=True) for p in parts])  # [P, 5] group order
    order = tuple(i for _, idx in groups for i in idx)
    names = tuple(name for name, _ in with_grad)
    numels = tuple(g.numel() for g in grads)
    return PendingGradientStats(names, numels, raw, order, missing)


def gradient_statistics(
    parameters: nn.Module | Iterable[tuple[str, nn.Parameter]],
    *,
    top_n: int = 5,
    vanishing: float = 1e-8,
    exploding: float = 1e3,
    groups: Iterable[tuple[str, str]] = DEFAULT_GROUPS,
) -> GradientReport:
    """Gradient statistics after backward: total norm, per-parameter stats, groups, flags.

    Args:
        parameters: a module, or (name, parameter) pairs.
        top_n: how many parameters to list by largest gradient norm.
        vanishing: a gradient norm below this is flagged (warning "vanishing-gradient").
        exploding: a gradient norm above this is flagged (warning "exploding-gradient").
        groups: (group, regex) pairs matched in order against parameter names.

    Raises:
        TypeError, ValueError: see ``collect_gradient_stats``.
    """
    return collect_gradient_stats(parameters).resolve(
        top_n=top_n, vanishing=vanishing, exploding=exploding, groups=groups
    )


# ----------------------------------------------------------------------------- helpers


def _named(parameters: object) -> list[tuple[str, torch.Tensor]]:
    if isinstance(parameters, nn.Module):
        named: list[tuple[str, torch.Tensor]] = list(parameters.named_parameters())
        if not named:
            raise ValueError(
                f"the model has no parameters ({type(parameters).__name__}); "
                "gradient statistics need at least one"
            )
        return named
    if isinstance(parameters, torch.Tensor) or not isinstance(parameters, Iterable):
        raise TypeError(
            "parameters must be an nn.Module or (name, parameter) pairs such as "
            f"model.named_parameters(); got {type(parameters).__name__}"
        )
    named = list(parameters)  # checked item by item below
    for item in named:
        if not (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor)
        ):
            raise TypeError(f"expected (name, parameter) pairs; got an item {item!r:.80}")
    if not named:
        raise ValueError("no parameters given; pass a model or model.named_parameters()")
    return named


def _groups(grads: list[torch.Tensor]) -> list[tuple[tuple[torch.device, torch.dtype], list[int]]]:
    by_key: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, g in enumerate(grads):
        by_key.setdefault((g.device, g.dtype), []).append(i)
    return list(by_key.items())


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-device copy that does not synchronise (pinned memory, non-blocking)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _group_stats(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """float64[P, 5]: norm, mean, centred sum of squares, max, min of same-device gradients.

    On a GPU: one concatenation and four segmented reductions (sum, sum of squares, max, min
    per parameter) over it, whatever P is: a few launches and no host read. ``unsafe=True``
    skips ``segment_reduce``'s argument checks, which read the lengths on the host; the
    lengths are built here from the tensors' sizes, so the checks have nothing to catch.
    Each parameter is its own segment: a NaN or Inf in one gradient leaves the others' stats
    untouched.
    """
    if device.type == "cpu":  # no launches to save: three passes per tensor, not one per statistic
        return _cpu_stats(grads)
    return torch.cat([_segment_stats(part, device) for part in _chunks(grads)])


def _segment_stats(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``_group_stats`` as segmented reductions over one concatenation (any device)."""
    numels = tuple(g.numel() for g in grads)
    lengths, counts = _segments(numels, device)
    flat = _flatten(grads)  # [T], one batched copy
    wide = flat.double()
    reduced = [
        torch.segment_reduce(data, reduce, lengths=lengths, unsafe=True)
        for data, reduce in ((wide, "sum"), (wide.square(), "sum"), (flat, "max"), (flat, "min"))
    ]
    total, squares, high, low = (t.double() for t in reduced)
    mean = total / counts
    # Float64 sums of float gradients: sum(x^2) - n mean^2 keeps ~1e-10 relative accuracy
    # unless |mean| exceeds the standard deviation by more than ~1e5.
    centred = (squares - total * mean).clamp_min(0.0)
    if 0 in numels:  # an empty segment's max is -inf, and an empty tensor has no max: NaN
        empty = counts == 0
        high, low = high.masked_fill(empty, math.nan), low.masked_fill(empty, math.nan)
    return torch.stack([squares.sqrt(), mean, centred, high, low], dim=-1)


def _chunks(grads: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of at most _CHUNK_ELEMENTS elements (a larger tensor runs alone)."""
    part: list[torch.Tensor] = []
    size = 0
    for g in grads:
        if part and size + g.numel() > _CHUNK_ELEMENTS:
            yield part
            part, size = [], 0
        part.append(g)
        size += g.numel()
    yield part


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' elements, concatenated: one C++ call (the loop of reshapes in Python
    costs more than the copy for a hundred small tensors)."""
    flatten = getattr(torch._C._nn, "flatten_dense_tensors", None)
    if flatten is None:  # pragma: no cover - private API, present in torch 2.x
        return torch.cat([t.reshape(-1) for t in tensors])
    return flatten(tensors)  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=32)
def _segments(numels: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Length (int64) and element count (float64) of each parameter in the concatenation.

    Cached per model layout: pinning host memory for the copy costs more than the statistics.
    """
    host = torch.tensor(numels, dtype=torch.int64)
    return _to_device(host, device), _to_device(host.double(), device)


def _cpu_stats(grads: list[torch.Tensor]) -> torch.Tensor:
    """float64[P, 5] on the CPU: a norm, a sum and a min/max pass per tensor.

    The centred sum of squares comes from sum(x^2) - n mean^2, which cancels when the mean
    dwarfs the spread; those tensors (rare among gradients) get an exact float64 pass. On
    the CPU that decision costs no synchronisation.
    """
    norms = torch.stack(torch._foreach_norm(grads, 2.0)).double()
    nan = torch.tensor([math.nan, math.nan])
    sums = torch.stack([g.sum() for g in grads]).double()
    extrema = torch.stack([torch.stack(torch.aminmax(g)) if g.numel() else nan for g in grads])
    lengths = torch.tensor([g.numel() for g in grads], dtype=torch.float64)
    mean = sums / lengths
    squares = norms.square()
    centred = (squares - sums * mean).clamp_min(0.0)
    for i in torch.nonzero(centred < 1e-3 * squares).flatten().tolist():
        x = grads[i].double()
        centred[i] = (x - x.mean()).square().sum()
    low, high = extrema.double().unbind(1)
    return torch.stack([norms, mean, centred, high, low], dim=-1)


@functools.lru_cache(maxsize=16)
def _assign_groups(names: tuple[str, ...], groups: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    """The group of each name: the first matching (group, regex) pair, else "rest".

    Cached per (names, groups): a training loop asks for the same model's layout every step.
    """
    patterns = [(g, re.compile(p)) for g, p in groups]
    return tuple(
        next((group for group, pattern in patterns if pattern.search(name)), "rest")
        for name in names
    )


def _group_totals(params: tuple[ParameterGradient, ...]) -> dict[str, dict[str, float]]:
    totals: dict[str, dict[str, float]] = {}
    for p in params:
        entry = totals.setdefault(p.group, {"parameters": 0, "numel": 0, "norm_sq": 0.0})
        entry["parameters"] += 1
        entry["numel"] += p.numel
        entry["norm_sq"] += p.norm**2
    return {
        g: {"parameters": e["parameters"], "numel": e["numel"], "norm": e["norm_sq"] ** 0.5}
        for g, e in totals.items()
    }


def _findings(
    params: tuple[ParameterGradient, ...],
    total: float,
    missing: tuple[str, ...],
    thresholds: Mapping[str, float],
) -> tuple[Finding, ...]:
    found: list[Finding] = []
    for p in params:
        if not math.isfinite(p.norm):
            msg = f"gradient of {p.name} is not finite (norm={p.norm})"
            found.append(Finding("nonfinite-gradient", "error", msg, location=p.name))
        elif p.norm > thresholds["exploding"]:
            msg = f"gradient of {p.name} is exploding (norm={p.norm:.4g})"
            found.append(Finding("exploding-gradient", "warning", msg, location=p.name))
        elif p.norm < thresholds["vanishing"]:
            msg = f"gradient of {p.name} is vanishing (norm={p.norm:.3g})"
            found.append(Finding("vanishing-gradient", "warning", msg, location=p.name))
    if missing:
        msg = f"{len(missing)} parameter(s) require grad but got none: {', '.join(missing[:5])}"
        found.append(Finding("missing-gradient", "info", msg, details={"names": list(missing)}))
    if math.isfinite(total) and total > thresholds["exploding"]:
        msg = f"total gradient norm {total:.4g} is above {thresholds['exploding']:g}"
        found.append(Finding("exploding-total-norm", "warning", msg))
    return tuple(found)

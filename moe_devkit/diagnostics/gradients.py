"""Gradient statistics after backward, computed with fused ops and one device-to-host transfer.

The design document's ``debug_gradients`` (section 4) reads five statistics per parameter
with one ``.item()`` each: on a GPU that is five host synchronisations per parameter. Here
the gradients of each (device, dtype) group are concatenated once; means, centred sums of
squares (two passes, so the standard deviation matches ``Tensor.std`` even when the mean is
large), maxima and minima are segment reductions over the concatenation, norms come from
``torch._foreach_norm``, and every statistic of every parameter is stacked into one [P, 5]
float64 tensor read with a single transfer.

Memory: the concatenation and the centred copy each take as much memory as the gradients
of one (device, dtype) group, for the duration of the call.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

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


@dataclass(frozen=True)
class ParameterGradient:
    """Statistics of one parameter's gradient (float64 on the host)."""

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
        patterns = [(g, re.compile(p)) for g, p in groups]
        params = tuple(
            _parameter(name, _group_of(name, patterns), n, row)
            for name, n, row in zip(self.names, self.numels, rows, strict=True)
        )
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
    grads = [g.detach() for _, g in with_grad]
    if any(g.is_sparse for g in grads):
        raise ValueError("sparse gradients are not supported; densify them first")
    groups = _groups(grads)
    target = grads[0].device
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

    A handful of launches whatever P is: multi-tensor norms and maxima, and per-parameter sums
    from one float64 prefix sum over the concatenated gradients (differences at the segment
    ends). No atomics (index_add_ into P bins serialises on a GPU) and no host read
    (segment_reduce reads the lengths on the host).
    """
    norms = torch.stack(torch._foreach_norm(grads, 2.0)).double()
    if device.type == "cpu":  # no launches to save: three passes per tensor (the seed: six)
        return _cpu_stats(grads, norms)
    maxs = torch.stack(torch._foreach_max(grads)).double()
    mins = -torch.stack(torch._foreach_max(torch._foreach_neg(grads))).double()
    ends, lengths = _segments(tuple(g.numel() for g in grads), device)  # [P] each
    flat = torch.cat([g.reshape(-1) for g in grads]).double()  # [T]
    prefix = torch.stack([flat, flat.square()]).cumsum(dim=1)  # [2, T]: sum, sum of squares
    at_end = prefix[:, ends]  # [2, P]
    sums = torch.diff(at_end, dim=1, prepend=torch.zeros_like(at_end[:, :1]))  # [2, P]
    mean = sums[0] / lengths
    # Float64 sums of float gradients: sum(x^2) - n mean^2 keeps ~1e-10 relative accuracy
    # unless |mean| exceeds the standard deviation by more than ~1e5.
    centred = (sums[1] - sums[0] * mean).clamp_min(0.0)
    return torch.stack([norms, mean, centred, maxs, mins], dim=-1)


@functools.lru_cache(maxsize=32)
def _segments(numels: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """End index (int64) and length (float64) of each parameter in the concatenation.

    Cached per model layout: pinning host memory for the copy costs more than the statistics.
    """
    host = torch.tensor(numels, dtype=torch.int64)
    return _to_device(host.cumsum(0) - 1, device), _to_device(host.double(), device)


def _cpu_stats(grads: list[torch.Tensor], norms: torch.Tensor) -> torch.Tensor:
    """float64[P, 5] on the CPU: a sum and a min/max pass per tensor, plus the norms."""
    sums = torch.stack([g.sum() for g in grads]).double()
    low_high = torch.stack([torch.stack(torch.aminmax(g)) for g in grads]).double()  # [P, 2]
    lengths = torch.tensor([g.numel() for g in grads], dtype=torch.float64)
    mean = sums / lengths
    centred = (norms.square() - sums * mean).clamp_min(0.0)  # sum(x^2) - n mean^2
    return torch.stack([norms, mean, centred, low_high[:, 1], low_high[:, 0]], dim=-1)


def _group_of(name: str, patterns: list[tuple[str, re.Pattern[str]]]) -> str:
    for group, pattern in patterns:
        if pattern.search(name):
            return group
    return "rest"


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

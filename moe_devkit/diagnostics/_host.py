"""One device-to-host copy for the many small tensors of a diagnostics result."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch


def nest(values: list[Any], shape: tuple[int, ...]) -> Any:
    """Reshapes a flat list into nested lists of ``shape`` (a scalar for shape ())."""
    if not shape:
        return values[0]
    if len(shape) == 1:
        return values
    step = math.prod(shape[1:])
    return [nest(values[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def to_host(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Plain Python values of many tensors with a single device-to-host copy.

    Everything is flattened into one float64 vector (exact for integers below 2**53),
    copied once, then split; integer tensors come back as ints, bool tensors as bools.
    """
    if not tensors:
        return {}
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors.values()])
    values = flat.tolist()  # the one host synchronisation
    out: dict[str, Any] = {}
    pos = 0
    for name, tensor in tensors.items():
        chunk: list[Any] = values[pos : pos + tensor.numel()]
        pos += tensor.numel()
        if tensor.dtype == torch.bool:
            chunk = [bool(v) for v in chunk]
        elif not tensor.is_floating_point():
            chunk = [int(v) for v in chunk]
        out[name] = nest(chunk, tuple(tensor.shape))
    return out


def prefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{name}": t for name, t in tensors.items()}


def unprefixed(prefix: str, host: Mapping[str, Any]) -> dict[str, Any]:
    return {name[len(prefix) :]: v for name, v in host.items() if name.startswith(prefix)}

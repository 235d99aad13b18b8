"""The utilization metrics on JAX and NumPy arrays: convert at the boundary, compute in torch.

``diagnostics.utilization`` is written once, over torch tensors (one formula home,
docs/metrics.md). The functions here take torch tensors, ``jax.Array`` or ``numpy.ndarray``
and hand tensors to it: a jax.Array goes through DLPack (no copy; a CUDA array stays on its
GPU when torch has CUDA), a NumPy array through ``torch.from_numpy`` (no copy unless
read-only). No value passes through a Python list, and this module imports jax only when
it is given a JAX value.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from moe_devkit.diagnostics import utilization
from moe_devkit.diagnostics.utilization import LoadBalance, UtilizationStats


def as_tensor(array: Any) -> torch.Tensor:
    """A torch tensor holding ``array`` (torch.Tensor, jax.Array or numpy.ndarray).

    Raises:
        TypeError: any other type (a list is refused: convert it yourself, knowingly).
    """
    if isinstance(array, torch.Tensor):
        return array
    if isinstance(array, np.ndarray | np.generic):
        host = np.asarray(array)
        return torch.from_numpy(host if host.flags.writeable else host.copy())
    if type(array).__module__.startswith(("jax", "jaxlib")):
        from moe_devkit.routers.convert import array_to_torch

        return array_to_torch(array)
    raise TypeError(
        "expected a torch.Tensor, jax.Array or numpy.ndarray; "
        f"got {type(array).__name__} (wrap lists with numpy.asarray)"
    )


def _optional(array: Any) -> torch.Tensor | None:
    return None if array is None else as_tensor(array)


def load_balance(tokens_per_expert: Any) -> LoadBalance:
    """``utilization.load_balance`` of int[E] counts given as any supported array."""
    return utilization.load_balance(as_tensor(tokens_per_expert))


def utilization_from_indices(
    expert_indices: Any,
    num_experts: int,
    *,
    router_logits: Any = None,
    complexity: Any = None,
    capacity_factor: float | None = None,
    validate: bool = True,
) -> UtilizationStats:
    """``utilization.utilization_from_indices`` on torch, JAX or NumPy arrays."""
    return utilization.utilization_from_indices(
        as_tensor(expert_indices),
        num_experts,
        router_logits=_optional(router_logits),
        complexity=_optional(complexity),
        capacity_factor=capacity_factor,
        validate=validate,
    )


def utilization_from_logits(
    router_logits: Any,
    k_per_token: Any,
    *,
    max_k: int | None = None,
    complexity: Any = None,
    capacity_factor: float | None = None,
    validate: bool = True,
) -> UtilizationStats:
    """``utilization.utilization_from_logits`` on torch, JAX or NumPy arrays."""
    return utilization.utilization_from_logits(
        as_tensor(router_logits),
        as_tensor(k_per_token),
        max_k=max_k,
        complexity=_optional(complexity),
        capacity_factor=capacity_factor,
        validate=validate,
    )


def utilization_from_decision(
    decision: Any, *, capacity_factor: float | None = None
) -> UtilizationStats:
    """``utilization.utilization_from_decision`` of a torch or JAX ``RoutingDecision``."""
    if type(decision).__module__ == "moe_devkit.routers.jax_router":
        from moe_devkit.routers.convert import decision_to_torch

        decision = decision_to_torch(decision)
    return utilization.utilization_from_decision(decision, capacity_factor=capacity_factor)

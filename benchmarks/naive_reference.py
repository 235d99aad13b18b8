"""Naive per-token and per-parameter loops: the oracle the tests compare against and the
baseline the benchmarks time.

Each is the straightforward Python version of a moe-devkit function, one host read per token
or per parameter: ``naive_debug_expert_selection`` of
``moe_devkit.diagnostics.utilization.debug_expert_selection`` and ``naive_debug_gradients``
of ``moe_devkit.diagnostics.gradients.gradient_statistics``. They are slow by construction;
never use them on real workloads. Not part of the installed package: the tests import this
module through pytest's ``pythonpath`` (``benchmarks``), the benchmark scripts from their own
directory.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


def naive_debug_expert_selection(
    router_logits: torch.Tensor, k_values: torch.Tensor
) -> Counter[int]:
    """Selections per expert: the top-k of each token, one token at a time.

    Args:
        router_logits: float[batch, seq, E].
        k_values: int[batch, seq].

    Returns:
        Selections per expert id (experts never selected are absent).
    """
    expert_counts: Counter[int] = Counter()
    for batch_idx in range(router_logits.size(0)):
        for seq_idx in range(router_logits.size(1)):
            k = k_values[batch_idx, seq_idx]
            top_experts = router_logits[batch_idx, seq_idx].topk(int(k)).indices
            for expert_id in top_experts:
                expert_counts[int(expert_id.item())] += 1
    return expert_counts


def naive_debug_gradients(model: nn.Module) -> tuple[dict[str, dict[str, float]], float]:
    """Gradient statistics after ``loss.backward()``, one parameter and one host read at a time.

    Returns:
        Per-parameter norm, mean, std, max and min, and the total gradient norm.
    """
    total = 0.0
    info: dict[str, dict[str, float]] = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            g = param.grad.data
            norm = g.norm(2)
            total += norm.item() ** 2
            info[name] = {
                "norm": norm.item(),
                "mean": g.mean().item(),
                "std": g.std().item(),
                "max": g.max().item(),
                "min": g.min().item(),
            }
    return info, total**0.5

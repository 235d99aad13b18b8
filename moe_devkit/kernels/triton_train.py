"""Autograd for the layer's active-pair kernels: the training path whose cost follows the pairs.

The layer's padded PyTorch path runs every one of the N x max_k slots through the gather,
the SwiGLU and the combine, forward and backward, because the number of active pairs lives
on the device. These Functions wrap ``triton_dispatch``'s kernels, which read that number on
the device and skip the rest, in both directions:

* ``Dispatch``: the gather of each active pair's token row; its backward sums each token's
  rows back (the combine kernel: every token reads its own K rows, no atomics and no row
  written twice), and hands each pair's weight gradient back to its (token, slot).
* ``SwiGLU``: ``silu(gate) * up * weight`` per active row; its backward is one kernel that
  also reduces the weight's gradient over the F columns.
* ``Combine``: the sum of each token's active rows; its backward gathers the output's
  gradient to the rows (the dispatch kernel).

Rows past the active count are never written nor read: the grouped matmuls between them
(``torch._grouped_mm`` or ``triton_grouped.grouped_mm``, both differentiable) compute only
the rows of their groups, forward and backward. Nothing here synchronises with the host.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_devkit.kernels import triton_dispatch

__all__ = ["Combine", "Dispatch", "SwiGLU"]


class Dispatch(torch.autograd.Function):
    """``(flat: float[N, D], expert_weights: float32[N, K]) -> (x_sorted: float[M, D],
    row_weights: float32[M])``, given the plan (``src``, ``row_weights``, ``pos``, ``active``
    as ``triton_dispatch.plan`` and its offsets give them)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        flat: torch.Tensor,
        expert_weights: torch.Tensor,
        src: torch.Tensor,
        row_weights: torch.Tensor,
        pos: torch.Tensor,
        active: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(pos)
        x_sorted = triton_dispatch.gather_rows(flat.contiguous(), src, active)
        return x_sorted, row_weights.view_as(row_weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_x: torch.Tensor | None, grad_row_weights: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        (pos,) = ctx.saved_tensors
        grad_flat = grad_weights = None
        if ctx.needs_input_grad[0] and grad_x is not None:
            no_nan = torch.zeros(pos.shape[0], dtype=torch.bool, device=pos.device)
            grad_flat = triton_dispatch.combine(grad_x.contiguous(), pos, no_nan)
        if ctx.needs_input_grad[1] and grad_row_weights is not None:
            slot_rows = pos.clamp_min(0).reshape(-1)
            by_slot = grad_row_weights.index_select(0, slot_rows).view(pos.shape)
            grad_weights = torch.where(pos >= 0, by_slot, 0.0)
        return grad_flat, grad_weights, None, None, None, None


class SwiGLU(torch.autograd.Function):
    """``(gate_up: float[M, 2F], row_weights: float32[M]) -> float[M, F]`` on the rows below
    ``active[0]`` (``triton_dispatch.swiglu_rows`` and its backward)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, gate_up: torch.Tensor, row_weights: torch.Tensor, active: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(gate_up, row_weights, active)
        return triton_dispatch.swiglu_rows(gate_up, row_weights, active)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        gate_up, row_weights, active = ctx.saved_tensors
        grad_gate_up, grad_weights = triton_dispatch.swiglu_rows_backward(
            gate_up, row_weights, grad, active
        )
        return grad_gate_up, grad_weights if ctx.needs_input_grad[1] else None, None


class Combine(torch.autograd.Function):
    """``y_sorted: float[M, D] -> float[N, D]``: each token's active rows summed (float32
    sum, one rounding), NaN rows where ``nonfinite``; given ``pos``, ``src`` and ``active``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        y_sorted: torch.Tensor,
        pos: torch.Tensor,
        nonfinite: torch.Tensor,
        src: torch.Tensor,
        active: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(nonfinite, src, active)
        return triton_dispatch.combine(y_sorted.contiguous(), pos, nonfinite)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None, None]:
        nonfinite, src, active = ctx.saved_tensors
        # The NaN rows of the forward do not depend on y: no gradient reaches their pairs.
        grad = grad.masked_fill(nonfinite.unsqueeze(-1), 0.0).contiguous()
        return triton_dispatch.gather_rows(grad, src, active), None, None, None, None

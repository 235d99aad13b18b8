"""SwiGLU experts as two persistent TMA grouped GEMMs (Triton, Hopper), no host sync.

For the no-autograd forward of ``MoELayer`` on sm90 in bfloat16 or float16: the expert
feed-forward over expert-sorted rows, ``(silu(x W_gate^T) * (x W_up^T) * weight) W_down^T``
per row, in two kernel launches:

* the gate/up projection computes each tile's gate and up columns side by side and stores
  only the weighted SwiGLU activation (float32 math, one rounding), so the [M, 2F] projection
  is never written to memory nor read back;
* the down projection.

Both walk the groups' row tiles with one program per SM, reading the tile count from the
groups' offsets on the device: the work follows the rows the experts hold, and rows past the
last group are never touched. Tiles are 128 rows (``torch._grouped_mm``'s CUTLASS kernel on
sm90 rounds each group up to 256: a 2-CTA cluster of 128-row tiles), loaded by TMA.
``benchmarks/bench_expert_gemm.py`` times them against ``torch._grouped_mm`` plus the
separate SwiGLU kernel (figures in docs/benchmarks.md).

Triton is imported at first use; with ``TRITON_INTERPRET=1`` set before that, the kernels run
in Triton's interpreter on CPU tensors (the tests use this, with small blocks).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from moe_devkit.routers import triton_grouped

__all__ = ["ExpertBlocks", "is_available", "supports", "swiglu_experts"]


@dataclass(frozen=True)
class ExpertBlocks:
    """Tile sizes and launch settings of the two GEMMs.

    ``n`` is the down projection's column panel; the SwiGLU projection uses ``n // 2`` gate
    columns and as many up columns per tile, the same accumulator size.
    """

    m: int = 128
    n: int = 256
    k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    programs: int | None = None  # default: one per SM

    def __post_init__(self) -> None:
        for name in ("m", "n", "k"):
            value = getattr(self, name)
            if value < 2 or value & (value - 1):
                raise ValueError(
                    f"ExpertBlocks.{name} must be a power of two >= 2; got {name}={value}"
                )


_HOPPER_BLOCKS = ExpertBlocks()


@functools.cache
def _has_tensor_descriptor() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:  # Triton < 3.4
        return False
    return True


def is_available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device``: a Hopper GPU (TMA) with a Triton that has
    tensor descriptors, or any device under Triton's interpreter."""
    if not triton_grouped.is_available(device) or not _has_tensor_descriptor():
        return False
    if triton_grouped._interpreting():
        return True
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def supports(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, blocks: ExpertBlocks
) -> bool:
    """Whether the shapes and dtypes fit the kernels: 16-bit floats, every dimension a
    multiple of its tile (TMA and the unmasked column panels), row-contiguous operands."""
    if x.dtype not in (torch.bfloat16, torch.float16) or not (
        x.dtype == w_gate_up.dtype == w_down.dtype
    ):
        return False
    hidden, inner = x.shape[1], w_down.shape[2]
    return (
        hidden % 8 == 0  # TMA: 16-byte aligned row strides
        and inner % 8 == 0
        and hidden % blocks.k == 0
        and hidden % blocks.n == 0
        and inner % blocks.k == 0
        and inner % (blocks.n // 2) == 0
        and x.stride(1) == 1
        and w_gate_up.is_contiguous()
        and w_down.is_contiguous()
    )


@functools.cache
def _kernels() -> ModuleType:
    from moe_devkit.routers import _triton_experts_kernels

    return _triton_experts_kernels


def _descriptor(t: torch.Tensor, block: list[int]) -> Any:
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block)


def _programs(device: torch.device, blocks: ExpertBlocks) -> int:
    if blocks.programs is not None:
        return blocks.programs
    return torch.cuda.get_device_properties(device).multi_processor_count


def _next_power_of_2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def swiglu_experts(
    x: torch.Tensor,
    offsets: torch.Tensor,
    row_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    blocks: ExpertBlocks | None = None,
) -> torch.Tensor:
    """``weight * down(silu(gate(x)) * up(x))`` per row, expert e on rows of group e.

    Args:
        x: [M, D] rows grouped by expert; rows past offsets[-1] are not read for any output.
        offsets: int32[E], end row of each expert's group (cumulative counts).
        row_weights: float32[M], the routing weight of each row.
        w_gate_up: [E, 2F, D], gate rows then up rows (nn.Linear layout per expert).
        w_down: [E, D, F].
        blocks: tile sizes (default: the Hopper ones; the tests pass small ones).

    Returns:
        [M, D] in x's dtype; rows past offsets[-1] are undefined.
    """
    blocks = _HOPPER_BLOCKS if blocks is None else blocks
    (rows, hidden), (experts, two_inner, _) = x.shape, w_gate_up.shape
    inner = two_inner // 2
    out = x.new_empty(rows, hidden)
    if rows == 0:
        return out
    activation = x.new_empty(rows, inner)
    programs = _programs(x.device, blocks)
    common = dict(
        NUM_PROGRAMS=programs,
        BLOCK_M=blocks.m,
        BLOCK_K=blocks.k,
        BLOCK_G=_next_power_of_2(experts),
        STAGES=blocks.num_stages,
        num_warps=blocks.num_warps,
    )
    half = blocks.n // 2
    _kernels().expert_gemm_kernel[(programs,)](
        _descriptor(x, [blocks.m, blocks.k]),
        _descriptor(w_gate_up.view(experts * two_inner, hidden), [half, blocks.k]),
        activation, offsets, row_weights,
        experts, hidden, inner, two_inner, activation.stride(0),
        BLOCK_N=half, SWIGLU=True, **common,
    )  # fmt: skip
    _kernels().expert_gemm_kernel[(programs,)](
        _descriptor(activation, [blocks.m, blocks.k]),
        _descriptor(w_down.view(experts * hidden, inner), [blocks.n, blocks.k]),
        out, offsets, row_weights,
        experts, inner, hidden, hidden, out.stride(0),
        BLOCK_N=blocks.n, SWIGLU=False, **common,
    )  # fmt: skip
    return out

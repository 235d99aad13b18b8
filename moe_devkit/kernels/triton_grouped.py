"""Grouped matmul in Triton with the contract of ``torch._grouped_mm``, and no host sync.

``torch._grouped_mm(a, b, offs=offs)`` runs a CUTLASS kernel on CUDA only for bfloat16 in and
out on sm90/sm100; for float32 and float16 it falls back to a loop that copies ``offs`` to the
host, a synchronisation. This module gives every floating dtype a grouped matmul that keeps
``offs`` on the device: it launches a static upper bound of programs, ceil(M / BLOCK_M) + G
m-tiles by ceil(N / BLOCK_N) n-tiles, each finding its group and rows from device tensors;
programs past the real tile count store nothing.

Contract, for a: float[M, K], b: float[G, K, N] (any strides), offs: int32[G] cumulative row
counts: out[M, N] in a's dtype, rows [offs[g-1], offs[g]) of out = a[those rows] @ b[g], with
float32 accumulation (no TF32 for float32 inputs). Unlike ``torch._grouped_mm``, rows past
offs[-1] are defined: zeros, forward and backward.

Triton is imported only when a kernel is first needed, so this module imports where Triton is
absent (CPU CI); ``is_available`` then says False. With ``TRITON_INTERPRET=1`` set before the
first call, the kernels run in Triton's interpreter on CPU tensors (the tests use this).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

__all__ = ["BlockSizes", "grouped_mm", "is_available"]


@dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and launch settings of the kernels (Triton's BLOCK_* and num_warps/stages).

    Fixed per dtype rather than autotuned: autotuning times candidates with host syncs.
    """

    m: int = 128
    n: int = 128
    k: int = 64
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("m", "n", "k"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"BlockSizes.{name} must be a power of two; got {name}={value}")


_HALF_BLOCKS = BlockSizes(m=128, n=128, k=64, num_warps=8, num_stages=3)
# float32 without TF32 runs on FMA units; 64x128x32 was the fastest of six tile shapes on an
# H100 for both kernels (128x128x64 fp32 tiles do not fit the pipeline's shared memory).
_FLOAT_BLOCKS = BlockSizes(m=64, n=128, k=32, num_warps=4, num_stages=3)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def is_available(device: torch.device | str | None = None) -> bool:
    """Whether ``grouped_mm`` can run on ``device`` (default: the current CUDA device).

    True where Triton is installed and the device is CUDA (or ROCm), or any device while
    Triton's interpreter is on (``TRITON_INTERPRET=1``).
    """
    if not _triton_installed():
        return False
    if _interpreting():
        return True
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


@functools.cache
def _kernels() -> ModuleType:
    from moe_devkit.kernels import _triton_grouped_kernels

    return _triton_grouped_kernels


def _default_blocks(dtype: torch.dtype) -> BlockSizes:
    return _FLOAT_BLOCKS if dtype == torch.float32 else _HALF_BLOCKS


def _precision(dtype: torch.dtype) -> str | None:
    # float32 must match torch.mm to ~1e-5: TF32 (10-bit mantissa) would give ~1e-3.
    return "ieee" if dtype == torch.float32 else None


def _check(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> None:
    """Raises TypeError/ValueError unless a, b, offs fit the grouped matmul contract."""
    if a.dim() != 2 or b.dim() != 3 or offs.dim() != 1:
        raise ValueError(
            "grouped_mm expects a: [M, K], b: [G, K, N], offs: [G]; got shapes "
            f"{tuple(a.shape)}, {tuple(b.shape)}, {tuple(offs.shape)}"
        )
    if a.shape[1] != b.shape[1] or b.shape[0] != offs.shape[0] or b.shape[0] == 0:
        raise ValueError(
            "grouped_mm expects a: [M, K], b: [G, K, N], offs: [G] with G >= 1; got shapes "
            f"{tuple(a.shape)}, {tuple(b.shape)}, {tuple(offs.shape)}"
        )
    if not a.is_floating_point() or a.dtype != b.dtype:
        raise TypeError(
            f"grouped_mm expects a and b of one floating dtype; got {a.dtype} and {b.dtype}"
        )
    if offs.dtype != torch.int32:
        raise TypeError(f"grouped_mm expects offs of dtype int32; got {offs.dtype}")
    if not a.device == b.device == offs.device:
        raise ValueError(
            f"grouped_mm expects a, b, offs on one device; got {a.device}, {b.device}, "
            f"{offs.device}"
        )


def _tile_ends(offs: torch.Tensor, num_rows: int, block_m: int) -> torch.Tensor:
    """int32[G+1]: cumulative BLOCK_M tiles of each group, then of the padding rows."""
    ends = torch.cat([offs, offs.new_full((1,), num_rows)])  # [G+1]
    counts = (ends - torch.cat([offs.new_zeros(1), ends[:-1]])).clamp_min(0)
    tiles = torch.div(counts + (block_m - 1), block_m, rounding_mode="floor")
    return torch.cumsum(tiles, dim=0, dtype=torch.int32)


def _forward(
    a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, blocks: BlockSizes
) -> torch.Tensor:
    """float[M, N]: the grouped product, zeros past offs[-1]; no host synchronisation."""
    (num_rows, k_dim), (groups, _, n_dim) = a.shape, b.shape
    out = a.new_empty(num_rows, n_dim)
    if out.numel() == 0:
        return out
    tile_end = _tile_ends(offs, num_rows, blocks.m)
    num_pid_m = _cdiv(num_rows, blocks.m) + groups  # >= the real tile count, any offs
    grid = (num_pid_m * _cdiv(n_dim, blocks.n),)
    _kernels().grouped_mm_kernel[grid](
        a, b, out, offs, tile_end,
        num_rows, n_dim, k_dim, groups, num_pid_m,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        out.stride(0), out.stride(1),
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k,
        BLOCK_G=_next_power_of_2(groups + 1), GROUP_M=8, PRECISION=_precision(a.dtype),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip
    return out


def _weight_grad(
    a: torch.Tensor, grad_out: torch.Tensor, offs: torch.Tensor, groups: int, blocks: BlockSizes
) -> torch.Tensor:
    """float[G, K, N]: a_g^T @ grad_out_g per group g (zeros for empty groups)."""
    (num_rows, k_dim), n_dim = a.shape, grad_out.shape[1]
    grad_b = a.new_empty(groups, k_dim, n_dim)
    if grad_b.numel() == 0:
        return grad_b
    grid = (_cdiv(n_dim, blocks.n), _cdiv(k_dim, blocks.k), groups)  # groups <= 65535
    _kernels().grouped_weight_grad_kernel[grid](
        a, grad_out, grad_b, offs,
        num_rows, n_dim, k_dim,
        a.stride(0), a.stride(1), grad_out.stride(0), grad_out.stride(1),
        grad_b.stride(0), grad_b.stride(1), grad_b.stride(2),
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k, PRECISION=_precision(a.dtype),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip
    return grad_b


def _cdiv(x: int, y: int) -> int:
    """ceil(x / y) for non-negative ints."""
    return -(-x // y)


def _next_power_of_2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


class _GroupedMM(torch.autograd.Function):
    """Autograd for the grouped matmul: both gradients are grouped products too."""

    @staticmethod
    def forward(  # type: ignore[override, unused-ignore]
        ctx: Any, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, blocks: BlockSizes
    ) -> torch.Tensor:
        ctx.save_for_backward(a, b, offs)
        ctx.blocks = blocks
        return _forward(a, b, offs, blocks)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override, unused-ignore]
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        a, b, offs = ctx.saved_tensors
        grad_out = grad_out.to(a.dtype)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = _forward(grad_out, b.transpose(-2, -1), offs, ctx.blocks)
        if ctx.needs_input_grad[1]:
            grad_b = _weight_grad(a, grad_out, offs, b.shape[0], ctx.blocks)
        return grad_a, grad_b, None, None


def grouped_mm(
    a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, *, blocks: BlockSizes | None = None
) -> torch.Tensor:
    """Grouped matmul with ``torch._grouped_mm``'s contract, differentiable, with no host sync.

    Args:
        a: float[M, K], rows grouped by g; any strides.
        b: float[G, K, N] of a's dtype; any strides (e.g. ``w.transpose(-2, -1)``).
        offs: int32[G], end row of each group (cumulative counts), on a's device.
        blocks: tile sizes; default per dtype (tests pass tiny ones to the interpreter).

    Returns:
        float[M, N] in a's dtype: a[rows of g] @ b[g] per group, zeros past offs[-1].

    Raises:
        TypeError: dtypes differ, are not floating point, or offs is not int32.
        ValueError: shapes or devices do not match.
        RuntimeError: Triton is not installed or cannot run on a's device.
    """
    _check(a, b, offs)
    if not is_available(a.device):
        raise RuntimeError(
            f"grouped_mm needs Triton and a CUDA device (or TRITON_INTERPRET=1); got "
            f"device={a.device}, triton installed={_triton_installed()}"
        )
    blocks = _default_blocks(a.dtype) if blocks is None else blocks
    out: torch.Tensor = _GroupedMM.apply(a, b, offs, blocks)  # type: ignore[no-untyped-call]
    return out

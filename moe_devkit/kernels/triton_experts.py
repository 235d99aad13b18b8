"""Grouped GEMM for the experts of the no-grad forward on Hopper: persistent, TMA, Triton.

``MoELayer``'s forward without autograd runs its two expert projections through
``grouped_mm`` here where it can (sm90, bfloat16 or float16, tile-aligned sizes) instead of
``torch._grouped_mm``. Same contract, no host synchronisation, and two differences that
matter for a dynamic router:

* tiles are 128 rows, and only a group's last tile is partly empty. The CUTLASS kernel behind
  ``torch._grouped_mm`` on sm90 runs 2-CTA clusters of 128-row tiles, which rounds each group
  up to 256 rows: at ~514 rows per expert (8192 tokens, mean k 4 of 64 experts) that is ~25%
  of padding, against ~12% here;
* one program per SM walks all tiles, reading their count from the group offsets on the
  device, so the work follows the rows the groups hold, and the loop over tiles is flattened
  into the K loop, so a tile's first loads overlap the previous tile's epilogue.

``benchmarks/bench_expert_gemm.py`` times it against ``torch._grouped_mm`` (figures in
docs/performance.md). It has no backward; training keeps ``torch._grouped_mm``.

Triton is imported at first use; with ``TRITON_INTERPRET=1`` set before that, the kernel runs
in Triton's interpreter on CPU tensors (the tests use this, with small blocks).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from moe_devkit.kernels import triton_grouped

__all__ = ["ExpertBlocks", "grouped_mm", "is_available", "supports"]


@dataclass(frozen=True)
class ExpertBlocks:
    """Tile sizes and launch settings (Triton's BLOCK_* and num_warps/num_stages).

    The default was the fastest of the shapes tried on an H100 for both projections at the
    OLMoE-like size (128 x 256 x 64 tiles, 8 warps, 4 stages; 128 x 128 tiles ran 15-25%
    slower, 128-wide K steps 20-30% slower). ``programs`` defaults to one per SM.
    """

    m: int = 128
    n: int = 256
    k: int = 64
    num_warps: int = 8
    num_stages: int = 4
    programs: int | None = None

    def __post_init__(self) -> None:
        for name in ("m", "n", "k"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"ExpertBlocks.{name} must be a power of two; got {name}={value}")


_HOPPER_BLOCKS = ExpertBlocks()


@functools.cache
def _has_tensor_descriptor() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return importlib.util.find_spec("triton.tools.tensor_descriptor") is not None  # >= 3.4


def is_available(device: torch.device) -> bool:
    """Whether the kernel can run on ``device``: a Hopper GPU (TMA) with a Triton that has
    tensor descriptors, or any device under Triton's interpreter."""
    if not triton_grouped.is_available(device) or not _has_tensor_descriptor():
        return False
    if triton_grouped._interpreting():
        return True
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def supports(a: torch.Tensor, b: torch.Tensor, blocks: ExpertBlocks | None = None) -> bool:
    """Whether ``grouped_mm(a, b, offs)`` fits the kernel: 16-bit floats of one dtype, K and
    N multiples of their tiles, ``a`` row-contiguous and ``b`` the transpose of contiguous
    [G, N, K] weights (``w.transpose(-2, -1)`` of an nn.Linear-layout stack), on one device."""
    blocks = _HOPPER_BLOCKS if blocks is None else blocks
    if a.dim() != 2 or b.dim() != 3 or a.dtype not in (torch.bfloat16, torch.float16):
        return False
    k_dim, n_dim = b.shape[1], b.shape[2]
    return (
        a.dtype == b.dtype
        and a.device == b.device
        and a.shape[1] == k_dim
        and k_dim % 8 == 0  # TMA: 16-byte aligned row strides
        and k_dim % blocks.k == 0
        and n_dim % blocks.n == 0
        and a.stride(1) == 1
        and a.stride(0) == k_dim
        and b.transpose(-2, -1).is_contiguous()
    )


@functools.cache
def _kernels() -> ModuleType:
    from moe_devkit.kernels import _triton_experts_kernels

    return _triton_experts_kernels


def _descriptor(t: torch.Tensor, block: list[int]) -> Any:
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block)


def grouped_mm(
    a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, blocks: ExpertBlocks | None = None
) -> torch.Tensor:
    """``torch._grouped_mm(a, b, offs=offs)`` for expert weights, without autograd.

    Args:
        a: [M, K] rows grouped by expert, row-contiguous.
        b: [G, K, N], the transpose of contiguous [G, N, K] weights.
        offs: int32[G], end row of each group (cumulative counts), on a's device.
        blocks: tile sizes (default: the Hopper ones; the tests pass small ones).

    Returns:
        [M, N] in a's dtype: a[rows of g] @ b[g]; rows past offs[-1] are undefined.

    Raises:
        ValueError: the operands do not fit the kernel (check ``supports`` first).
    """
    blocks = _HOPPER_BLOCKS if blocks is None else blocks
    if not supports(a, b, blocks) or offs.dtype != torch.int32 or offs.shape != b.shape[:1]:
        raise ValueError(
            "triton_experts.grouped_mm expects a: [M, K] row-contiguous, b: [G, K, N] the "
            "transpose of contiguous weights, 16-bit floats, K % 8 == 0 and tile-aligned, offs: "
            f"int32[G]; got a {tuple(a.shape)} {a.dtype} strides {a.stride()}, b "
            f"{tuple(b.shape)} {b.dtype}, offs {tuple(offs.shape)} {offs.dtype}"
        )
    (rows, k_dim), (groups, _, n_dim) = a.shape, b.shape
    out = a.new_empty(rows, n_dim)
    if rows == 0:
        return out
    programs = blocks.programs
    if programs is None:
        programs = torch.cuda.get_device_properties(a.device).multi_processor_count
    weights = b.transpose(-2, -1).reshape(groups * n_dim, k_dim)  # a view: contiguous
    _kernels().expert_gemm_kernel[(programs,)](
        _descriptor(a, [blocks.m, blocks.k]),
        _descriptor(weights, [blocks.n, blocks.k]),
        out, offs, groups, k_dim, n_dim, out.stride(0),
        NUM_PROGRAMS=programs, BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k,
        BLOCK_G=triton_grouped._next_power_of_2(groups), STAGES=blocks.num_stages,
        num_warps=blocks.num_warps,
    )  # fmt: skip
    return out

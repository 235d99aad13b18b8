"""Combine functions for ``tl.reduce`` and ``tl.associative_scan`` in the package's kernels.

Imported by the kernel modules only, once Triton is known to be there.
"""

# mypy: disable-error-code="misc, no-untyped-def, untyped-decorator"

from __future__ import annotations

import triton  # type: ignore[import-not-found, import-untyped, unused-ignore]
import triton.language as tl  # type: ignore[import-not-found, import-untyped, unused-ignore]

__all__ = ["_add", "_max", "_min"]


@triton.jit
def _add_fallback(x, y):
    return x + y


@triton.jit
def _min_fallback(x, y):
    return tl.minimum(x, y)


@triton.jit
def _max_fallback(x, y):
    return tl.maximum(x, y)


# Reductions through tl.reduce with tl.standard's own combine functions (what tl.sum, tl.min
# and tl.max use): tl.sum and the others are @triton.jit functions made when triton is
# imported, which the interpreter cannot call if that was before TRITON_INTERPRET=1 was set;
# the combine functions are only handed to tl.reduce, and for them the interpreter reduces
# with numpy instead of calling the combine function element by element in Python (100x
# faster tests). Own equivalents where a Triton version lacks them.
_add = getattr(tl.standard, "_sum_combine", _add_fallback)
_min = getattr(tl.standard, "_elementwise_min", _min_fallback)
_max = getattr(tl.standard, "_elementwise_max", _max_fallback)

"""Triton kernels under test: compiled on a GPU, or in Triton's interpreter on the CPU.

Import this module before anything builds a kernel: without CUDA it sets TRITON_INTERPRET=1
(the kernels are built lazily, at first use, so this is early enough even after the package
was imported). ``DEVICE`` is where the kernels run; ``needs_triton`` skips where Triton is
not installed (the CI's CPU environment).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

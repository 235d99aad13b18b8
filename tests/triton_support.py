"""Triton kernels under test: compiled on a GPU, or in Triton's interpreter on the CPU.

Import this module before anything builds a kernel: without CUDA it sets TRITON_INTERPRET=1
(the kernels are built lazily, at first use, so this is early enough even after the package
was imported). ``DEVICE`` is where the kernels run; ``needs_triton`` skips where Triton is
not installed (the CI's CPU environment).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def run_interpreted_after_triton_import(body: str) -> None:
    """Runs ``body`` in a fresh Python where triton was imported before TRITON_INTERPRET=1.

    triton's own @jit helpers (tl.sum, tl.max, tl.zeros, tl.cumsum) are then compiled-mode
    functions, as in a full test run where some module imported triton first; the kernels
    must not call them. ``body`` sees ``os``, ``torch`` and ``triton``.
    """
    script = "import os, triton, torch\nos.environ['TRITON_INTERPRET'] = '1'\n" + body
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)

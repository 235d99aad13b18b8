"""The inspector's Triton update (two launches) against its PyTorch ops, on identical decisions.

Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set here before the
kernel is first built) on CPU tensors; with CUDA the compiled kernel runs on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from triton_support import DEVICE, needs_triton  # sets TRITON_INTERPRET first

from moe_devkit.inspect import InspectorConfig
from moe_devkit.inspect.records import StepTensors
from moe_devkit.inspect.state import LayerState
from moe_devkit.kernels import inspector_update

pytestmark = needs_triton


def decision(n: int, experts: int, max_k: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random decision tensors with padding, stray k, out-of-range and non-finite scores."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, max_k + 1, (n,), generator=g)
    indices = torch.stack([torch.randperm(experts, generator=g)[:max_k] for _ in range(n)])
    indices = torch.where(torch.arange(max_k) < k[:, None], indices, -1)
    complexity = torch.rand(n, generator=g) * 1.4 - 0.2  # some below 0 and above 1
    complexity[torch.randint(0, n, (3,), generator=g)] = float("nan")
    complexity[0] = float("inf")
    nonfinite = torch.rand(n, generator=g) < 0.05
    dropped = (torch.rand(n, max_k, generator=g) < 0.1) & (indices >= 0)
    losses = torch.rand(2, generator=g)
    tensors = (indices, complexity, nonfinite, k, dropped, losses[0], losses[1])
    return tuple(t.to(DEVICE) for t in tensors)


def states(experts: int, max_k: int, config: InspectorConfig) -> tuple[LayerState, LayerState]:
    fused = LayerState("fused", experts, max_k, DEVICE, config)
    plain = LayerState("plain", experts, max_k, DEVICE, config)
    fused._fused, plain._fused = True, False
    return fused, plain


@pytest.mark.parametrize(
    ("n", "experts", "max_k"), [(1, 4, 1), (37, 8, 3), (2500, 64, 8), (20000, 16, 4)]
)
def test_one_kernel_update_equals_the_pytorch_ops(n: int, experts: int, max_k: int) -> None:
    config = InspectorConfig(complexity_bins=7, coactivation_every=0, cuda_graphs=False)
    fused, plain = states(experts, max_k, config)
    for seed in range(3):
        inputs = decision(n, experts, max_k, seed)
        fused._update_tensors(StepTensors(*inputs, inputs[0], inputs[4]), coactivation=False, sample=True)
        plain._update_tensors(StepTensors(*inputs, inputs[0], inputs[4]), coactivation=False, sample=True)
    for name in ("counts", "joint", "dropped", "res_k", "res_complexity", "tokens_seen"):
        expected = getattr(plain.stats, name)
        got = getattr(fused.stats, name)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    for name in ("loss_sums", "sums", "extrema"):
        got, expected = getattr(fused.stats, name), getattr(plain.stats, name)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert int(fused.stats.counts.sum()) > 0
    assert int(fused.stats.joint[-1].sum()) > 0  # non-finite row


def test_layouts_the_kernel_does_not_read_fall_back_to_pytorch() -> None:
    indices, complexity, nonfinite, k, dropped, lb, z = decision(5, 4, 2, 0)
    state = states(4, 2, InspectorConfig())[0].stats.tensors()
    odd = (indices, complexity, nonfinite, k, dropped[:, :1], lb, z)  # dropped of another shape
    assert not inspector_update.token_stats(odd, state, complexity_bins=20, max_k=2)
    assert int(state["counts"].sum()) == 0

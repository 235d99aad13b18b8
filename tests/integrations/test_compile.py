"""torch.compile(fullgraph=True) with the inspector attached: no graph break, same statistics."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from moe_devkit import RouterConfig
from moe_devkit.inspect import RouterInspector
from moe_devkit.routers.torch_router import DynamicMoERouter

EXACT = ("steps", "tokens", "selections", "utilization", "k", "coactivation", "sample")


class TinyMoE(nn.Module):
    """Projection, dynamic-k router, experts gathered per selected slot (no host sync)."""

    def __init__(self, hidden: int = 8, experts: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        self.router = DynamicMoERouter(
            RouterConfig(hidden_size=hidden, num_experts=experts, min_k=1, max_k=3)
        )
        self.experts = nn.Parameter(torch.randn(experts, hidden, hidden) / hidden**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)  # [N, D]
        d = self.router(h)
        w = self.experts[d.expert_indices.clamp_min(0)]  # [N, K, D, D]
        y = torch.einsum("nd,nkde->nke", h, w)  # [N, K, D]
        return (y * d.expert_weights.unsqueeze(-1)).sum(dim=1)  # [N, D]


def _run(model: Any, batches: list[torch.Tensor]) -> None:
    for x in batches:
        model(x).square().mean().backward()  # a training step: forward and backward


def test_compiled_model_records_the_eager_statistics() -> None:
    torch.manual_seed(0)
    model = TinyMoE()
    batches = [torch.randn(6 + step, 8) for step in range(3)]  # varying token counts
    with RouterInspector(model) as eager:
        _run(model, batches)
    torch._dynamo.reset()
    compiled_inspector = RouterInspector().attach(model)
    # fullgraph=True: any graph break in the hooks raises instead of splitting the graph.
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    _run(compiled, batches)
    mine, theirs = compiled_inspector.summary().layers, eager.summary().layers
    assert list(mine) == ["router"] == list(theirs)
    got, want = mine["router"], theirs["router"]
    for key in EXACT:
        assert json.dumps(got[key]) == json.dumps(want[key]), key
    assert got["complexity"]["histogram"] == want["complexity"]["histogram"]
    for key in ("mean", "std", "min", "max"):
        assert got["complexity"][key] == pytest.approx(want["complexity"][key], rel=1e-5)
    for key, value in want["losses"].items():
        assert got["losses"][key] == pytest.approx(value, rel=1e-5)
    assert got["time_range"] == [None, None]  # host bookkeeping stays out of the graph

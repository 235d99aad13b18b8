"""CUDA graphs: updates replayed from captured graphs give the eager statistics."""

from __future__ import annotations

import pytest
import torch

from moe_devkit import MoEModel, RouterConfig
from moe_devkit.inspect import InspectorConfig, RouterInspector


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager_updates() -> None:
    config = RouterConfig(hidden_size=64, num_experts=8, max_k=4, expert_hidden_size=64)
    model = MoEModel(config, num_layers=1).to("cuda")
    graphed = RouterInspector(config=InspectorConfig(window=3, coactivation_every=2))
    eager = RouterInspector(  # PyTorch ops, no graph, no Triton kernel
        config=InspectorConfig(window=3, coactivation_every=2, cuda_graphs=False, triton=False)
    )
    same_stream = RouterInspector(  # graphs replayed on the model's stream
        config=InspectorConfig(window=3, coactivation_every=2, side_stream=False)
    )
    for inspector in (graphed, eager, same_stream):
        inspector.attach(model)
    with torch.no_grad():
        for step in range(9):
            tokens = 128 if step % 3 else 96  # two shapes: two captured graphs
            model(torch.randn(tokens, 64, device="cuda") * (1 + step))
    b = eager.summary().layers["layers.0.moe.router"]
    for other in (graphed, same_stream):
        a = other.summary().layers["layers.0.moe.router"]
        for key in ("utilization", "k", "coactivation", "windows", "sample", "tokens", "steps"):
            assert a[key] == b[key], key
        assert a["complexity"]["mean"] == pytest.approx(b["complexity"]["mean"])
        assert a["complexity"]["std"] == pytest.approx(b["complexity"]["std"])

"""RoutingTraceRecorder during training and at a full budget: the routing weights of a training
step are recorded detached (the buffers join no autograd graph), a full budget lets go of
the routers' hooks, the reference model is recorded however it is called, and a recorded
call costs a few ops a layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_zoo import build_tiny
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moe_devkit.inspect.trace import RoutingTraceRecorder
from moe_devkit.routers.torch_router import MoEModel, RouterConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(seed: int = 0) -> MoEModel:
    torch.manual_seed(seed)
    config = RouterConfig(hidden_size=16, num_experts=6, max_k=3, expert_hidden_size=16)
    return MoEModel(config, num_layers=2)


def _router_hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) for name, m in model.named_modules() if name.endswith("router")
    )


def test_training_steps_record_the_weights_detached() -> None:
    model = _reference().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 5, 16, generator=generator) for _ in range(3)]
    decisions = []
    recorder = RoutingTraceRecorder(model, weights=True, max_tokens=30, chunk_tokens=20)
    with recorder:
        for x in xs:  # 10 tokens a step: the chunk is flushed before the third
            optimizer.zero_grad()
            out = model(x)
            (out.hidden_states.square().mean() + out.aux_loss).backward()
            optimizer.step()
            decisions.append([(r.expert_indices, r.expert_weights.detach()) for r in out.routings])
    trace = recorder.trace()
    assert trace.num_tokens == 30 and trace.weights is not None
    for j in range(2):
        ids = torch.cat([step[j][0] for step in decisions])
        weights = torch.cat([step[j][1] for step in decisions])
        np.testing.assert_array_equal(trace.expert_ids[:, j], ids.numpy())
        np.testing.assert_array_equal(trace.weights[:, j], weights.numpy())
    # the recorder's buffers hold no autograd graph: none of them requires grad
    buffers = [*recorder._tokens.values(), *recorder._ids.values(), *recorder._weights.values()]
    assert buffers and not any(b.requires_grad for b in buffers)


def test_a_full_budget_lets_go_of_the_router_hooks() -> None:
    model = _reference().eval()
    before = _router_hooks(model)
    recorder = RoutingTraceRecorder(model, max_tokens=15).attach()
    assert _router_hooks(model) == before + 2  # one per router
    with torch.no_grad():
        model(torch.randn(2, 5, 16))  # 10 of 15
        assert _router_hooks(model) == before + 2
        model(torch.randn(2, 5, 16))  # 5 more: full
        assert _router_hooks(model) == before + 2
        model(torch.randn(2, 5, 16))  # nothing left to record: the routers are let go
        assert _router_hooks(model) == before
        model(torch.randn(2, 5, 16))
    assert recorder.calls == 4 and recorder.rows_used == 15
    trace = recorder.trace()
    assert trace.num_tokens == 15
    np.testing.assert_array_equal(trace.sequence, np.repeat([0, 1, 2, 3], 5)[:15])
    recorder.detach()
    assert _router_hooks(model) == before


def test_reference_model_called_by_keyword_is_recorded() -> None:
    model = _reference().eval()
    x = torch.randn(2, 5, 16)
    traces = []
    for call in ({"args": (x,), "kwargs": {}}, {"args": (), "kwargs": {"hidden_states": x}}):
        with RoutingTraceRecorder(model) as recorder, torch.no_grad():
            model(*call["args"], **call["kwargs"])
        traces.append(recorder.trace())
    positional, keyword = traces
    assert keyword.num_tokens == positional.num_tokens == 10
    np.testing.assert_array_equal(keyword.expert_ids, positional.expert_ids)
    np.testing.assert_array_equal(keyword.positions, np.tile(np.arange(5), 2))


class _OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched while it is on."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _ops_of_a_call(model: nn.Module, x: torch.Tensor) -> int:
    counter = _OpCount()
    with counter, torch.no_grad():
        model(x)
    return counter.ops


def test_a_recorded_call_costs_a_few_ops_a_layer() -> None:
    """The recorder's own work for a reference-model call (its router returns the decision):
    at most nine ops for the call's token rows (positions and sequences: an arange and one
    copy each, with their views; none for the token ids of an embeddings call) and five for
    each layer's ids and weights. It is the difference between a recorded and a plain call."""
    model = _reference().eval()
    x = torch.randn(2, 5, 16)
    plain = _ops_of_a_call(model, x)
    with RoutingTraceRecorder(model, weights=True, max_tokens=100):
        _ops_of_a_call(model, x)  # the first call allocates the buffers
        recorded = _ops_of_a_call(model, x)
    assert recorded - plain <= 9 + 2 * 5


def test_a_transformers_router_is_recorded_without_building_its_decision() -> None:
    """Mixtral's router returns its experts and weights: the recorder copies them as they
    are (a decision would add some 60 ops a layer: probabilities, entropy, losses)."""
    torch.manual_seed(0)
    model = build_tiny("mixtral")
    ids = torch.randint(0, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0

    def ops() -> int:
        counter = _OpCount()
        with counter, torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        return counter.ops

    plain = ops()
    with RoutingTraceRecorder(model, weights=True, max_tokens=100) as recorder:
        ops()  # the first call allocates the buffers
        recorded = ops()
    layers = len(recorder.probes)
    assert layers == 3
    # the masked call's rows (token ids, positions counted over the mask, sequences,
    # validity) in at most 16 ops, then a few a layer
    assert recorded - plain <= 16 + 8 * layers
    trace = recorder.trace()
    assert trace.num_tokens == 2 * int(mask.sum()) and trace.weights is not None
    np.testing.assert_allclose(trace.weights.sum(2), 1.0, rtol=1e-5)  # top-2, renormalised

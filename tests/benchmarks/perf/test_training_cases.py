"""The perf suite's training cases: they build, the dynamic ones run mean k TRAIN_MEAN_K, and a
step computes gradients but leaves the weights, so every call does the same work."""

from __future__ import annotations

import pytest
import torch
from perf.cases import CASES, TRAIN_MEAN_K, CaseBuilder

pytestmark = pytest.mark.usefixtures("one_thread")

TRAINING = [
    "train.layer.static",
    "train.layer.dynamic",
    "train.model.static",
    "train.model.dynamic",
]


def test_the_training_cases_are_in_the_suite() -> None:
    assert set(TRAINING) <= set(CASES)


@pytest.mark.parametrize("static", [True, False])
def test_reference_model_routes_max_k_or_the_mean_k(static: bool) -> None:
    built = CaseBuilder("cpu", quick=True)._training_model(static)
    assert not isinstance(built, str), built
    model, x = built
    with torch.no_grad():
        routings = model(x).routings
    assert len(routings) == 2
    for routing in routings:
        k = routing.k_per_token.float()
        if static:
            assert torch.all(k == routing.max_k)
        else:
            assert abs(float(k.mean()) - TRAIN_MEAN_K) < 0.05
            assert k.unique().numel() > 2  # a spread of k over tokens


@pytest.mark.parametrize("name", TRAINING)
def test_a_step_runs_and_leaves_the_weights(name: str) -> None:
    builder = CaseBuilder("cpu", quick=True)
    step = builder.build(name)
    assert callable(step), step
    first = step()
    assert isinstance(first, torch.Tensor) and torch.isfinite(first).all()
    params = {
        id(p): p.detach().clone()
        for p in _parameters(step)  # the case's model, through the closure
    }
    assert params
    second = step()
    assert isinstance(second, torch.Tensor)
    torch.testing.assert_close(second, first, rtol=0, atol=0)  # same weights, same work
    for p in _parameters(step):
        torch.testing.assert_close(p.detach(), params[id(p)], rtol=0, atol=0)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in _parameters(step))


def _parameters(step: object) -> list[torch.nn.Parameter]:
    """The parameters of the module or optimizer a case's closure holds."""
    found: list[torch.nn.Parameter] = []
    for cell in getattr(step, "__closure__", None) or ():
        value = cell.cell_contents
        if isinstance(value, torch.nn.Module):
            found.extend(value.parameters())
        elif isinstance(value, torch.optim.Optimizer):
            found.extend(p for group in value.param_groups for p in group["params"])
    return found

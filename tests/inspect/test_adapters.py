"""Decision builders: decision_from_tensors checks its values and keeps each token's first k."""

from __future__ import annotations

import math

import pytest
import torch

from moe_devkit.inspect.adapters import decision_from_tensors


def test_decision_from_tensors_checks_its_values() -> None:
    c = torch.rand(2)
    with pytest.raises(ValueError, match=r"expert_indices must hold whole numbers; got 0\.7"):
        decision_from_tensors(c, torch.tensor([1, 1]), torch.tensor([[0.7], [1.0]]))
    with pytest.raises(TypeError, match=r"expert_indices must be an integer tensor; got dtype"):
        decision_from_tensors(c, torch.tensor([1, 1]), torch.tensor([[True], [False]]))
    with pytest.raises(ValueError, match=r"k_values must hold whole numbers; got 1\.5"):
        decision_from_tensors(c, torch.tensor([1.5, 1.0]), torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match=r"got k=2 for token 1, which has 1"):
        decision_from_tensors(c, torch.tensor([2, 2]), torch.tensor([[0, 1], [2, -1]]))
    with pytest.raises(ValueError, match=r"got k=-1 for token 0"):
        decision_from_tensors(c, torch.tensor([-1, 1]), torch.tensor([[0, 1], [2, -1]]))
    whole = decision_from_tensors(
        c, torch.tensor([1.0, 2.0]), torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    )
    assert whole.expert_indices.tolist() == [[0, -1], [2, 3]]  # token 0 keeps its first choice
    assert whole.k_per_token.tolist() == [1, 2]


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("num_experts", [1, 8, 64])
def test_router_output_statistics_equal_the_reference_definitions(
    scoring: str, num_experts: int
) -> None:
    """probs, complexity, z-loss and the non-finite flags of a decision built from router
    outputs equal torch.softmax, normalized_entropy and router_z_loss, non-finite rows too."""
    from moe_devkit.inspect.adapters import _router_probs, decision_from_router_outputs
    from moe_devkit.routers.torch_router import normalized_entropy, router_z_loss

    generator = torch.Generator().manual_seed(num_experts)
    logits = torch.randn(300, num_experts, generator=generator) * 6
    logits[3, 0], logits[5, 0], logits[7, -1] = math.nan, math.inf, -math.inf
    logits[9] = -math.inf
    k = min(2, num_experts)
    weights, indices = torch.softmax(logits.nan_to_num(0.0), -1).topk(k, dim=-1)
    indices[11, -1] = -1
    decision = decision_from_router_outputs(logits, indices, weights, scoring=scoring)

    finite = torch.isfinite(logits).all(dim=-1)
    probs = _router_probs(logits, scoring)  # type: ignore[arg-type]
    assert torch.equal(decision.nonfinite, ~finite)
    torch.testing.assert_close(decision.router_probs, probs, equal_nan=True)
    torch.testing.assert_close(decision.complexity, normalized_entropy(probs), equal_nan=True)
    torch.testing.assert_close(decision.z_loss, router_z_loss(logits, finite))
    assert torch.equal(decision.k_per_token, torch.where(finite, (indices >= 0).sum(-1), 0))
    assert bool(torch.isfinite(decision.load_balancing_loss))

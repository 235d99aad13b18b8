"""Decision builders: decision_from_tensors checks its values and keeps each token's first k."""

from __future__ import annotations

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

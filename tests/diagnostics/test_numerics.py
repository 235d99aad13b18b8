"""NumericsGuard and check_numerical_stability: attribution, clean runs, strict mode, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moe_devkit.config import RouterConfig
from moe_devkit.diagnostics.numerics import (
    NonFiniteError,
    NumericsGuard,
    check_numerical_stability,
    iter_tensors,
)
from moe_devkit.routers.torch_router import MoELayer, MoEModel

# min_k < max_k: the experts' grouped matmul has padding rows past its last group, which
# must never show up as a finding on a healthy model.
CONFIG = RouterConfig(
    hidden_size=16, num_experts=4, min_k=1, max_k=2, expert_hidden_size=16, complexity_hidden_size=8
)


class NaNGradient(torch.autograd.Function):
    """Identity forward; NaN gradient backward."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.nan


class BadBackward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NaNGradient.apply(x)


class BadForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.active = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * math.nan if self.active else x * 1.0


def mlp(middle: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 8), middle), nn.Linear(8, 1)
    )


def train(model: nn.Module, steps: int = 3) -> None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(x).sum().backward()


def test_clean_model_has_no_findings() -> None:
    model = mlp(nn.Identity())
    with NumericsGuard(model) as guard:
        train(model)
    assert guard.check() == []
    assert guard.step == 3


def test_forward_nan_is_attributed_to_its_module_and_step() -> None:
    bad = BadForward()
    model = mlp(bad)
    with NumericsGuard(model) as guard:
        train(model, 2)
        bad.active = True
        train(model, 1)
    (finding,) = guard.check()
    assert finding.code == "nonfinite-output"
    assert finding.location == "2.1"
    assert finding.step == 3
    assert finding.details["tensor"] == "output"
    assert guard.check() == []  # flags reset after a check


def test_backward_nan_is_attributed_to_the_module_whose_backward_made_it() -> None:
    model = mlp(BadBackward())
    with NumericsGuard(model) as guard:
        train(model, 1)
    (finding,) = guard.check()
    assert finding.code == "nonfinite-gradient"
    assert finding.location == "2.1"
    assert finding.details == {
        "phase": "backward",
        "tensor": "gradient of input[0]",
        "also_nonfinite": finding.details["also_nonfinite"],
    }


def test_first_bad_step_survives_the_ring_of_step_rows() -> None:
    """Rows are folded every 64 steps: the first bad step is kept across folds and checks."""
    bad = BadForward()
    model = mlp(bad)
    with NumericsGuard(model) as guard:
        train(model, 100)  # one fold of 64 clean rows, 36 rows pending
        bad.active = True
        train(model, 2)  # steps 101 and 102 are bad
        bad.active = False
        train(model, 60)  # crosses the next fold
        (finding,) = guard.check()
        assert finding.step == 101
        assert finding.location == "2.1"
        train(model, 10)
        assert guard.check() == []
        bad.active = True
        train(model, 1)
    (finding,) = guard.check()
    assert finding.step == 173


class ToBFloat16(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.bfloat16()


class ToFloat32(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


def test_first_bad_tensor_is_found_in_execution_order_across_dtypes() -> None:
    """Flags are grouped by dtype in the row; the finding still names the earliest module."""
    bad = BadForward()
    bad.active = True
    model = nn.Sequential(nn.Linear(8, 8), ToBFloat16(), bad, ToFloat32(), nn.Linear(8, 1))
    with NumericsGuard(model, gradients=False) as guard, torch.no_grad():
        model(torch.randn(4, 8))
    (finding,) = guard.check()
    assert finding.location == "2"  # bf16 output, executed before the float32 ones
    # the model's output is module 4's output tensor: read once, under module 4
    assert finding.details["also_nonfinite"] == ["3: output", "4: output"]


def test_strict_mode_raises_in_forward_and_backward() -> None:
    bad = BadForward()
    bad.active = True
    with NumericsGuard(mlp(bad), strict=True) as guard, pytest.raises(NonFiniteError) as info:
        train(guard.model, 1)
    assert info.value.finding.location == "2.1"
    with (
        NumericsGuard(mlp(BadBackward()), strict=True) as guard,
        pytest.raises(NonFiniteError) as info,
    ):
        train(guard.model, 1)
    assert info.value.finding.code == "nonfinite-gradient"
    assert info.value.finding.location == "2.1"


def test_check_every_records_findings_without_an_explicit_check() -> None:
    bad = BadForward()
    bad.active = True
    model = mlp(bad)
    with NumericsGuard(model, check_every=2) as guard:
        train(model, 3)  # the check runs at the start of step 3
    assert [f.step for f in guard.findings] == [1]


def test_routing_decision_fields_are_checked_on_the_reference_layer() -> None:
    torch.manual_seed(0)
    layer = MoELayer(CONFIG)
    with torch.no_grad():
        layer.router.router_network.weight[0, 0] = math.inf
    with NumericsGuard(layer) as guard:
        layer(torch.randn(2, 4, 16)).hidden_states.sum().backward()
    (finding,) = guard.check()
    assert finding.location == "router"
    assert finding.details["tensor"] == "output.router_logits"


def test_reference_model_clean_and_planted_nan_in_a_named_layer() -> None:
    torch.manual_seed(0)
    model = MoEModel(CONFIG, num_layers=2)
    x = torch.randn(2, 4, 16)
    with NumericsGuard(model) as guard:
        for _ in range(2):
            out = model(x)
            (out.hidden_states.square().mean() + out.aux_loss).backward()
        assert guard.check() == []
        with torch.no_grad():
            model.layers[1].moe.experts.w_down.fill_(math.nan)
        model(x).hidden_states.sum().backward()
    (finding,) = guard.check()
    assert (finding.location, finding.step) == ("layers.1.moe.experts", 3)


def test_guard_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        NumericsGuard("model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="check_every"):
        NumericsGuard(nn.Linear(2, 2), check_every=0)


def test_check_numerical_stability() -> None:
    assert check_numerical_stability(torch.ones(3, 3)) is None
    assert check_numerical_stability(torch.arange(5)) is None
    assert check_numerical_stability(torch.empty(0)) is None
    t = torch.zeros(2, 3)
    t[1, 2] = math.nan
    t[0, 1] = -math.inf
    finding = check_numerical_stability(t, "router_logits")
    assert finding is not None and finding.code == "nonfinite-values"
    assert finding.details["positions"] == [[0, 1], [1, 2]]
    assert (finding.details["nan_count"], finding.details["inf_count"]) == (1, 1)
    large = check_numerical_stability(torch.tensor([1.0, 2e7]), threshold=1e6)
    assert large is not None and large.code == "large-values" and large.severity == "warning"
    assert large.details["positions"] == [[1]]
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        check_numerical_stability([1.0, 2.0])
    with pytest.raises(ValueError, match="threshold"):
        check_numerical_stability(t, threshold=-1)
    with pytest.raises(ValueError, match=r"threshold must be a positive number; got threshold=nan"):
        check_numerical_stability(torch.ones(3), threshold=math.nan)
    assert check_numerical_stability(torch.tensor([1.0, 2e7]), threshold=math.inf) is None


def test_iter_tensors_follows_nested_outputs() -> None:
    t = torch.zeros(1)
    found = [d for d, _ in iter_tensors({"a": (t, [t, torch.arange(2)])}, "output")]
    assert found == ["output['a'][0]", "output['a'][1][0]"]


@pytest.mark.gpu
def test_guard_does_not_synchronise_between_checks_on_cuda() -> None:
    torch.manual_seed(0)
    layer = MoELayer(CONFIG).cuda()
    x = torch.randn(2, 8, 16, device="cuda")
    guard = NumericsGuard(layer).attach()
    layer(x).hidden_states.sum().backward()  # warm-up: allocations, lazy init
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(70):  # crosses a fold of the ring of step rows
            layer(x).hidden_states.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert guard.check() == []
    with torch.no_grad():
        layer.experts.w_down.fill_(math.nan)
    layer(x).hidden_states.sum().backward()
    (finding,) = guard.check()
    assert finding.location == "experts"
    guard.detach()


class Sliced(nn.Module):
    """Keeps the first ``rows`` rows: zero rows gives empty outputs and gradients (an
    expert that receives no tokens)."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.rows = rows
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x[: self.rows])


def test_empty_tensors_are_checked_as_finite() -> None:
    model = Sliced(0)
    x = torch.randn(3, 4, requires_grad=True)
    with NumericsGuard(model) as guard:
        (model(x).sum() + x.sum()).backward()
        assert guard.check() == []
        model.rows = 2
        model.linear.bias.data[0] = math.nan
        model(x).sum().backward()
        (finding,) = guard.check()
    assert finding.code == "nonfinite-output" and finding.location == "linear"

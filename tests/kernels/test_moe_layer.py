"""The fast path's choices: which implementation takes which kernel, on which device.

No kernel runs here (the Triton paths themselves are tested against the reference in
test_triton_*.py); Triton's availability is patched, so these run without Triton.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from moe_devkit.config import RouterConfig
from moe_devkit.kernels import moe_layer, triton_grouped, triton_router


@pytest.mark.parametrize("value", ["fast", "Triton", "", None, 1])
def test_check_implementation_names_the_argument_the_choices_and_the_value(
    value: object,
) -> None:
    expected = "implementation must be 'auto', 'reference' or 'triton'; "
    expected += f"got implementation={value!r}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        moe_layer.check_implementation(value)
    for good in moe_layer.IMPLEMENTATIONS:
        assert moe_layer.check_implementation(good) == good


def test_auto_picks_cutlass_only_for_bf16_on_sm90_and_sm100(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # stand-ins for CUDA tensors: grouped_matmul reads only their device and dtype
    x32 = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32)
    x16 = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    monkeypatch.setattr(triton_grouped, "is_available", lambda device=None: True)
    for major in (9, 10):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, m=major: (m, 0))
        assert moe_layer.grouped_matmul(x16, "auto") is torch._grouped_mm
        assert moe_layer.grouped_matmul(x32, "auto") is triton_grouped.grouped_mm
        assert moe_layer.grouped_matmul(x16, "reference") is torch._grouped_mm
        assert moe_layer.grouped_matmul(x32, "reference") is None  # the loop
        assert moe_layer.grouped_matmul(x16, "triton") is triton_grouped.grouped_mm
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    assert moe_layer.grouped_matmul(x16, "auto") is triton_grouped.grouped_mm
    assert moe_layer.grouped_matmul(x16, "reference") is None
    monkeypatch.setattr(triton_grouped, "is_available", lambda device=None: False)
    assert moe_layer.grouped_matmul(x16, "auto") is None  # the looped fallback
    with pytest.raises(RuntimeError, match=r"implementation='triton' needs Triton"):
        moe_layer.grouped_matmul(x16, "triton")


def test_off_cuda_only_triton_takes_a_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(4, 2)
    monkeypatch.setattr(triton_grouped, "is_available", lambda device=None: True)  # interpreter
    assert moe_layer.grouped_matmul(x, "auto") is None  # the experts' own CPU choice
    assert moe_layer.grouped_matmul(x, "reference") is None
    assert moe_layer.grouped_matmul(x, "triton") is triton_grouped.grouped_mm
    with torch.no_grad():
        assert moe_layer.layer_matmul(x, "auto") is None
        assert moe_layer.layer_matmul(x, "reference") is None
        assert moe_layer.layer_matmul(x, "triton") is triton_grouped.grouped_mm
    assert moe_layer.layer_matmul(x, "triton") is None  # autograd on: the reference forward


def test_routers_take_the_kernels_where_they_give_the_same_decision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = torch.device("cpu")
    config = RouterConfig(hidden_size=8, num_experts=6, max_k=3)
    monkeypatch.setattr(triton_grouped, "is_available", lambda device=None: True)  # interpreter
    with torch.no_grad():
        assert moe_layer.routes_in_triton(config, cpu, "triton")
        assert not moe_layer.routes_in_triton(config, cpu, "reference")
        assert not moe_layer.routes_in_triton(config, cpu, "auto")  # INTERPRET_ON_CPU is off
        monkeypatch.setattr(triton_router, "INTERPRET_ON_CPU", True)
        assert moe_layer.routes_in_triton(config, cpu, "auto")
        for overrides in ({"capacity_factor": 1.0}, {"nonfinite_policy": "raise"}):
            other = RouterConfig(hidden_size=8, num_experts=6, max_k=3, **overrides)  # type: ignore[arg-type]
            assert not moe_layer.routes_in_triton(other, cpu, "triton")
            assert not moe_layer.routes_in_triton(other, cpu, "auto")
    assert not moe_layer.routes_in_triton(config, cpu, "triton")  # autograd on


def test_triton_raises_where_triton_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_grouped, "_triton_installed", lambda: False)
    cpu = torch.device("cpu")
    config = RouterConfig(hidden_size=8, num_experts=6, max_k=3)
    match = r"implementation='triton' needs Triton and a CUDA device .*got device=cpu"
    with pytest.raises(RuntimeError, match=match):
        moe_layer.require_triton(cpu)
    with pytest.raises(RuntimeError, match=match):
        moe_layer.routes_in_triton(config, cpu, "triton")
    with pytest.raises(RuntimeError, match=match), torch.no_grad():
        moe_layer.layer_matmul(torch.zeros(2, 8), "triton")
    assert not moe_layer.routes_in_triton(config, cpu, "auto")
    with torch.no_grad():
        assert moe_layer.layer_matmul(torch.zeros(2, 8), "auto") is None

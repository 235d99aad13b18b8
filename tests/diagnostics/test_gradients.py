"""Gradient statistics: equal to a per-parameter reference computation; flags; errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from naive_reference import naive_debug_gradients as seed_debug_gradients
from torch import nn

from moe_devkit.config import RouterConfig
from moe_devkit.diagnostics.gradients import collect_gradient_stats, gradient_statistics
from moe_devkit.routers.torch_router import MoEModel

CONFIG = RouterConfig(
    hidden_size=16, num_experts=4, min_k=2, max_k=2, expert_hidden_size=16, complexity_hidden_size=8
)


def seed_reference(model: nn.Module) -> tuple[dict[str, dict[str, float]], float]:
    """The per-parameter debug_gradients loop of moe_devkit.baselines, warnings muted."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "std")  # one-element gradients: std is nan
        return seed_debug_gradients(model)


def trained_model() -> MoEModel:
    torch.manual_seed(0)
    model = MoEModel(CONFIG, num_layers=2)
    out = model(torch.randn(2, 8, 16))
    (out.hidden_states.square().mean() + out.aux_loss).backward()
    return model


def test_statistics_equal_the_per_parameter_loop() -> None:
    model = trained_model()
    report = gradient_statistics(model)
    expected, total = seed_reference(model)
    assert [p.name for p in report.parameters] == list(expected)
    for p in report.parameters:
        ref = expected[p.name]
        # float32 sums of either method round differently: compare at the gradient's scale
        scale = max(abs(ref["max"]), abs(ref["min"]), 1e-30)
        for stat in ("norm", "mean", "std", "max", "min"):
            got = getattr(p, stat)
            assert got == pytest.approx(ref[stat], rel=1e-5, abs=1e-6 * scale, nan_ok=True), stat
    assert report.total_norm == pytest.approx(total, rel=1e-6)


def test_mixed_dtypes_keep_parameter_order() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).double(), nn.Linear(4, 1))
    x = torch.randn(3, 4)
    model[2](model[1](model[0](x).double()).float()).sum().backward()
    report = gradient_statistics(model)
    expected, _ = seed_reference(model)
    assert [p.name for p in report.parameters] == list(expected)
    for p in report.parameters:
        assert p.std == pytest.approx(expected[p.name]["std"], rel=1e-5, nan_ok=True)


def test_groups_top_and_flags() -> None:
    model = trained_model()
    report = gradient_statistics(model, top_n=3, exploding=1e9, vanishing=1e-12)
    groups = {p.name: p.group for p in report.parameters}
    assert groups["layers.0.moe.router.router_network.weight"] == "router"
    assert groups["layers.0.moe.router.complexity_estimator.fc1.weight"] == "complexity_estimator"
    assert groups["layers.0.moe.experts.w_down"] == "experts"
    assert groups["layers.0.norm.weight"] == "rest"
    norms = sorted((p.norm for p in report.parameters), reverse=True)
    assert [p.norm for p in report.top] == norms[:3]
    group_norm = math.sqrt(sum(p.norm**2 for p in report.parameters if p.group == "experts"))
    assert report.groups["experts"]["norm"] == pytest.approx(group_norm)
    # min_k == max_k: the complexity estimator gets exactly zero gradient
    codes = {(f.code, f.location) for f in report.findings}
    assert ("vanishing-gradient", "layers.0.moe.router.complexity_estimator.fc1.weight") in codes
    custom = gradient_statistics(model, groups=[("norms", r"\.norm\.")])
    assert {p.group for p in custom.parameters} == {"norms", "rest"}


def test_nonfinite_and_exploding_gradients_are_flagged() -> None:
    model = nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    assert model.weight.grad is not None and model.bias.grad is not None
    model.weight.grad[0, 0] = math.nan
    model.bias.grad.fill_(1e6)
    codes = {f.location: f.code for f in gradient_statistics(model).findings}
    assert codes == {"weight": "nonfinite-gradient", "bias": "exploding-gradient"}


def test_missing_gradients_are_reported() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0](torch.ones(1, 2)).sum().backward()
    report = gradient_statistics(model)
    assert report.missing == ("1.weight", "1.bias")
    assert any(f.code == "missing-gradient" for f in report.findings)
    assert report.to_dict()["missing"] == ["1.weight", "1.bias"]


def test_bad_input_gets_clear_errors() -> None:
    with pytest.raises(ValueError, match="no parameters"):
        gradient_statistics(nn.Sequential())
    with pytest.raises(ValueError, match=r"loss.backward\(\)"):
        gradient_statistics(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"nn\.Module or"):
        gradient_statistics(torch.ones(2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pairs"):
        gradient_statistics([1, 2])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="no parameters given"):
        gradient_statistics([])


@pytest.mark.gpu
def test_collection_does_not_synchronise_on_cuda() -> None:
    torch.manual_seed(0)
    model = MoEModel(CONFIG, num_layers=2).cuda()
    out = model(torch.randn(2, 8, 16, device="cuda"))
    (out.hidden_states.square().mean() + out.aux_loss).backward()
    collect_gradient_stats(model).resolve()  # warm-up (pinned memory, lazy init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = collect_gradient_stats(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    report = pending.resolve()
    expected, total = seed_reference(model)
    for p in report.parameters:
        assert p.norm == pytest.approx(expected[p.name]["norm"], rel=1e-4, abs=1e-7)
        assert p.max == pytest.approx(expected[p.name]["max"], rel=1e-5, abs=1e-9)
    assert report.total_norm == pytest.approx(total, rel=1e-4)


def test_segmented_path_matches_the_per_tensor_path_and_isolates_bad_tensors() -> None:
    """The GPU path (segmented reductions) run on the CPU: same rows as the CPU path; a NaN
    or Inf in one gradient leaves its neighbours' statistics exact; an empty tensor is NaN."""
    from moe_devkit.diagnostics import gradients as g

    torch.manual_seed(0)
    grads = [torch.randn(7, 5), torch.randn(3) * 1e-3 + 5.0, torch.randn(1), torch.randn(64)]
    exact = float64_rows(grads)
    cpu = torch.device("cpu")
    torch.testing.assert_close(g._segment_stats(grads, cpu), exact, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g._cpu_stats(grads), exact, rtol=1e-5, atol=1e-7)
    bad = [t.clone() for t in grads]
    bad[1][0] = float("nan")
    bad[3][5] = float("inf")
    rows = g._segment_stats(bad, cpu)
    torch.testing.assert_close(rows[0], exact[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rows[2], exact[2], rtol=1e-9, atol=1e-12)
    assert rows[1].isnan().all()  # norm, mean, std, max and min of the NaN tensor
    assert rows[3, 0].item() == float("inf") and rows[3, 3].item() == float("inf")
    empty = g._segment_stats([torch.randn(4), torch.empty(0)], cpu)
    assert empty[1, 3].isnan() and empty[1, 4].isnan() and empty[0].isfinite().all()


def test_large_groups_are_split_into_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_devkit.diagnostics import gradients as g

    monkeypatch.setattr(g, "_CHUNK_ELEMENTS", 10)
    grads = [torch.randn(4), torch.randn(8), torch.randn(30), torch.randn(2), torch.randn(3)]
    assert [len(part) for part in g._chunks(grads)] == [1, 1, 1, 2]
    torch.testing.assert_close(
        torch.cat([g._segment_stats(p, torch.device("cpu")) for p in g._chunks(grads)]),
        float64_rows(grads),
    )


def float64_rows(grads: list[torch.Tensor]) -> torch.Tensor:
    """Per tensor, in float64: norm, mean, centred sum of squares, max, min."""
    rows = []
    for t in grads:
        x = t.double()
        mean = x.mean()
        rows.append(torch.stack([x.norm(), mean, (x - mean).square().sum(), x.max(), x.min()]))
    return torch.stack(rows)

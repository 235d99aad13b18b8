"""Utilization, load-balance and dynamic-k metrics: hand cases, loop reference, bad input."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from naive_reference import naive_debug_expert_selection as seed_debug_expert_selection

import moe_devkit
from moe_devkit.config import RouterConfig
from moe_devkit.diagnostics.utilization import (
    co_activation,
    coefficient_of_variation,
    complexity_stats,
    compute_saved,
    count_selections,
    dead_experts,
    debug_expert_selection,
    gini_coefficient,
    k_histogram,
    load_balance,
    load_entropy,
    max_violation,
    mean_k,
    per_layer_utilization,
    selected_experts,
    selection,
    selection_counts,
    selection_counts_from_logits,
    selection_shares,
    spearman_correlation,
    utilization_from_decision,
    utilization_from_indices,
    utilization_from_logits,
    utilization_to_dicts,
)
from moe_devkit.routers.torch_router import (
    MoEModel,
    capacity_dropped,
    expert_counts,
    load_balancing_loss,
    router_z_loss,
)

INDICES = torch.tensor([[0, 1], [1, -1], [2, 1]])  # E = 4: loads [1, 3, 1, 0]
LOADS = torch.tensor([1, 3, 1, 0])


def same(a: object, b: object) -> bool:
    """Equality of to_dict() results, NaN equal to NaN."""
    return json.dumps(a) == json.dumps(b)


def close(value: torch.Tensor, expected: float) -> bool:
    return math.isclose(float(value), expected, rel_tol=1e-6, abs_tol=1e-6)


# ----------------------------------------------------------------------------- counts


def test_selection_counts_and_shares() -> None:
    counts = selection_counts(INDICES, 4)
    assert counts.tolist() == [1, 3, 1, 0] and counts.dtype == torch.int64
    assert selection_shares(counts).tolist() == pytest.approx([0.2, 0.6, 0.2, 0.0])
    assert selection_shares(torch.zeros(3, dtype=torch.int64)).tolist() == [0.0, 0.0, 0.0]


def test_selected_experts_pads_beyond_k() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])
    got = selected_experts(logits, torch.tensor([2, 0]), max_k=3)
    assert got.tolist() == [[1, 2, -1], [-1, -1, -1]]
    assert selection_counts_from_logits(logits, torch.tensor([2, 1])).tolist() == [1, 1, 1]


def test_debug_expert_selection_hand_case_and_export() -> None:
    logits = torch.tensor([[[0.1, 0.9, 0.5, 0.0], [2.0, 1.0, 0.0, -1.0]]])
    k = torch.tensor([[2, 3]])
    assert debug_expert_selection(logits, k) == Counter({0: 1, 1: 2, 2: 2})
    assert 3 not in debug_expert_selection(logits, k)  # only selected experts, as the loop
    assert moe_devkit.debug_expert_selection is debug_expert_selection


# ----------------------------------------------------------------------------- load balance


def test_load_balance_hand_computed() -> None:
    # mean 1.25, population var 4.75 / 4; shares (.2, .6, .2, 0); sorted loads (0, 1, 1, 3).
    assert close(coefficient_of_variation(LOADS), math.sqrt(4.75 / 4) / 1.25)
    assert close(max_violation(LOADS), 3 / 1.25 - 1)
    entropy = -(2 * 0.2 * math.log(0.2) + 0.6 * math.log(0.6)) / math.log(4)
    assert close(load_entropy(LOADS), entropy)
    assert close(gini_coefficient(LOADS), 2 * 17 / (4 * 5) - 5 / 4)
    assert dead_experts(LOADS).tolist() == [False, False, False, True]


@pytest.mark.parametrize(
    ("loads", "cv", "vio", "entropy", "gini"),
    [
        ([2, 2, 2, 2], 0.0, 0.0, 1.0, 0.0),
        ([8, 0, 0, 0], math.sqrt(3), 3.0, 0.0, 0.75),
    ],
)
def test_load_balance_extremes(
    loads: list[int], cv: float, vio: float, entropy: float, gini: float
) -> None:
    balance = load_balance(torch.tensor(loads))
    assert close(balance.cv, cv) and close(balance.max_vio, vio)
    assert close(balance.entropy, entropy) and close(balance.gini, gini)


def test_load_balance_undefined_without_selections() -> None:
    out = load_balance(torch.zeros(4, dtype=torch.int64)).to_dict()
    assert all(math.isnan(out[name]) for name in ("cv", "max_vio", "entropy", "gini"))
    assert out["dead_count"] == 4 and out["dead_experts"] == [0, 1, 2, 3]


def test_gini_matches_mean_absolute_difference() -> None:
    loads = torch.randint(0, 50, (16,), generator=torch.Generator().manual_seed(1))
    x = loads.double()
    expected = (x[:, None] - x[None, :]).abs().sum() / (2 * 16 * 16 * x.mean())
    assert close(gini_coefficient(loads), float(expected))


# ----------------------------------------------------------------------------- dynamic k


def test_k_statistics() -> None:
    k = torch.tensor([0, 1, 2, 2, 3])
    assert k_histogram(k, 3).tolist() == [1, 1, 2, 1]
    assert close(mean_k(k), 1.6)
    assert close(compute_saved(k, 3), 1 - 8 / 15)


def test_spearman_hand_computed_with_ties() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert close(spearman_correlation(x, torch.tensor([1, 2, 2, 3])), 4.5 / math.sqrt(22.5))
    assert close(spearman_correlation(x, x.exp()), 1.0)
    assert close(spearman_correlation(x, -x), -1.0)
    assert math.isnan(float(spearman_correlation(x, torch.ones(4))))
    assert math.isnan(float(spearman_correlation(x, torch.tensor([1.0, math.nan, 2, 3]))))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=2, max_size=30))
def test_spearman_matches_pearson_of_average_ranks(values: list[int]) -> None:
    x = np.array(values, dtype=float)
    y = np.array([v * 2 % 7 for v in values], dtype=float)

    def ranks(a: np.ndarray) -> np.ndarray:
        return np.array([(a < v).sum() + ((a == v).sum() + 1) / 2 for v in a])

    rx, ry = ranks(x), ranks(y)
    constant = rx.std() == 0 or ry.std() == 0
    expected = math.nan if constant else float(np.corrcoef(rx, ry)[0, 1])
    got = float(spearman_correlation(torch.tensor(x), torch.tensor(y)))
    assert (math.isnan(got) and math.isnan(expected)) or math.isclose(got, expected, abs_tol=1e-6)


def test_complexity_stats_hand_computed() -> None:
    stats = complexity_stats(torch.tensor([0.4, 0.1, math.nan, 0.3, 0.2]), (0.0, 0.25, 0.5, 1.0))
    out = stats.to_dict()
    assert out["count"] == 4 and out["nan_count"] == 1
    assert out["mean"] == pytest.approx(0.25) and out["std"] == pytest.approx(math.sqrt(0.0125))
    assert out["min"] == pytest.approx(0.1) and out["max"] == pytest.approx(0.4)
    assert out["quantiles"] == pytest.approx({"0.0": 0.1, "0.25": 0.175, "0.5": 0.25, "1.0": 0.4})


def test_complexity_stats_match_numpy() -> None:
    scores = torch.rand(101, generator=torch.Generator().manual_seed(2))
    out = complexity_stats(scores).to_dict()
    ref = scores.double().numpy()
    assert out["std"] == pytest.approx(ref.std(), rel=1e-5)
    levels = [0.05, 0.25, 0.5, 0.75, 0.95]
    assert list(out["quantiles"].values()) == pytest.approx(np.quantile(ref, levels), rel=1e-5)


def test_co_activation_hand_computed() -> None:
    got = co_activation(INDICES, 3)
    assert got.tolist() == [[1, 1, 0], [1, 3, 1], [0, 1, 1]]
    assert torch.equal(got.diagonal(), selection_counts(INDICES, 3)[:3])


# ----------------------------------------------------------------------------- results


def test_utilization_from_indices_full() -> None:
    indices = torch.tensor([[0, -1], [0, -1], [0, -1], [1, 0]])
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [3.0, 1.0], [0.0, 1.0]])
    stats = utilization_from_indices(
        indices, 2, router_logits=logits, complexity=torch.tensor([0.1, 0.2, 0.3, 0.9]),
        capacity_factor=1.0,
    )  # fmt: skip
    out = stats.to_dict()
    assert out["balance"]["tokens_per_expert"] == [4, 1]
    assert out["k_histogram"] == [0, 3, 1] and out["mean_k"] == pytest.approx(1.25)
    assert out["compute_saved"] == pytest.approx(1 - 5 / 8)
    # capacity ceil(1.0 * 5 / 2) = 3: the fourth selection of expert 0 is dropped.
    assert out["dropped_pairs"] == int(capacity_dropped(indices, 2, 1.0).sum()) == 1
    probs = torch.softmax(logits, -1)
    assert out["load_balancing_loss"] == pytest.approx(float(load_balancing_loss(probs, indices)))
    assert out["z_loss"] == pytest.approx(float(router_z_loss(logits)))
    # ranks: complexity (1, 2, 3, 4), k (2, 2, 2, 4): 3 / sqrt(5 * 3).
    assert out["complexity_k_spearman"] == pytest.approx(3 / math.sqrt(15))
    assert out["co_activation"] == [[4, 1], [1, 1]]
    json.dumps(out, allow_nan=False)  # plain ints, floats and lists


def test_utilization_from_logits_matches_indices_path() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 7, 6, generator=gen)
    k = torch.randint(0, 4, (2, 7), generator=gen)
    stats = utilization_from_logits(logits, k, max_k=3)
    again = utilization_from_indices(selected_experts(logits, k, max_k=3), 6, router_logits=logits)
    assert same(stats.to_dict(), again.to_dict())
    counts = debug_expert_selection(logits, k)
    assert stats.tokens_per_expert.tolist() == [counts[e] for e in range(6)]


def test_decision_and_per_layer() -> None:
    torch.manual_seed(0)
    config = RouterConfig(hidden_size=16, num_experts=8, max_k=3, expert_hidden_size=8)
    model = MoEModel(config, num_layers=2).eval()
    with torch.no_grad():
        routings = model(torch.randn(2, 5, 16)).routings
    model.train()
    layers = per_layer_utilization(routings)
    assert len(layers) == 2
    first = utilization_from_decision(routings[0])
    assert same(first.to_dict(), layers[0].to_dict())
    assert same(utilization_to_dicts(layers), [s.to_dict() for s in layers])
    decision = routings[0]
    assert first.num_tokens == 10 and first.max_k == 3
    assert torch.equal(selection_counts(decision), expert_counts(decision.expert_indices, 8))
    assert torch.equal(first.tokens_per_expert, selection_counts(decision))
    training = utilization_from_decision(model(torch.randn(2, 5, 16)).routings[0])
    assert training.load_balancing_loss is not None
    assert not training.load_balancing_loss.requires_grad  # no graph kept alive
    assert training.complexity is not None and not training.complexity.mean.requires_grad
    assert first.to_dict()["load_balancing_loss"] == float(decision.load_balancing_loss)
    assert first.to_dict()["dropped_pairs"] == 0
    summary = first.summary()
    assert summary["mean_k"] == pytest.approx(decision.k_per_token.double().mean().item())
    assert set(summary) >= {"cv", "max_vio", "entropy", "gini", "dead_count", "compute_saved"}


# ----------------------------------------------------------------------------- the per-token loop


@st.composite
def logits_and_k(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seq, experts = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["normal", "ties", "special", "bf16"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if kind == "ties":  # many ties at every k boundary
        logits = torch.randint(-2, 3, (batch, seq, experts), generator=gen).float()
    elif kind == "special":
        pool = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, 3.4e38, -3.4e38])
        logits = pool[torch.randint(0, len(pool), (batch, seq, experts), generator=gen)]
    else:
        logits = torch.randn(batch, seq, experts, generator=gen)
        logits = logits.bfloat16() if kind == "bf16" else logits
    k = torch.randint(0, experts + 1, (batch, seq), generator=gen)
    return logits, k


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logits_and_k())
def test_debug_expert_selection_equals_the_loop(case: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, k = case
    assert debug_expert_selection(logits, k) == seed_debug_expert_selection(logits, k)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logits_and_k())
def test_debug_expert_selection_topk_thresholds_equal_the_loop(
    case: tuple[torch.Tensor, torch.Tensor],
) -> None:
    # The accelerator branch (thresholds from one topk), exercised on CPU.
    logits, k = case
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(selection, "_PASS_DEVICES", ())
        assert debug_expert_selection(logits, k) == seed_debug_expert_selection(logits, k)


def test_debug_expert_selection_equals_the_loop_across_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(selection, "_CHUNK_TOKENS", 256)  # 1200 tokens: 5 blocks, last partial
    gen = torch.Generator().manual_seed(4)
    k = torch.randint(0, 17, (2, 600), generator=gen)
    ties = torch.randint(-3, 4, (2, 600, 16), generator=gen).float()
    distinct = torch.randn(2, 600, 16, generator=gen)
    for logits in (ties, distinct):
        assert debug_expert_selection(logits, k) == seed_debug_expert_selection(logits, k)
    counts = debug_expert_selection(distinct, k)
    assert [counts[e] for e in range(16)] == selection_counts_from_logits(distinct, k).tolist()


def test_debug_expert_selection_float64_keeps_close_values_apart() -> None:
    logits = torch.tensor([[[1.0, 1.0 + 1e-12, 0.0]]], dtype=torch.float64)
    assert debug_expert_selection(logits, torch.tensor([[1]])) == Counter({1: 1})


def test_debug_expert_selection_all_k_zero_is_empty() -> None:
    # No token selects an expert: the counts are empty.
    assert debug_expert_selection(torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.int64)) == {}


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("logits", "k", "error", "match"),
    [
        (
            torch.randn(2, 3, 4),
            torch.ones(2, 4, dtype=torch.int64),
            ValueError,
            r"k_values.*\(2, 3\).*\(2, 4\)",
        ),
        (torch.randn(2, 3, 4), torch.ones(2, 3), TypeError, "k_values must be an integer.*float32"),
        (torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), TypeError, "integer"),
        (torch.randn(2, 3, 4), torch.full((2, 3), 5), ValueError, r"\[0, num_experts=4\].*max=5"),
        (torch.randn(2, 3, 4), torch.full((2, 3), -1), ValueError, "min=-1"),
        (
            torch.randn(0, 3, 4),
            torch.ones(0, 3, dtype=torch.int64),
            ValueError,
            "at least one token",
        ),
        (torch.randn(2, 3, 0), torch.ones(2, 3, dtype=torch.int64), ValueError, "num_experts >= 1"),
        (
            torch.ones(2, 3, 4, dtype=torch.int64),
            torch.ones(2, 3, dtype=torch.int64),
            TypeError,
            "floating",
        ),
        (
            [[0.0]],
            torch.ones(1, dtype=torch.int64),
            TypeError,
            "router_logits must be a torch.Tensor",
        ),
    ],
)
def test_debug_expert_selection_bad_input(
    logits: object, k: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        debug_expert_selection(logits, k)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("indices", "num_experts", "error", "match"),
    [
        (torch.tensor([[0, 4]]), 4, ValueError, r"\[-1, num_experts=4\).*max=4"),
        (torch.tensor([[0, -2]]), 4, ValueError, "min=-2"),
        (torch.zeros(0, 2, dtype=torch.int64), 4, ValueError, "at least one token"),
        (torch.tensor([[0.0, 1.0]]), 4, TypeError, "expert_indices must be an integer"),
        (torch.tensor([[0, 1]]), 0, ValueError, "num_experts must be an int >= 1"),
        (torch.tensor([[0, 1]]), None, ValueError, "num_experts must be an int >= 1"),
    ],
)
def test_indices_bad_input(
    indices: torch.Tensor, num_experts: int, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        selection_counts(indices, num_experts)
    with pytest.raises(error, match=match):
        utilization_from_indices(indices, num_experts)


def test_validate_false_skips_range_checks() -> None:
    # The inspector's hot path: no host sync; out-of-range values are ignored, not fatal.
    assert selection_counts(torch.tensor([[0, -5], [7, 1]]), 2, validate=False).tolist() == [1, 1]


def test_count_selections_equals_router_expert_counts() -> None:
    indices = torch.randint(-1, 16, (300, 4), generator=torch.Generator().manual_seed(7))
    assert torch.equal(count_selections(indices, 16), expert_counts(indices, 16))
    assert torch.equal(count_selections(indices.int(), 16), expert_counts(indices, 16))


def test_hot_paths_read_no_values() -> None:
    # On the meta device any host read (item, bool, nonzero) raises: proof of no host sync.
    logits, k = torch.randn(64, 16, device="meta"), torch.randint(0, 5, (64,), device="meta")
    indices = selected_experts(logits, k, max_k=4, validate=False)
    stats = utilization_from_indices(
        indices, 16, router_logits=logits, complexity=torch.rand(64, device="meta"),
        capacity_factor=1.25, validate=False,
    )  # fmt: skip
    assert stats.co_activation.shape == (16, 16)
    assert utilization_from_logits(logits, k, max_k=4, validate=False).k_histogram.shape == (5,)


def test_other_bad_arguments() -> None:
    logits, k = torch.randn(4, 3), torch.tensor([1, 2, 3, 1])
    with pytest.raises(ValueError, match="max_k must be >= the largest k; got max_k=2"):
        utilization_from_logits(logits, k, max_k=2)
    with pytest.raises(ValueError, match="max_k must be an int in"):
        selected_experts(logits, k, max_k=4)
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0"):
        utilization_from_logits(logits, k, capacity_factor=0.0)
    with pytest.raises(ValueError, match=r"complexity must hold one score per token \(4\)"):
        utilization_from_logits(logits, k, complexity=torch.rand(5))
    with pytest.raises(ValueError, match=r"router_logits must have shape \(1, 2\)"):
        utilization_from_indices(torch.tensor([[0, 1]]), 2, router_logits=torch.randn(2, 2))
    with pytest.raises(TypeError, match="decision must be a RoutingDecision"):
        utilization_from_decision(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="decisions must hold one RoutingDecision"):
        per_layer_utilization([])
    with pytest.raises(ValueError, match="complexity must hold at least one score"):
        complexity_stats(torch.zeros(0))


def test_histogram_count_equals_the_index_add_count_with_stray_values() -> None:
    """CUDA counts with histc, the CPU with index_add_: the same buckets, strays dropped."""
    from moe_devkit.diagnostics.utilization.selection import count_selections
    from moe_devkit.routers.torch_router import count_values

    values = torch.randint(-3, 9, (500, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(count_values(values, 6), count_selections(values, 6))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_counting_paths_do_not_sync_on_cuda() -> None:
    gen = torch.Generator(device="cuda").manual_seed(5)
    logits = torch.randn(4096, 64, device="cuda", generator=gen)
    k = torch.randint(0, 9, (4096,), device="cuda", generator=gen)
    complexity = torch.rand(4096, device="cuda", generator=gen)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        indices = selected_experts(logits, k, max_k=8, validate=False)
        counts = selection_counts(indices, 64, validate=False)
        stats = utilization_from_indices(
            indices, 64, router_logits=logits, complexity=complexity, capacity_factor=1.25,
            validate=False,
        )  # fmt: skip
        from_logits = utilization_from_logits(
            logits, k, max_k=8, complexity=complexity, validate=False
        )
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(counts, stats.tokens_per_expert)
    assert torch.equal(counts.cpu(), selection_counts(indices.cpu(), 64))  # histc = index_add_
    assert same(stats.to_dict(), utilization_to_dicts([stats])[0])
    assert same(from_logits.to_dict()["balance"], stats.to_dict()["balance"])


@pytest.mark.gpu
def test_debug_expert_selection_equals_seed_on_cuda() -> None:
    gen = torch.Generator(device="cuda").manual_seed(6)
    ties = torch.randint(-2, 3, (2, 64, 16), device="cuda", generator=gen).float()
    normal = torch.randn(2, 64, 16, device="cuda", generator=gen)
    k = torch.randint(0, 17, (2, 64), device="cuda", generator=gen)
    for logits in (ties, normal):
        assert debug_expert_selection(logits, k) == seed_debug_expert_selection(logits, k)


def test_utilization_from_logits_with_no_slots() -> None:
    stats = utilization_from_logits(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), max_k=0)
    assert stats.max_k == 0 and stats.k_histogram.tolist() == [4]
    assert stats.balance.tokens_per_expert.tolist() == [0, 0, 0]
    assert bool(stats.balance.dead.all())
    with pytest.raises(
        ValueError, match=r"max_k must be >= the largest k; got max_k=0, largest k=1"
    ):
        utilization_from_logits(torch.randn(2, 3), torch.tensor([1, 0]), max_k=0)

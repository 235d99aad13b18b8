"""Routing traces: recording from a real tiny Mixtral and the reference MoEModel, the .npz
round trip, the token budget, padding, and compare_traces against expert sets recomputed
directly from each router's input."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hf_zoo import build_tiny
from torch import nn

from moe_devkit.inspect import RouterInspector
from moe_devkit.inspect.trace import (
    RoutingTrace,
    RoutingTraceRecorder,
    compare_traces,
    disagreement_by_position,
)
from moe_devkit.routers.torch_router import MoEModel, RouterConfig


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mixtral() -> nn.Module:
    torch.manual_seed(0)
    return build_tiny("mixtral").eval()


def _inputs(batch: int = 3, length: int = 9, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, length), generator=generator)


def _record(model: nn.Module, ids: torch.Tensor, **kwargs: Any) -> RoutingTrace:
    mask = kwargs.pop("attention_mask", torch.ones_like(ids))
    with RoutingTraceRecorder(model, **kwargs) as recorder, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    return recorder.trace()


def _gates(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name.endswith("mlp.gate")}


def _direct_topk(model: nn.Module, ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per gate: (indices [N, k], probabilities [N, E]) recomputed from the gate's input with
    its weight: softmax, top-k (Mixtral's definition), independent of the recorder."""
    found: dict[str, tuple[torch.Tensor, ...]] = {}
    handles = []
    for name, gate in _gates(model).items():

        def hook(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            hidden = args[0].reshape(-1, args[0].shape[-1])
            probs = F.softmax(F.linear(hidden, mod.weight).float(), dim=-1)
            found[name] = (probs.topk(mod.top_k, dim=-1).indices, probs)

        handles.append(gate.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for handle in handles:
            handle.remove()
    return found


def test_layout_of_a_mixtral_trace(mixtral: nn.Module) -> None:
    ids = _inputs()
    trace = _record(mixtral, ids, weights=True)
    direct = _direct_topk(mixtral, ids)
    assert trace.layers == list(direct)
    assert trace.expert_ids.shape == (27, 3, 2) and trace.expert_ids.dtype == np.int32
    assert trace.num_experts == [8, 8, 8]
    np.testing.assert_array_equal(trace.token_ids, ids.reshape(-1).numpy())
    np.testing.assert_array_equal(trace.sequence, np.repeat(np.arange(3), 9))
    np.testing.assert_array_equal(trace.positions, np.tile(np.arange(9), 3))
    assert trace.weights is not None
    for j, (indices, probs) in enumerate(direct.values()):
        recorded = np.sort(trace.expert_ids[:, j], axis=1)
        np.testing.assert_array_equal(recorded, np.sort(indices.numpy(), axis=1))
        top = probs.gather(1, torch.from_numpy(trace.expert_ids[:, j]).long())
        np.testing.assert_allclose(trace.weights[:, j], top / top.sum(1, keepdim=True), rtol=1e-5)


def test_same_model_twice_compares_identical(mixtral: nn.Module) -> None:
    ids = _inputs()
    a = _record(mixtral, ids, weights=True)
    b = _record(mixtral, ids, weights=True)
    result = compare_traces(a, b)
    assert result.tokens_compared == 27 and result.tokens_only_a == result.tokens_only_b == 0
    assert result.any_layer_differs == 0.0 and result.identical
    for layer in result.layers:
        assert (layer.set_differs, layer.top1_flip, layer.k_abs_diff, layer.k_differs) == (
            0,
            0,
            0,
            0,
        )
        assert layer.jaccard == 1.0 and layer.weight_abs_error == 0.0


def test_perturbed_router_flips_what_a_direct_topk_says(mixtral: nn.Module) -> None:
    ids = _inputs(batch=4, length=16)
    perturbed = copy.deepcopy(mixtral)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for gate in _gates(perturbed).values():
            noise = torch.randn(gate.weight.shape, generator=generator)
            gate.weight.add_(0.5 * gate.weight.std() * noise)
    a = _record(mixtral, ids, weights=True)
    b = _record(perturbed, ids, weights=True)
    result = compare_traces(a, b)
    direct_a, direct_b = _direct_topk(mixtral, ids), _direct_topk(perturbed, ids)
    any_differs = torch.zeros(64, dtype=torch.bool)
    for layer, name in zip(result.layers, direct_a, strict=True):
        (idx_a, probs_a), (idx_b, probs_b) = direct_a[name], direct_b[name]
        set_a = torch.zeros(64, 8, dtype=torch.bool).scatter_(1, idx_a, True)
        set_b = torch.zeros(64, 8, dtype=torch.bool).scatter_(1, idx_b, True)
        differs = (set_a != set_b).any(1)
        any_differs |= differs
        flips = probs_a.argmax(1) != probs_b.argmax(1)
        jaccard = (set_a & set_b).sum(1) / (set_a | set_b).sum(1)
        assert layer.layer == name
        assert layer.set_differs == pytest.approx(differs.float().mean().item())
        assert layer.top1_flip == pytest.approx(flips.float().mean().item())
        assert layer.jaccard == pytest.approx(jaccard.mean().item())
        assert (layer.k_abs_diff, layer.k_differs) == (0.0, 0.0)
        assert layer.weight_abs_error is not None and layer.weight_abs_error > 0
        by_position = differs.reshape(4, 16).float().mean(0).numpy()  # sequences x positions
        grid = disagreement_by_position(result)[result.layers.index(layer)]
        np.testing.assert_allclose(grid, by_position)
    assert result.any_layer_differs == pytest.approx(any_differs.float().mean().item())
    assert 0 < result.any_layer_differs < 1  # the noise moves some tokens, not all
    assert not result.identical


def test_save_load_round_trip(mixtral: nn.Module, tmp_path: Path) -> None:
    ids = _inputs()
    for weights in (True, False):
        trace = _record(mixtral, ids, weights=weights, metadata={"revision": "a1"})
        path = trace.save(tmp_path / f"t{weights}.npz")
        loaded = RoutingTrace.load(path)
        for name in ("expert_ids", "token_ids", "positions", "sequence"):
            np.testing.assert_array_equal(getattr(loaded, name), getattr(trace, name))
        assert (loaded.layers, loaded.num_experts) == (trace.layers, trace.num_experts)
        assert loaded.metadata == {"revision": "a1"}
        if weights:
            assert loaded.weights is not None and trace.weights is not None
            np.testing.assert_array_equal(loaded.weights, trace.weights)
        else:
            assert loaded.weights is None
        with np.load(path) as raw:
            assert raw["expert_ids"].dtype == np.int32 and raw["token_ids"].dtype == np.int64


def test_load_rejects_what_is_not_a_trace(tmp_path: Path) -> None:
    text = tmp_path / "a.npz"
    text.write_text("not an archive")
    with pytest.raises(ValueError, match=r"not an \.npz routing trace"):
        RoutingTrace.load(text)
    other = tmp_path / "b.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ValueError, match="no expert_ids, token_ids, positions, sequence"):
        RoutingTrace.load(other)
    with pytest.raises(FileNotFoundError):
        RoutingTrace.load(tmp_path / "missing.npz")
    arrays = {name: np.zeros(2, np.int64) for name in ("token_ids", "positions", "sequence")}
    arrays["expert_ids"] = np.zeros((2, 1, 1), np.int32)
    for header, message in [
        ({"format": "other", "version": 1}, "expected format 'moe-devkit-routing-trace'"),
        ({"format": "moe-devkit-routing-trace", "version": 99}, "version must be <= 1"),
        (
            {"format": "moe-devkit-routing-trace", "version": 1, "layers": ["a", "b"]},
            r"expert_ids must be \[T, L, K\] with L=2 layers",
        ),
    ]:
        path = tmp_path / "header.npz"
        np.savez(path, header=np.array(json.dumps(header)), **arrays)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=message):
            RoutingTrace.load(path)


def test_token_budget_bounds_rows_and_memory(mixtral: nn.Module) -> None:
    full = _record(mixtral, _inputs(batch=3, length=7))
    recorder = RoutingTraceRecorder(mixtral, max_tokens=10).attach()
    with torch.no_grad():
        for _ in range(3):  # 21 tokens a call: only the first 10 of the first are kept
            mixtral(input_ids=_inputs(batch=3, length=7))
    recorder.detach()
    trace = recorder.trace()
    assert trace.num_tokens == 10 and recorder.rows_used == 10
    # what the recorder held at most: the first call's int64 input ids [3, 7] and its 3
    # layers' int64 experts [21, 2] (cut to its first 10 rows when copied); the later calls,
    # past the budget, hold nothing: nothing grows
    assert recorder.device_bytes == 3 * 7 * 8 + 3 * 21 * 2 * 8
    np.testing.assert_array_equal(trace.expert_ids, full.expert_ids[:10])
    np.testing.assert_array_equal(trace.token_ids, full.token_ids[:10])


def test_chunks_are_flushed_and_equal_one_buffer(mixtral: nn.Module) -> None:
    calls = [_inputs(batch=1, length=7, seed=s) for s in range(4)]
    traces = []
    for chunk in (7, None):
        recorder = RoutingTraceRecorder(mixtral, max_tokens=24, weights=True, chunk_tokens=chunk)
        with recorder, torch.no_grad():
            for ids in calls:
                mixtral(input_ids=ids)
        traces.append(recorder.trace())
    chunked, whole = traces
    assert chunked.num_tokens == whole.num_tokens == 24  # 3 calls and 3 rows of the fourth
    np.testing.assert_array_equal(chunked.sequence, np.repeat(np.arange(4), 7)[:24])
    np.testing.assert_array_equal(chunked.expert_ids, whole.expert_ids)
    assert chunked.weights is not None and whole.weights is not None
    np.testing.assert_array_equal(chunked.weights, whole.weights)
    assert compare_traces(chunked, whole).identical


def test_every_records_one_call_in_n(mixtral: nn.Module) -> None:
    calls = [_inputs(batch=2, length=4, seed=s) for s in range(5)]
    recorder = RoutingTraceRecorder(mixtral, every=2)
    with recorder, torch.no_grad():
        for ids in calls:
            mixtral(input_ids=ids)
    trace = recorder.trace()
    assert recorder.calls == 5
    np.testing.assert_array_equal(trace.sequence, np.repeat([0, 1, 4, 5, 8, 9], 4))
    kept = torch.cat([calls[0], calls[2], calls[4]]).reshape(-1).numpy()
    np.testing.assert_array_equal(trace.token_ids, kept)
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        RoutingTraceRecorder(mixtral, every=0)


def test_pad_tokens_are_not_recorded(mixtral: nn.Module) -> None:
    ids = _inputs(batch=3, length=8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    trace = _record(mixtral, ids, attention_mask=mask)
    assert trace.num_tokens == int(mask.sum())
    np.testing.assert_array_equal(trace.token_ids, ids[mask.bool()].numpy())
    np.testing.assert_array_equal(trace.sequence, np.repeat([0, 1, 2], [8, 5, 5]))
    expected = np.concatenate([np.arange(8), np.arange(5), np.arange(5)])
    np.testing.assert_array_equal(trace.positions, expected)  # counted over non-pad tokens
    assert (trace.expert_ids >= 0).all()


def test_generate_continues_each_sequence(mixtral: nn.Module) -> None:
    prompts = [_inputs(batch=2, length=5, seed=s) for s in (1, 2)]
    outputs = []
    with RoutingTraceRecorder(mixtral) as recorder, torch.no_grad():
        for ids in prompts:  # each generate: its own cache, its own two sequences
            outputs.append(
                mixtral.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False
                )
            )
    trace = recorder.trace()
    order = np.lexsort((trace.positions, trace.sequence))
    # the last generated token is never fed back: 5 prompt + 2 new tokens per sequence
    np.testing.assert_array_equal(trace.sequence[order], np.repeat([0, 1, 2, 3], 7))
    np.testing.assert_array_equal(trace.positions[order], np.tile(np.arange(7), 4))
    expected = torch.cat([out[:, :7] for out in outputs]).reshape(-1).numpy()
    np.testing.assert_array_equal(trace.token_ids[order], expected)


def test_beside_an_inspector_the_counts_agree(mixtral: nn.Module) -> None:
    ids = _inputs(batch=2, length=8)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    inspector = RouterInspector(mixtral)
    with inspector, RoutingTraceRecorder(mixtral) as recorder, torch.no_grad():
        mixtral(input_ids=ids, attention_mask=mask)
    trace = recorder.trace()
    layers = inspector.summary().layers
    for j, name in enumerate(trace.layers):
        counts = np.bincount(trace.expert_ids[:, j].reshape(-1), minlength=8)
        assert layers[name]["utilization"]["counts"] == counts.tolist()


def test_reference_model_without_token_ids_and_k_differences() -> None:
    torch.manual_seed(0)
    config = RouterConfig(hidden_size=16, num_experts=6, max_k=3, expert_hidden_size=16)
    model = MoEModel(config, num_layers=2).eval()
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in perturbed.named_parameters():
            if "router" in name and parameter.numel() > 1:
                parameter.add_(0.5 * parameter.std() * torch.randn_like(parameter))
            elif "router" in name:  # the complexity estimator's output bias: k moves
                parameter.add_(2.0)
    x = torch.randn(2, 5, 16)
    traces, outputs = [], []
    for net in (model, model, perturbed):
        with RoutingTraceRecorder(net, weights=True) as recorder, torch.no_grad():
            outputs.append(net(x))
        traces.append(recorder.trace())
    assert traces[0].num_tokens == 10 and (traces[0].token_ids == -1).all()
    assert traces[0].num_experts == [6, 6]
    assert compare_traces(traces[0], traces[1]).identical
    result = compare_traces(traces[0], traces[2])
    for j, layer in enumerate(result.layers):
        k_a = outputs[0].routings[j].k_per_token
        k_b = outputs[2].routings[j].k_per_token
        assert layer.k_abs_diff == pytest.approx((k_a - k_b).abs().float().mean().item())
        assert layer.k_differs == pytest.approx((k_a != k_b).float().mean().item())
    assert sum(layer.k_differs for layer in result.layers) > 0  # dynamic k moved


def test_compare_errors(mixtral: nn.Module) -> None:
    a = _record(mixtral, _inputs(seed=1))
    other = _record(mixtral, _inputs(seed=2))
    with pytest.raises(ValueError, match=r"not of the same inputs: .* first at sequence 0"):
        compare_traces(a, other)
    renamed = copy.copy(a)
    renamed.layers = ["x", "y", "z"]
    with pytest.raises(ValueError, match="share no layer"):
        compare_traces(a, renamed)
    shifted = copy.copy(a)
    shifted.sequence = a.sequence + 100
    with pytest.raises(ValueError, match=r"share no \(sequence, position\)"):
        compare_traces(a, shifted)
    twice = copy.copy(a)
    twice.sequence = np.zeros_like(a.sequence)
    with pytest.raises(ValueError, match="holds position 0 of sequence 0 more than once"):
        compare_traces(twice, a)

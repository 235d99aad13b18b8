"""Router outputs kept by reference and built in batches (inspect.raw) equal the decisions
built at each step (decision_from_router_outputs + exclude_tokens), on CPU and CUDA."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from moe_devkit.inspect import InspectorConfig, RouterInspector
from moe_devkit.inspect.adapters import decision_from_router_outputs, exclude_tokens
from moe_devkit.inspect.raw import RawInputs, RawRouting, steps_from_raw
from moe_devkit.inspect.signals import decision_sums

transformers = pytest.importorskip("transformers")

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logits(steps: int, tokens: int, experts: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(steps, tokens, experts, generator=generator) * 2
    logits[0, 1, 2] = math.nan  # a non-finite token
    logits[1, 3, :] = -math.inf  # every logit -inf: not finite
    logits[2, 0, 1] = -math.inf  # one -inf logit: finite, p = 0
    return logits


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("masked", [False, True])
def test_a_batch_equals_the_decisions_built_at_each_step(scoring: str, masked: bool) -> None:
    steps, tokens, experts, k = 4, 9, 6, 2
    logits = _logits(steps, tokens, experts)
    indices = torch.nan_to_num(logits, nan=0.0).topk(k, dim=-1).indices
    indices[3, 4, 1] = -1  # a padded slot
    keep = torch.rand(steps, tokens, generator=torch.Generator().manual_seed(1)) > 0.3
    built = steps_from_raw(
        RawInputs(logits.bfloat16().float(), indices, keep if masked else None),
        scoring,  # type: ignore[arg-type]
    )
    lb, z = built.merged.losses.view(2, steps)
    for s in range(steps):
        decision = decision_from_router_outputs(
            logits[s].bfloat16().float(),
            indices[s],
            scoring=scoring,  # type: ignore[arg-type]
        )
        if masked:
            decision = exclude_tokens(decision, keep[s])
        rows = slice(s * tokens, (s + 1) * tokens)
        merged = built.merged
        assert torch.equal(merged.indices[rows], decision.expert_indices)
        assert torch.equal(merged.k[rows], decision.k_per_token)
        assert torch.equal(merged.nonfinite[rows], decision.nonfinite)
        torch.testing.assert_close(
            merged.complexity[rows], decision.complexity, equal_nan=True, rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(lb[s], decision.load_balancing_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z[s], decision.z_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(built.aux_sums[s], decision_sums(decision), rtol=1e-6, atol=1e-6)


def _mixtral() -> Any:
    config = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
    )
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config)


def _run(
    device: str, config: InspectorConfig, eager: bool, steps: int = 23
) -> tuple[RouterInspector, list[dict[str, Any]]]:
    """Trains a tiny Mixtral for ``steps`` steps on padded batches, watched by an inspector
    (``eager``: every decision built at its step, as without the batched path)."""
    model = _mixtral().to(device).train()
    inspector = RouterInspector(config=config)
    if eager:
        inspector._emit_raw = None  # type: ignore[assignment,method-assign]
    inspector.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(3)
    windows = []
    for step in range(steps):
        ids = torch.randint(0, 64, (3, 7), generator=generator)
        mask = torch.ones(3, 7, dtype=torch.long)
        mask[step % 3, : 1 + step % 4] = 0  # left padding, changing from step to step
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=ids.to(device))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (6, 15):
            windows.append(inspector.metrics())
    return inspector, windows


def _close(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        a, b = a.double(), b.double()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _close(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _close(x, y)
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6, nan_ok=True)
    else:
        assert a == b


@pytest.mark.parametrize("device", DEVICES)
def test_a_training_run_records_what_decisions_built_at_each_step_record(device: str) -> None:
    """Every statistic (counts, the (complexity, k) histogram, losses, moments, co-activation,
    the reservoir, trend snapshots), the live windows and the aux-loss history agree."""
    config = InspectorConfig(window=5, coactivation_every=3, reservoir_every=4, batch_steps=6)
    batched, batched_windows = _run(device, config, eager=False)
    eager, eager_windows = _run(device, config, eager=True)
    assert any(state._raw_sums or not state.graphed for state in batched.layers.values())
    for name, state in batched.layers.items():
        mine, theirs = state.host_state(), eager.layers[name].host_state()
        for field in ("counts", "selected", "joint", "coactivation", "sample_k"):
            assert torch.equal(getattr(mine, field), getattr(theirs, field)), field
        assert (mine.steps, mine.dropped, mine.snapshot_steps) == (
            theirs.steps,
            theirs.dropped,
            theirs.snapshot_steps,
        )
        for field in ("loss_sums", "moments", "extrema", "snapshots", "sample_complexity"):
            _close(getattr(mine, field), getattr(theirs, field))
    _close(batched_windows, eager_windows)
    aux, eager_aux = batched.summary().aux_loss, eager.summary().aux_loss
    assert aux is not None and eager_aux is not None
    assert aux["compared_steps"] == eager_aux["compared_steps"] == 23
    _close(aux["history"], eager_aux["history"])
    _close(aux["ratio"], eager_aux["ratio"])


class _Scaling(torch.nn.Module):
    """A router wrapper that rescales its logits in place after the router returned them."""

    def __init__(self, router: torch.nn.Module) -> None:
        super().__init__()
        self.router = router

    def forward(self, hidden: torch.Tensor) -> Any:
        logits, weights, indices = self.router(hidden)
        logits.mul_(2.0)  # after the router's forward hook has run
        return logits, weights, indices


def test_a_layer_whose_router_outputs_change_in_place_is_read_at_each_step() -> None:
    model = _mixtral().eval()
    for layer in model.model.layers:
        layer.mlp.gate = _Scaling(layer.mlp.gate)
    inspector = RouterInspector(config=InspectorConfig(batch_steps=4)).attach(model)
    with torch.no_grad():
        for step in range(6):
            model(torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(step)))
    routers = {name for name in inspector.layers if name.endswith(".router")}
    assert len(routers) == 2 and inspector._raw_refused == routers
    assert all(not state._raw for state in inspector.layers.values())
    for i in range(2):  # what the router layer counted is what its experts received
        router = inspector.layers[f"model.layers.{i}.mlp.gate.router"].host_state()
        experts = inspector.layers[f"model.layers.{i}.mlp.experts"].host_state()
        assert router.steps == experts.steps == 6
        assert torch.equal(router.counts, experts.counts)


def test_padding_slots_count_nothing() -> None:
    """A captured batch shorter than its slots is padded with calls (raw router outputs)
    or steps (decisions) that count nothing: the statistics equal the unpadded fold's."""
    from moe_devkit.inspect.records import MergedSteps, StepTensors
    from moe_devkit.inspect.state import LayerState, _empty_step

    config = InspectorConfig()
    steps, tokens, experts, k = 3, 9, 6, 2
    logits = _logits(steps, tokens, experts)
    indices = torch.nan_to_num(logits, nan=0.0).topk(k, dim=-1).indices
    keep = torch.ones(tokens, dtype=torch.bool)
    raws = [
        RawRouting(logits[s], indices[s], keep, "softmax", s, (0, 0))  # type: ignore[arg-type]
        for s in range(steps)
    ]
    padded = [*raws, raws[0].padding(), raws[0].padding()]
    plain = LayerState("a", experts, k, torch.device("cpu"), config)
    filled = LayerState("b", experts, k, torch.device("cpu"), config)
    sums = plain._fold_raw_inputs(RawInputs.stack(raws), "softmax")
    padded_sums = filled._fold_raw_inputs(RawInputs.stack(padded), "softmax")
    assert torch.equal(sums, padded_sums[:steps])
    decisions = []
    for s in range(steps):
        decision = decision_from_router_outputs(logits[s], indices[s])
        decisions.append(StepTensors.of(decision))
    pads = [_empty_step(decisions[0])] * 2
    plain._fold_merged(MergedSteps.concat(decisions))
    filled._fold_merged(MergedSteps.concat([*decisions, *pads]))
    for name, tensor in plain.stats.tensors().items():
        torch.testing.assert_close(tensor, filled.stats.tensors()[name], equal_nan=True)
    # A batch opened by a periodic step: co-activation and reservoir take its first step
    # only, padded or not, as the first step folded alone with them would.
    alone = LayerState("c", experts, k, torch.device("cpu"), config)
    for state, batch in ((plain, decisions), (filled, [*decisions, *pads])):
        state._fold_merged(MergedSteps.concat(batch), (True, True), first=tokens)
    alone._fold_merged(MergedSteps.concat(decisions[:1]), (True, True))
    assert alone.stats.coactivation.sum() > 0
    for state in (plain, filled):
        torch.testing.assert_close(state.stats.coactivation, alone.stats.coactivation)
        for name in ("res_keys", "res_k", "res_complexity", "tokens_seen"):
            torch.testing.assert_close(
                getattr(state.stats, name), getattr(alone.stats, name), equal_nan=True
            )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_defers_reference_decisions_to_the_same_statistics() -> None:
    """In training on CUDA the reference routers' decisions are deferred (up to batch_steps)
    and folded from a padded captured graph, also when a read folds them with autograd on
    (their losses require grad); the statistics equal eager per-step updates."""
    from moe_devkit import MoEModel, RouterConfig

    config = RouterConfig(hidden_size=32, num_experts=8, max_k=3, expert_hidden_size=32)
    results = []
    for graphs in (True, False):
        torch.manual_seed(0)
        model = MoEModel(config, num_layers=2).cuda()
        inspector = RouterInspector(config=InspectorConfig(cuda_graphs=graphs))
        inspector.attach(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(4, 16, 32, device="cuda")
        windows = []
        for step in range(23):
            out = model(x)
            (out.hidden_states.square().mean() + out.aux_loss).backward()
            optimizer.step()
            optimizer.zero_grad()
            if step in (6, 12, 19):  # reads with deferred steps, under autograd
                windows.append(inspector.metrics())
        if graphs:
            assert any(state._step_pad for state in inspector.layers.values())
        results.append((inspector, windows))
    (graphed, graphed_windows), (eager, eager_windows) = results
    for name, state in graphed.layers.items():
        mine, theirs = state.host_state(), eager.layers[name].host_state()
        for field in ("counts", "selected", "joint", "coactivation", "sample_k"):
            assert torch.equal(getattr(mine, field), getattr(theirs, field)), field
        for field in ("loss_sums", "moments", "extrema", "snapshots", "sample_complexity"):
            _close(getattr(mine, field), getattr(theirs, field))
    _close(graphed_windows, eager_windows)

"""RoutingTraceRecorder during training and at a full budget: the routing weights of a training
step are recorded detached (what it holds joins no autograd graph), a full budget lets go of
the routers' hooks, the reference model is recorded however it is called, a recorded call
costs no op (its tensors are held and copied in batches), the batched copies record what
copies made at each call record, and tensors modified in place after their call are
refused."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hf_zoo import build_tiny
from recorder_ops import HookOps
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moe_devkit.inspect.trace import RoutingTrace, RoutingTraceRecorder
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
    held: dict[int, torch.Tensor] = {}
    with recorder:
        for x in xs:  # 10 tokens a step: the chunk is flushed before the third
            optimizer.zero_grad()
            out = model(x)
            # what the recorder holds until its next copy, read while the graph is alive
            for call in recorder._pending:
                for pair in call.layers.values():
                    held.update({id(h.tensor): h.tensor for h in pair if h is not None})
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
    # the tensors the recorder held hold no autograd graph: none of them requires grad
    # the experts and weights of both layers of the first two steps (the third fills the
    # budget: it is copied at once)
    assert len(held) == 2 * 2 * 2
    assert not any(t.requires_grad for t in held.values())


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


def test_a_recorded_call_costs_no_op() -> None:
    """A reference-model call (its router returns the decision) after the first: the
    recorder's hooks keep references to the call's experts and weights and issue no aten op,
    so a recorded call issues exactly the ops of a plain one."""
    model = _reference().eval()
    x = torch.randn(2, 5, 16)
    plain = _ops_of_a_call(model, x)
    with RoutingTraceRecorder(model, weights=True, max_tokens=100) as recorder:
        _ops_of_a_call(model, x)  # the first call of each layer is copied at once
        recorded = _ops_of_a_call(model, x)
        assert len(recorder._pending) == 2 and not recorder._chunks  # held, not copied yet
    assert recorded == plain


def test_a_transformers_router_is_recorded_without_building_its_decision() -> None:
    """Mixtral's router returns its experts and weights: the recorder holds them as they
    are (a decision would add some 60 ops a layer: probabilities, entropy, losses), and the
    masked call's token ids, mask and positions by reference too: no op."""
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
        ops()  # the first call of each layer is copied at once
        recorded = ops()
    layers = len(recorder.probes)
    assert layers == 3
    assert recorded == plain
    trace = recorder.trace()
    assert trace.num_tokens == 2 * int(mask.sum()) and trace.weights is not None
    np.testing.assert_allclose(trace.weights.sum(2), 1.0, rtol=1e-5)  # top-2, renormalised


# ----------------------------------------------------------------------------- deferred copies


CALLS = 32


@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("name", ["reference", "mixtral"])
def test_recorded_calls_cost_under_one_op_each_on_average(name: str, weights: bool) -> None:
    """Over 32 calls and the final copy of ``trace()``, the recorder issues fewer than one
    aten op a call: the first call of each layer copies its tensors (a clone each), the
    others are held by reference and copied on their device 16 calls at a time, one
    ``torch.cat`` per dtype and shape of what is held (token ids, masks, experts, weights)
    for all calls and layers; the copy to the host joins the two batches, one more
    ``torch.cat`` each (on CUDA also the pinned host buffer and the copy into it)."""
    torch.manual_seed(0)
    if name == "reference":
        model = _reference().eval()
        x = torch.randn(2, 5, 16)

        def call() -> Any:
            return model(x)

        tokens = 10
    else:
        model = build_tiny("mixtral")
        ids = torch.randint(0, 128, (2, 6))
        mask = torch.ones_like(ids)
        mask[0, :2] = 0

        def call() -> Any:
            return model(input_ids=ids, attention_mask=mask)

        tokens = int(mask.sum())
    recorder = RoutingTraceRecorder(model, weights=weights, max_tokens=10_000).attach()
    counter = HookOps(recorder)
    with counter, torch.no_grad():
        for _ in range(CALLS):
            call()
        counter.counting = True
        recorder._flush()  # what trace() copies first (none left here: 32 = 2 x 16)
        counter.counting = False
    trace = recorder.trace()  # the rest of it is host work: numpy arrays cut and joined
    recorder.detach()
    assert trace.num_tokens == CALLS * tokens
    layers = len(recorder.probes)
    tensors = 1 + weights  # held per layer and call
    inputs = 0 if name == "reference" else 2  # token ids and mask
    kinds = tensors + (inputs > 0)  # the ids and the mask are both int64 [2, 6]: one cat
    # the first call's clones, two batches of one cat per kind, one cat per kind to join them
    assert counter.ops == inputs + layers * tensors + 2 * kinds + kinds
    assert counter.ops / CALLS < 1


class _Everything(set[str]):
    """A set that holds every key: given as ``_copied``, the recorder copies every layer's
    tensors and the inputs at each call (eager recording)."""

    def __contains__(self, key: object) -> bool:
        return True


def _record(
    model: nn.Module, calls: list[Callable[[], Any]], *, eager: bool, **kwargs: Any
) -> tuple[RoutingTrace, RoutingTraceRecorder]:
    recorder = RoutingTraceRecorder(model, **kwargs)
    if eager:
        recorder._copied = _Everything()
    with recorder, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing is refused
        for call in calls:
            call()
    assert not recorder._pending  # detach() copied what was held
    return recorder.trace(), recorder


def _assert_same(a: RoutingTrace, b: RoutingTrace) -> None:
    for name in ("expert_ids", "token_ids", "positions", "sequence"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.layers, a.num_experts) == (b.layers, b.num_experts)
    assert (a.weights is None) == (b.weights is None)
    if a.weights is not None and b.weights is not None:
        np.testing.assert_array_equal(a.weights, b.weights)


@pytest.fixture(scope="module")
def mixtral() -> nn.Module:
    return build_tiny("mixtral")


def _ids(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=generator)


def _scenario(name: str, mixtral: nn.Module) -> tuple[nn.Module, list[Callable[[], Any]], dict]:  # type: ignore[type-arg]
    """(model, calls, recorder arguments) of a recording case; calls of 2-3 rows of 3-7
    tokens, so that batches hold calls of several shapes."""
    generator = torch.Generator().manual_seed(1)
    shapes = [(2 + i % 2, 3 + i % 5) for i in range(20)]
    if name == "reference":
        model = _reference()
        xs = [torch.randn(b, n, 16, generator=generator) for b, n in shapes]
        return model, [lambda x=x: model(x) for x in xs], {}
    calls: list[Callable[[], Any]] = []
    for i, (b, n) in enumerate(shapes):
        ids = _ids(b, n, generator)
        mask = torch.ones_like(ids)
        mask[0, : i % 3] = 0  # left padding in two calls of three
        if name == "inputs_embeds":
            embeds = mixtral.get_input_embeddings()(ids).detach()
            calls.append(lambda e=embeds, m=mask: mixtral(inputs_embeds=e, attention_mask=m))
        elif name == "position_ids":
            positions = torch.arange(2, 2 + n).unsqueeze(0)
            calls.append(lambda x=ids, p=positions: mixtral(input_ids=x, position_ids=p))
        else:
            calls.append(lambda x=ids, m=mask: mixtral(input_ids=x, attention_mask=m))
    if name in ("generate", "generate_padded"):
        prompts = [_ids(2, 5, generator) for _ in range(3)]
        masks = [torch.ones_like(p) for p in prompts]
        if name == "generate_padded":  # left padding: the steps' masks start with pads
            for i, mask in enumerate(masks):
                mask[i % 2, : 1 + i] = 0
        calls = [
            lambda p=p, m=m: mixtral.generate(
                p, attention_mask=m, max_new_tokens=4, do_sample=False
            )
            for p, m in zip(prompts, masks, strict=True)
        ]
    options = {
        "every": {"every": 2},
        # 20 calls of 6 to 21 tokens: the budget fills in the eighth call, the second of the
        # third batch of three
        "budget": {"max_tokens": 80, "batch_calls": 3},
        "chunk": {"chunk_tokens": 5},  # every call keeps its first 5 tokens
        "chunks": {"chunk_tokens": 23, "batch_calls": 3},
    }
    return mixtral, calls, options.get(name, {})


SCENARIOS = [
    "reference",
    "padded",
    "inputs_embeds",
    "position_ids",
    "generate",
    "generate_padded",
    "every",
    "budget",
    "chunk",
    "chunks",
]


@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("name", SCENARIOS)
def test_batched_copies_record_what_copies_at_each_call_record(
    name: str, weights: bool, mixtral: nn.Module
) -> None:
    model, calls, options = _scenario(name, mixtral)
    deferred, recorder = _record(model, calls, eager=False, weights=weights, **options)
    eager, _ = _record(model, calls, eager=True, weights=weights, **options)
    _assert_same(deferred, eager)
    assert deferred.num_tokens > 0 and not recorder.modified and not recorder.skipped
    if name == "budget":
        assert recorder.rows_used == 80 and recorder.calls == 20
        assert deferred.num_tokens < 80  # the pads of the kept rows are dropped
    if name == "chunk":
        assert recorder.rows_used == 5 * 20


def _gates(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name.endswith("mlp.gate")}


def _witness(model: nn.Module) -> tuple[dict[str, list[tuple[torch.Tensor, ...]]], list[Any]]:
    """Per gate, copies of what it returned (indices, weights) at each call, taken by hooks
    registered before the recorder's: the values the recorder read."""
    seen: dict[str, list[tuple[torch.Tensor, ...]]] = {name: [] for name in _gates(model)}
    handles = [
        gate.register_forward_hook(
            lambda mod, args, out, calls=seen[name]: calls.append((out[2].clone(), out[1].clone()))
        )
        for name, gate in _gates(model).items()
    ]
    return seen, handles


def _calls(generator: torch.Generator, count: int = 12) -> list[torch.Tensor]:
    return [_ids(2, 6, generator) for _ in range(count)]


def _runtime_warnings(
    model: nn.Module,
    recorder: RoutingTraceRecorder,
    inputs: list[torch.Tensor],
    handles: list[Any],
) -> list[warnings.WarningMessage]:
    """Runs ``inputs`` through ``model`` without grad, detaches ``recorder`` and removes
    ``handles`` (also on failure); returns the RuntimeWarnings raised meanwhile."""
    try:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for ids in inputs:
                model(input_ids=ids)
            recorder.detach()
    finally:
        recorder.detach()
        for handle in handles:
            handle.remove()
    return [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_router_outputs_modified_in_place_are_copied_at_each_call(mixtral: nn.Module) -> None:
    """A hook after the recorder's changes one gate's experts and weights in place at every
    call: the recorder finds it at the second call (the first was copied at once, its
    tensors watched) and copies that layer at each call from then on, with one warning
    naming the layer; the trace holds what the gate returned."""
    inputs = _calls(torch.Generator().manual_seed(2))
    seen, handles = _witness(mixtral)
    recorder = RoutingTraceRecorder(mixtral, weights=True).attach()
    name, gate = list(_gates(mixtral).items())[1]

    def vandal(mod: nn.Module, args: Any, out: Any) -> None:
        out[2].copy_((out[2] + 1) % 8)
        out[1].mul_(0.5)

    handles.append(gate.register_forward_hook(vandal))
    refused = _runtime_warnings(mixtral, recorder, inputs, handles)
    assert len(refused) == 1 and repr(name) in str(refused[0].message)
    assert "modified in place" in str(refused[0].message)
    assert recorder.modified == {} and recorder._copied == {name}
    trace = recorder.trace()
    assert trace.weights is not None and trace.num_tokens == 12 * 12
    for j, calls in enumerate(seen.values()):
        np.testing.assert_array_equal(trace.expert_ids[:, j], torch.cat([c[0] for c in calls]))
        np.testing.assert_array_equal(trace.weights[:, j], torch.cat([c[1] for c in calls]))


def test_a_change_found_at_a_copy_leaves_those_rows_out(mixtral: nn.Module) -> None:
    """The gate's outputs are changed in place only from the third call on: the calls held
    by reference until the copy (the third and fourth of a batch of four) cannot be
    recorded in that layer: their rows are -1 there (weights 0), counted in ``modified``,
    with a warning; the layer is copied at each call from then on and every other row holds
    what the gates returned."""
    inputs = _calls(torch.Generator().manual_seed(3))
    seen, handles = _witness(mixtral)
    recorder = RoutingTraceRecorder(mixtral, weights=True, batch_calls=4).attach()
    layer, gate = next(iter(_gates(mixtral).items()))
    calls_seen = []

    def vandal(mod: nn.Module, args: Any, out: Any) -> None:
        calls_seen.append(1)
        if len(calls_seen) >= 3:
            out[2].copy_((out[2] + 1) % 8)

    handles.append(gate.register_forward_hook(vandal))
    refused = _runtime_warnings(mixtral, recorder, inputs, handles)
    assert len(refused) == 1 and repr(layer) in str(refused[0].message)
    assert "could not be recorded" in str(refused[0].message)
    assert recorder.modified == {layer: 2}
    trace = recorder.trace()
    assert trace.weights is not None and trace.num_tokens == 12 * 12
    lost = np.zeros(trace.num_tokens, dtype=bool)
    lost[2 * 12 : 4 * 12] = True  # the third and fourth calls
    for j, calls in enumerate(seen.values()):
        ids = torch.cat([c[0] for c in calls]).numpy()
        weights = torch.cat([c[1] for c in calls]).numpy()
        rows = lost if j == 0 else np.zeros_like(lost)
        np.testing.assert_array_equal(trace.expert_ids[~rows, j], ids[~rows])
        np.testing.assert_array_equal(trace.weights[~rows, j], weights[~rows])
        assert (trace.expert_ids[rows, j] == -1).all() and (trace.weights[rows, j] == 0).all()
    assert (trace.expert_ids[lost, 1:] >= 0).all()  # the other layers of those calls: kept


def test_a_reused_input_buffer_is_copied_at_each_call(mixtral: nn.Module) -> None:
    """A loop that copies each batch into the same input tensors (a preallocated buffer):
    the second call finds the first call's inputs changed and the recorder copies the inputs
    at each call from then on (one warning); the token ids and positions are each call's."""
    inputs = _calls(torch.Generator().manual_seed(4))
    masks = [torch.ones_like(ids) for ids in inputs]
    for i, mask in enumerate(masks):
        mask[1, : i % 3] = 0
    ids_buffer, mask_buffer = torch.zeros_like(inputs[0]), torch.zeros_like(masks[0])
    recorder = RoutingTraceRecorder(mixtral)
    with recorder, torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for ids, mask in zip(inputs, masks, strict=True):
            ids_buffer.copy_(ids)
            mask_buffer.copy_(mask)
            mixtral(input_ids=ids_buffer, attention_mask=mask_buffer)
        recorder.detach()
    refused = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(refused) == 1 and "the model's inputs" in str(refused[0].message)
    assert recorder.modified == {}
    trace = recorder.trace()
    valid = torch.cat(masks).reshape(-1).bool()
    np.testing.assert_array_equal(trace.token_ids, torch.cat(inputs).reshape(-1)[valid])
    positions = torch.cat([(m.cumsum(1) - 1).reshape(-1) for m in masks])[valid]
    np.testing.assert_array_equal(trace.positions, positions)
    reference, _ = _record(
        mixtral,
        [
            lambda x=x, m=m: mixtral(input_ids=x, attention_mask=m)
            for x, m in zip(inputs, masks, strict=True)
        ],
        eager=True,
    )
    _assert_same(trace, reference)


def test_inputs_changed_before_a_copy_leave_the_call_out(mixtral: nn.Module) -> None:
    """The input buffer is reused only from the third call on: the third call's inputs,
    held by reference, are overwritten by the fourth's before the copy (after four calls):
    the third call is left out of the trace (counted in ``modified``); the rest is right."""
    inputs = _calls(torch.Generator().manual_seed(5))
    buffer = torch.zeros_like(inputs[0])
    recorder = RoutingTraceRecorder(mixtral, batch_calls=4)
    with recorder, torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, ids in enumerate(inputs):
            if i >= 2:
                buffer.copy_(ids)
            mixtral(input_ids=buffer if i >= 2 else ids)
        recorder.detach()
    refused = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(refused) == 1 and "left out of the trace" in str(refused[0].message)
    assert recorder.modified == {"inputs": 1}
    trace = recorder.trace()
    kept = [ids for i, ids in enumerate(inputs) if i != 2]
    np.testing.assert_array_equal(trace.token_ids, torch.cat(kept).reshape(-1))
    sequences = [2 * i + r for i in range(12) if i != 2 for r in range(2)]
    np.testing.assert_array_equal(trace.sequence, np.repeat(sequences, 6))
    reference, _ = _record(mixtral, [lambda x=x: mixtral(input_ids=x) for x in inputs], eager=True)
    keep = np.repeat(np.arange(12) != 2, 12)
    np.testing.assert_array_equal(trace.expert_ids, reference.expert_ids[keep])


def test_inference_mode_tensors_are_copied_at_once(mixtral: nn.Module) -> None:
    """Tensors made under ``torch.inference_mode`` (the routers' outputs here) track no
    version: the recorder copies them at each call (no reference it could not check) and
    records the same trace."""
    generator = torch.Generator().manual_seed(6)
    inputs = [_ids(2, 5, generator) for _ in range(6)]
    recorder = RoutingTraceRecorder(mixtral, weights=True)
    with recorder, torch.inference_mode():
        for ids in inputs:
            mixtral(input_ids=ids)
        calls = recorder._pending
        held = [h for call in calls for pair in call.layers.values() for h in pair if h]
        assert len(held) == 6 * 3 * 2 and all(h.version == -1 for h in held)  # copies
        # the input ids, made outside inference mode, have a version: held by reference
        assert [call.ids.version >= 0 for call in calls if call.ids] == [False] + [True] * 5
    reference, _ = _record(
        mixtral, [lambda x=x: mixtral(input_ids=x) for x in inputs], eager=True, weights=True
    )
    _assert_same(recorder.trace(), reference)


def test_held_bytes_and_calls_are_bounded(mixtral: nn.Module) -> None:
    """The held calls are copied on their device every ``batch_calls`` calls, and what the
    recorder holds (references and those copies) goes to the host once it reaches
    ``max_held_bytes`` (and at ``trace()``, ``detach()``): the trace is the same either
    way."""
    generator = torch.Generator().manual_seed(7)
    inputs = [_ids(2, 6, generator) for _ in range(10)]
    recorder = RoutingTraceRecorder(mixtral, batch_calls=3)
    with recorder, torch.no_grad():
        for x in inputs:
            mixtral(input_ids=x)
        # three batches of three calls on the device, the tenth call held, none on the host
        assert (len(recorder._staged), len(recorder._pending), len(recorder._chunks)) == (3, 1, 0)
    assert (len(recorder._staged), len(recorder._pending), len(recorder._chunks)) == (0, 0, 1)
    calls = [lambda x=x: mixtral(input_ids=x) for x in inputs]
    by_calls, few = _record(mixtral, calls, eager=False, batch_calls=3)
    by_bytes, small = _record(mixtral, calls, eager=False, max_held_bytes=1)
    assert len(few._chunks) == 1 and len(small._chunks) == 10  # at detach(); each call
    # one call holds its ids [2, 6] and 3 layers' experts [12, 2], all int64
    assert small.device_bytes == (2 * 6 + 3 * 12 * 2) * 8
    assert few.device_bytes == 10 * small.device_bytes  # 9 calls staged, 1 held
    _assert_same(by_calls, by_bytes)
    _assert_same(recorder.trace(), by_calls)
    for name in ("batch_calls", "max_held_bytes"):
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
            RoutingTraceRecorder(mixtral, **{name: 0})


def test_a_generate_step_copies_the_last_columns_of_its_mask(mixtral: nn.Module) -> None:
    """A step of ``generate`` gets the mask of the whole sequence so far: the recorder
    copies only its last columns (the step's tokens) and its row sums, so what goes to the
    host grows with the tokens, not with the square of the sequence length; the positions
    still count the non-pad tokens before the step."""
    prompt = _ids(2, 30, torch.Generator().manual_seed(8))
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    recorder = RoutingTraceRecorder(mixtral)
    with recorder, torch.no_grad():
        out = mixtral.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=False)
        widths = [call.mask.tensor.shape[1] for call in recorder._pending if call.mask]
        assert widths == [30, 31, 32, 33]  # the prompt, then three steps
        recorder._materialise()
        (staged,) = recorder._staged
        rows = [t for t, dim in zip(staged.groups, staged.dims, strict=True) if dim == 1]
        sums = [t for t, dim in zip(staged.groups, staged.dims, strict=True) if t.dim() == 1]
        # the token ids and the masks' last columns, [2, 30 + 1 + 1 + 1] each, in one group
        assert [tuple(t.shape) for t in rows] == [(2, 2 * 33)]
        assert [tuple(t.shape) for t in sums] == [(3 * 2,)]  # the three steps' row sums
    trace = recorder.trace()
    order = np.lexsort((trace.positions, trace.sequence))
    assert trace.num_tokens == 2 * 33 - 4
    np.testing.assert_array_equal(trace.sequence[order], np.repeat([0, 1], [33, 29]))
    np.testing.assert_array_equal(trace.positions[order], np.r_[np.arange(33), np.arange(29)])
    tokens = out[:, :33].reshape(-1)[
        torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1).reshape(-1).bool()
    ]
    np.testing.assert_array_equal(trace.token_ids[order], tokens.numpy())

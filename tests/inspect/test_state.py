"""LayerState: bounded memory, the reservoir's sample, deferred steps folded together."""

from __future__ import annotations

import gc

import pytest
import torch

from moe_devkit.inspect import InspectorConfig, RouterInspector
from moe_devkit.inspect.adapters import decision_from_tensors
from moe_devkit.inspect.records import StepTensors
from moe_devkit.inspect.state import LayerState


def test_memory_stays_bounded_over_100k_steps() -> None:
    config = InspectorConfig(window=4, max_windows=8, reservoir_size=16, coactivation_every=0)
    inspector = RouterInspector(config=config)
    decision = decision_from_tensors(
        torch.rand(4), torch.tensor([1, 2, 1, 2]), torch.tensor([[0, -1], [1, 2], [3, -1], [0, 1]])
    )

    def footprint() -> int:
        state = inspector.layers["manual"]
        values = [*vars(state).values(), *vars(state.stats).values()]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    for _ in range(1000):
        inspector.record(decision, layer="manual")
    size_1k = footprint()
    gc.collect()
    objects_1k = len(gc.get_objects())
    for _ in range(99_000):
        inspector.record(decision, layer="manual")
    gc.collect()
    assert footprint() == size_1k
    assert len(gc.get_objects()) - objects_1k < 100  # no per-step Python objects retained
    state = inspector.layers["manual"]
    assert state.steps == 100_000 and len(state.snapshot_steps) <= 8
    summary = inspector.summary().layers["manual"]
    assert summary["k"]["histogram"] == [0, 200_000, 200_000]


def test_reservoir_samples_the_tokens_of_every_nth_step() -> None:
    config = InspectorConfig(reservoir_every=3, reservoir_size=64, coactivation_every=0)
    inspector = RouterInspector(config=config)
    for step in range(7):
        complexity = torch.full((4,), step / 10)
        indices = torch.tensor([[0, -1], [1, 2], [3, -1], [0, 1]])
        decision = decision_from_tensors(complexity, torch.tensor([1, 2, 1, 2]), indices)
        inspector.record(decision, layer="manual")
    sample = inspector.summary().layers["manual"]["sample"]
    assert sorted(sample["complexity"]) == [0.0] * 4 + [0.3] * 4 + [0.6] * 4  # steps 0, 3, 6
    with pytest.raises(ValueError, match="reservoir_every"):
        InspectorConfig(reservoir_every=0)


def test_deferred_steps_fold_to_the_same_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """With defer_steps=16, hooks defer up to 16 steps on CUDA and fold them in one pass; the
    CPU run here forces that path (graph replays run eagerly) and compares with step-by-step
    folding."""

    def eager_replay(self: LayerState, inputs: StepTensors, flags: tuple) -> None:
        self._update_tensors(inputs, coactivation=flags[0], sample=flags[1])

    monkeypatch.setattr(LayerState, "_replay", eager_replay)
    config = InspectorConfig(window=5, coactivation_every=3, reservoir_every=4, defer_steps=16)
    deferred, direct = RouterInspector(config=config), RouterInspector(config=config)
    generator = torch.Generator().manual_seed(0)
    for step in range(23):
        n = 6 + step % 3  # steps of different sizes are concatenated
        k = torch.randint(0, 3, (n,), generator=generator)
        indices = torch.randint(0, 5, (n, 2), generator=generator)
        indices = torch.where(torch.arange(2) < k[:, None], indices, -1)
        decision = decision_from_tensors(torch.rand(n, generator=generator), k, indices, 5)
        for inspector, defer in ((deferred, True), (direct, False)):
            inspector.record(decision, layer="l", defer=defer)
            inspector.layers["l"].graphed = True  # the CUDA path, on the CPU
        if step == 10:
            assert 0 < len(deferred.layers["l"]._deferred) <= 16  # steps wait to be folded
    a, b = deferred.summary().layers["l"], direct.summary().layers["l"]
    assert deferred.layers["l"]._deferred == []  # summary() folded the rest
    for key in ("utilization", "k", "coactivation", "windows", "sample", "tokens", "steps"):
        assert a[key] == b[key], key
    assert a["complexity"]["mean"] == pytest.approx(b["complexity"]["mean"])
    assert a["losses"] == pytest.approx(b["losses"])


def test_off_cuda_the_hooks_steps_fold_together_up_to_a_token_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Off CUDA, deferred decisions wait until HOST_FOLD_TOKENS tokens are pending (periodic
    steps fold at once); every reader folds what waits, and the statistics equal
    step-by-step folding."""
    import moe_devkit.inspect.state as state_module

    monkeypatch.setattr(state_module, "HOST_FOLD_TOKENS", 20)
    config = InspectorConfig(window=7, coactivation_every=5, reservoir_every=4)
    deferred, direct = RouterInspector(config=config), RouterInspector(config=config)
    generator = torch.Generator().manual_seed(1)
    pending_seen = []
    for step in range(31):
        n = 6 + step % 3
        k = torch.randint(0, 3, (n,), generator=generator)
        indices = torch.randint(0, 5, (n, 2), generator=generator)
        indices = torch.where(torch.arange(2) < k[:, None], indices, -1)
        decision = decision_from_tensors(torch.rand(n, generator=generator), k, indices, 5)
        deferred.record(decision, layer="l", defer=True)
        direct.record(decision, layer="l", defer=False)
        state = deferred.layers["l"]
        pending_seen.append(sum(s.k.shape[0] for s in state._deferred))
        assert state._pending_tokens == pending_seen[-1] < 20
        if step == 12:  # a live window in the middle reads the pending steps too
            assert deferred.metrics() == direct.metrics()
    assert max(pending_seen) >= 12  # steps did wait
    a, b = deferred.summary().layers["l"], direct.summary().layers["l"]
    assert deferred.layers["l"]._deferred == []
    for key in ("utilization", "k", "coactivation", "windows", "sample", "tokens", "steps"):
        assert a[key] == b[key], key
    assert a["complexity"]["mean"] == pytest.approx(b["complexity"]["mean"])
    assert a["losses"] == pytest.approx(b["losses"])
    assert deferred.metrics() == direct.metrics()

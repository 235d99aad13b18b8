"""Memory snapshots and the leak verdict: a planted leak is found on its line, a clean loop not."""

from __future__ import annotations

import pytest
import torch

from moe_devkit.diagnostics.memory import MemoryTracker, find_leak, theil_sen_slope

KEPT: list[torch.Tensor] = []


def leaky_step(step: int) -> None:
    x = torch.randn(64, 64)
    KEPT.append(x * 2)  # the planted leak: 16 KiB per step
    (x @ x).sum()


def clean_step(step: int) -> None:
    x = torch.randn(64, 64)
    kept = [x * 2]
    (kept[0] @ x).sum()


def test_planted_leak_is_detected_on_its_line() -> None:
    KEPT.clear()
    verdict = find_leak(leaky_step, steps=15, warmup=3)
    KEPT.clear()
    assert verdict.leaking
    assert verdict.slope_bytes_per_step == pytest.approx(64 * 64 * 4, rel=0.25)
    top = verdict.growing_lines[0]
    assert top.location.endswith(f"test_memory.py:{leaky_step.__code__.co_firstlineno + 2}")
    (finding,) = verdict.findings()
    assert finding.code == "memory-leak" and finding.location == top.location


def test_clean_loop_of_the_same_length_is_not_flagged() -> None:
    verdict = find_leak(clean_step, steps=15, warmup=3)
    assert not verdict.leaking
    assert verdict.growing_lines == ()
    assert verdict.findings() == ()


def test_snapshots_are_labelled_and_serialisable() -> None:
    with MemoryTracker() as tracker:
        first = tracker.take_snapshot("Initial")
        keep = torch.zeros(1024)
        second = tracker.take_snapshot("after", step=0)
    assert (first.label, second.label, second.step) == ("Initial", "after", 0)
    assert second.tensor_bytes.get("cpu", 0) >= keep.numel() * 4
    section = tracker.to_dict()
    assert [s["label"] for s in section["snapshots"]] == ["Initial", "after"]
    assert section["leak"] is None


def test_theil_sen_ignores_an_outlier() -> None:
    y = [10.0 * i for i in range(10)]
    y[5] = 1e6
    assert theil_sen_slope(list(range(10)), y) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="distinct"):
        theil_sen_slope([1, 1], [0, 1])


def test_bad_input_gets_clear_errors() -> None:
    with pytest.raises(TypeError, match="callable"):
        find_leak(42, steps=10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        find_leak(clean_step, steps=2, warmup=3)
    tracker = MemoryTracker()
    with pytest.raises(RuntimeError, match="start"):
        tracker.take_snapshot("no tracing")
    with tracker:
        with pytest.raises(TypeError, match="label"):
            tracker.take_snapshot(3)  # type: ignore[arg-type]
        tracker.take_snapshot("one", step=0)
        with pytest.raises(ValueError, match="at least 3"):
            tracker.leak_verdict(warmup=0)


@pytest.mark.gpu
def test_cuda_counters_and_history_file(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "history.pickle"
    with MemoryTracker(history_path=path) as tracker:
        x = torch.ones(1 << 20, device="cuda")
        snap = tracker.take_snapshot("cuda", step=0)
    assert snap.cuda_allocated is not None and snap.cuda_allocated >= x.numel() * 4
    assert snap.cuda_peak is not None and snap.cuda_reserved is not None
    assert path.is_file() and tracker.history_file == path

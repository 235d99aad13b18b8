"""The perf suite's deterministic gates: operator, FLOP and host-sync counts, memory growth."""

from __future__ import annotations

import pytest
import torch
from perf.gates import (
    Gates,
    compare_gates,
    count_flops,
    count_host_syncs,
    count_ops,
    memory_growth,
)


def test_gates_flops_ops_and_syncs_on_cpu() -> None:
    a, b = torch.ones(8, 16), torch.ones(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    assert count_ops(lambda: (a @ b).relu())["mm"] == 1
    assert count_host_syncs(lambda: a.sum().item(), "cpu") is None


def test_memory_growth_finds_a_leak() -> None:
    kept: list[torch.Tensor] = []
    assert memory_growth(lambda: torch.ones(1024).sum(), "cpu") == 0
    growth = memory_growth(lambda: kept.append(torch.ones(1024)), "cpu")
    assert growth == pytest.approx(4096, rel=0.01)


def test_compare_gates_flags_any_increase() -> None:
    base = Gates(ops=10, flops=100, host_syncs=None, memory_growth=0.0)
    same = compare_gates(base, base)
    assert not any(g.regression for g in same)
    worse = compare_gates(base, Gates(ops=11, flops=100, host_syncs=None, memory_growth=1e6))
    assert [g.gate for g in worse if g.regression] == ["ops", "memory_growth"]

"""CPU processes (gloo) at world sizes 2, 4 and 8: the merge sends the same bytes per rank
whatever the world size (counted by wrapping torch.distributed's collectives), and equals one
process that saw the concatenated data."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from moe_devkit import RouterConfig
from moe_devkit.inspect import RouterInspector
from moe_devkit.inspect.config import InspectorConfig
from moe_devkit.integrations.distributed import distributed_summary, rank_imbalance
from moe_devkit.routers.torch_router import DynamicMoERouter

WORLDS = (2, 4, 8)
STEPS = 3
RESERVOIR = 64
JOIN_TIMEOUT_S = 120.0
COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "gather",
    "gather_object", "broadcast", "broadcast_object_list", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "scatter", "send", "isend",
)  # fmt: skip


def _config() -> InspectorConfig:
    # every step updates co-activation and the reservoir, so that one process over the
    # concatenated steps and the ranks count the same steps
    return InspectorConfig(coactivation_every=1, reservoir_every=1, reservoir_size=RESERVOIR)


def _router() -> DynamicMoERouter:
    torch.manual_seed(0)  # same weights on every rank, as data parallelism has
    return DynamicMoERouter(RouterConfig(hidden_size=8, num_experts=4, min_k=1, max_k=3))


def _batch(rank: int, step: int) -> torch.Tensor:
    """Rank r routes 24 + 8r tokens per step: uneven load, every reservoir full."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(24 + 8 * rank, 8, generator=g) * (1 + rank % 3)


def _nbytes(name: str, args: tuple[Any, ...]) -> int:
    """The bytes this rank puts into a collective (its own contribution)."""
    if name.endswith("_object") or name == "broadcast_object_list":
        return len(pickle.dumps(args[1] if name == "all_gather_object" else args[0]))
    tensor = args[1] if name in ("all_gather", "all_gather_into_tensor") else args[0]
    if isinstance(tensor, list):
        return sum(t.numel() * t.element_size() for t in tensor)
    return int(tensor.numel() * tensor.element_size())


def _count_collectives() -> list[tuple[str, int]]:
    """Wraps torch.distributed's collectives; the returned list fills as they run."""
    sent: list[tuple[str, int]] = []
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def wrapper(*args: Any, _name: str = name, _orig: Any = original, **kwargs: Any) -> Any:
            sent.append((_name, _nbytes(_name, args)))
            return _orig(*args, **kwargs)

        setattr(dist, name, wrapper)
    return sent


def _worker(rank: int, world: int, init_file: str, results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    sent = _count_collectives()
    model = _router()
    inspector = RouterInspector(config=_config()).attach(model)
    with torch.no_grad():
        for step in range(STEPS):
            model(_batch(rank, step))
    local = inspector.summary().layers["router"]
    merged = distributed_summary(inspector, timeout=60).layers["router"]
    default_sent = list(sent)
    sent.clear()
    full = distributed_summary(inspector, timeout=60, coactivation=True, per_rank=True)
    results.put((rank, local, merged, full.layers["router"], default_sent, list(sent)))
    dist.destroy_process_group()


def _run(world: int, tmp_path: Path) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_file = str(tmp_path / f"init{world}")
    procs = [ctx.Process(target=_worker, args=(r, world, init_file, results)) for r in range(world)]
    for proc in procs:
        proc.start()
    got: list[Any] = []
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while len(got) < world:
            got.append(results.get(timeout=max(deadline - time.monotonic(), 0.1)))
    except queue.Empty:
        pytest.fail(f"only {len(got)} of {world} results within {JOIN_TIMEOUT_S} s (a hang)")
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return sorted(got, key=lambda item: item[0])


def _single_process(world: int) -> dict[str, Any]:
    """One inspector that saw every rank's steps, one after another."""
    torch.set_num_threads(1)
    model = _router()
    inspector = RouterInspector(config=_config()).attach(model)
    with torch.no_grad():
        for rank in range(world):
            for step in range(STEPS):
                model(_batch(rank, step))
    return inspector.summary().layers["router"]


EXACT = ("steps", "tokens", "executed_pairs", "dropped_pairs", "nonfinite_tokens")


def _check_equal_to_one_process(merged: dict[str, Any], single: dict[str, Any]) -> None:
    for key in EXACT:
        assert merged[key] == single[key], key
    assert merged["utilization"] == single["utilization"]
    assert merged["k"] == single["k"]
    m, s = merged["complexity"], single["complexity"]
    assert m["histogram"] == s["histogram"] and m["joint_histogram"] == s["joint_histogram"]
    assert (m["min"], m["max"]) == (s["min"], s["max"])
    assert m["mean"] == pytest.approx(s["mean"], rel=1e-12)
    assert m["std"] == pytest.approx(s["std"], rel=1e-12)
    for key, value in single["losses"].items():
        assert merged["losses"][key] == pytest.approx(value, rel=1e-12)


def test_bytes_per_rank_do_not_grow_with_the_world_and_the_merge_is_exact(
    tmp_path: Path,
) -> None:
    sent_by_world: dict[int, list[tuple[str, int]]] = {}
    for world in WORLDS:
        got = _run(world, tmp_path)
        single = _single_process(world)
        locals_ = [item[1] for item in got]
        merged, full = got[0][2], got[0][3]
        # every rank: the same bytes, the same global view
        assert all(item[4] == got[0][4] for item in got)
        assert all(item[2] == merged for item in got)
        sent_by_world[world] = got[0][4]
        _check_equal_to_one_process(merged, single)
        _check_equal_to_one_process(full, single)
        # co-activation only when asked for; then it equals one process's
        assert merged["coactivation"]["steps"] == 0
        assert full["coactivation"] == single["coactivation"]
        # per-rank detail only with per_rank=True, and only on rank 0, by one gather
        assert "per_rank_counts" not in merged
        assert all("per_rank_counts" not in item[3] for item in got[1:])
        assert full["per_rank_counts"] == [lay["utilization"]["counts"] for lay in locals_]
        assert full["per_rank_tokens"] == [STEPS * (24 + 8 * r) for r in range(world)]
        assert full["per_rank_steps"] == [STEPS] * world
        assert merged["rank_imbalance"] == pytest.approx(rank_imbalance(full["per_rank_tokens"]))
        assert [name for name, _ in got[0][5]].count("gather") == 1
        # the reservoir sketch: only the ranks' samples, at most reservoir_size of them,
        # with w >= 2 full reservoirs about (1 - exp(-w)) of it (>= 0.86)
        union = {
            (c, k)
            for lay in locals_
            for c, k in zip(lay["sample"]["complexity"], lay["sample"]["k"], strict=True)
        }
        sample = list(zip(merged["sample"]["complexity"], merged["sample"]["k"], strict=True))
        assert set(sample) <= union
        assert RESERVOIR // 2 <= len(sample) <= RESERVOIR
    assert {name for name, _ in sent_by_world[2]} == {"all_reduce"}  # reductions only
    assert sent_by_world[2] == sent_by_world[4] == sent_by_world[8]

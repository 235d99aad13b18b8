"""CPU processes (gloo): global statistics are the sum of the ranks'; no hang on failure."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import queue
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from moe_devkit import RouterConfig
from moe_devkit.inspect import RouterInspector
from moe_devkit.integrations.distributed import RankTimeoutError, distributed_summary
from moe_devkit.routers.torch_router import DynamicMoERouter

WORLD = 2
JOIN_TIMEOUT_S = 60.0


def _init(
    rank: int,
    init_file: str,
    world: int = WORLD,
    group_timeout: timedelta | None = timedelta(seconds=30),
) -> None:
    """``init_file``: a FileStore path, or a ``tcp://`` address (a TCPStore on rank 0)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init_file if init_file.startswith("tcp://") else f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=group_timeout,  # None: torch's default (30 min)
    )


def _router() -> DynamicMoERouter:
    torch.manual_seed(0)  # same weights on every rank, as data parallelism has
    return DynamicMoERouter(RouterConfig(hidden_size=8, num_experts=4, min_k=1, max_k=3))


def _ok_worker(rank: int, init_file: str, results: Any) -> None:
    _init(rank, init_file)
    model = _router()
    inspector = RouterInspector().attach(model)
    data = torch.Generator().manual_seed(100 + rank)
    with torch.no_grad():
        for _ in range(3):  # rank r routes 4 + 2r tokens per step: uneven load
            model(torch.randn(4 + 2 * rank, 8, generator=data) * (1 + rank))
    local = inspector.summary().layers["router"]
    merged = distributed_summary(inspector, timeout=30, per_rank=True).layers["router"]
    results.put((rank, local, merged))
    dist.destroy_process_group()


def _absent_worker(rank: int, init_file: str, results: Any, mode: str) -> None:
    _init(rank, init_file)
    model = _router()
    inspector = RouterInspector().attach(model)
    with torch.no_grad():
        model(torch.randn(4, 8))
    if rank == 1:
        if mode == "crash":
            os._exit(3)  # dies without a word
        time.sleep(20)  # alive but never calls distributed_summary
        os._exit(0)
    start = time.monotonic()
    try:
        distributed_summary(inspector, timeout=3)
        results.put((rank, "no error", 0.0))
    except RankTimeoutError as err:
        results.put((rank, str(err), time.monotonic() - start))
    results.close()
    results.join_thread()  # flush before os._exit, which skips the queue's feeder thread
    os._exit(0)


def _late_rank_0_worker(
    rank: int, world: int, init_file: str, group_timeout: float | None, results: Any, release: Any
) -> None:
    """Rank 0 stays alive but calls only once the others gave up; then all merge again."""
    _init(
        rank, init_file, world, None if group_timeout is None else timedelta(seconds=group_timeout)
    )
    model = _router()
    inspector = RouterInspector().attach(model)
    with torch.no_grad():
        model(torch.randn(4, 8))
    if rank == 0:
        release.wait(JOIN_TIMEOUT_S)
    start = time.monotonic()
    try:
        distributed_summary(inspector, timeout=3)
        outcome = "no error"
    except RankTimeoutError as err:
        outcome = str(err)
    results.put((rank, outcome, time.monotonic() - start))
    merged = distributed_summary(inspector, timeout=30, per_rank=True)
    layer = merged.layers["router"]
    results.put(
        (rank, (layer["tokens"], layer.get("per_rank_tokens")), merged.config["world_size"])
    )
    dist.destroy_process_group()


def _take(results: Any, count: int, deadline: float) -> list[Any]:
    got: list[Any] = []
    try:
        while len(got) < count:
            got.append(results.get(timeout=max(deadline - time.monotonic(), 0.1)))
    except queue.Empty:
        pytest.fail(f"only {len(got)} of {count} results within {JOIN_TIMEOUT_S} s (a hang)")
    return got


def _join(procs: list[Any], grace: float) -> None:
    for proc in procs:
        proc.join(timeout=grace)
        if proc.is_alive():
            proc.kill()


def _collect(results: Any, count: int, procs: list[Any], grace: float = 30) -> list[Any]:
    try:
        return _take(results, count, time.monotonic() + JOIN_TIMEOUT_S)
    finally:
        _join(procs, grace)


def _free_tcp_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def test_global_counts_are_the_sum_of_the_ranks(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_file = str(tmp_path / "init")
    procs = [ctx.Process(target=_ok_worker, args=(r, init_file, results)) for r in range(WORLD)]
    for proc in procs:
        proc.start()
    got = sorted(_collect(results, WORLD, procs), key=lambda item: item[0])
    locals_ = [item[1] for item in got]
    merged = got[0][2]
    per_rank_keys = ("per_rank_counts", "per_rank_tokens", "per_rank_steps")
    global_view = {key: value for key, value in merged.items() if key not in per_rank_keys}
    assert json.dumps(got[1][2]) == json.dumps(global_view)  # every rank: the same global view
    assert not set(per_rank_keys) & set(got[1][2])  # the per-rank detail only on rank 0
    expected = [
        sum(c) for c in zip(*(lay["utilization"]["counts"] for lay in locals_), strict=True)
    ]
    assert merged["utilization"]["counts"] == expected
    assert merged["per_rank_counts"] == [lay["utilization"]["counts"] for lay in locals_]
    assert merged["per_rank_tokens"] == [12, 18] and merged["tokens"] == 30
    assert merged["per_rank_steps"] == [3, 3] and merged["steps"] == 6
    hist = [sum(h) for h in zip(*(lay["k"]["histogram"] for lay in locals_), strict=True)]
    assert merged["k"]["histogram"] == hist
    loss = sum(lay["losses"]["load_balancing_mean"] for lay in locals_) / 2
    assert merged["losses"]["load_balancing_mean"] == pytest.approx(loss)
    n = [lay["tokens"] for lay in locals_]
    mean = sum(lay["complexity"]["mean"] * t for lay, t in zip(locals_, n, strict=True)) / sum(n)
    assert merged["complexity"]["mean"] == pytest.approx(mean)
    assert merged["complexity"]["min"] == min(lay["complexity"]["min"] for lay in locals_)
    assert merged["rank_imbalance"] == pytest.approx(18 / 15)


@pytest.mark.parametrize("mode", ["absent", "crash"])
def test_a_missing_rank_gives_a_clear_error_not_a_hang(tmp_path: Path, mode: str) -> None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_file = str(tmp_path / "init")
    procs = [
        ctx.Process(target=_absent_worker, args=(r, init_file, results, mode)) for r in range(WORLD)
    ]
    for proc in procs:
        proc.start()
    [(rank, message, waited)] = _collect(results, 1, procs, grace=1)
    assert rank == 0
    assert "not every rank reached the inspector's reduction within 3 s" in message
    assert waited < 15


@pytest.mark.parametrize(
    ("world", "store", "group_timeout"),
    [(3, "file", 60.0), (2, "tcp", None)],
    ids=["3-ranks-filestore-group-timeout-60s", "2-ranks-tcpstore-default-group-timeout"],
)
def test_a_rank_whose_peer_is_alive_but_never_calls_times_out_after_its_own_timeout(
    tmp_path: Path, world: int, store: str, group_timeout: float | None
) -> None:
    ctx = mp.get_context("spawn")
    results, release = ctx.Queue(), ctx.Event()
    init_file = _free_tcp_address() if store == "tcp" else str(tmp_path / "init")
    args = (world, init_file, group_timeout)
    procs = [
        ctx.Process(target=_late_rank_0_worker, args=(r, *args, results, release))
        for r in range(world)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        waiting = sorted(_take(results, world - 1, deadline))
        release.set()  # now rank 0 calls, after the others gave up
        rest = _take(results, world + 1, deadline)
    finally:
        release.set()
        _join(procs, grace=30)
    assert [rank for rank, _, _ in waiting] == list(range(1, world))
    for _, message, waited in waiting:
        assert "not every rank reached the inspector's reduction within 3 s" in message
        assert "missing: rank 0" in message
        assert waited < 3 + 10  # far below the group's own timeout (60 s or 30 min)
    [(late_rank, late_message, late_waited)] = [item for item in rest if isinstance(item[1], str)]
    assert late_rank == 0
    assert "stopped waiting" in late_message and "within 3 s" in late_message
    assert late_waited < 10  # the late rank learns at once, instead of a lone collective
    merged = [item for item in rest if not isinstance(item[1], str)]
    assert sorted(rank for rank, _, _ in merged) == list(range(world))
    for rank, (tokens, per_rank_tokens), world_size in merged:  # the group still works
        assert (tokens, world_size) == (4 * world, world)
        assert per_rank_tokens == ([4] * world if rank == 0 else None)  # on rank 0 only


def test_needs_an_initialised_process_group() -> None:
    inspector = RouterInspector().attach(_router())
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed_summary(inspector)


@pytest.mark.parametrize(
    ("timeout", "error"),
    [
        (0, ValueError),
        (-1.0, ValueError),
        (math.inf, ValueError),
        (math.nan, ValueError),
        ("3", TypeError),
        (True, TypeError),
    ],
)
def test_timeout_must_be_a_finite_number_above_zero(timeout: Any, error: type) -> None:
    inspector = RouterInspector().attach(_router())
    with pytest.raises(error, match="timeout must be"):
        distributed_summary(inspector, timeout=timeout)

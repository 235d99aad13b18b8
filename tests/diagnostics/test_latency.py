"""The latency profiler with an injected fake timer, the stage breakdown and the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch

from moe_devkit.cli import main
from moe_devkit.config import RouterConfig
from moe_devkit.diagnostics.latency import (
    Measurement,
    compare_dynamic_static,
    latency_section,
    measure,
    measure_in_turns,
    profile_inference_latency,
)
from moe_devkit.reporting import load_report_json
from moe_devkit.routers.torch_router import STAGES, MoELayer, StaticTopKRouter

CONFIG = RouterConfig(hidden_size=16, num_experts=4, max_k=2, expert_hidden_size=8)


class StepClock:
    """Each read returns the next value of a script: a fake timer."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_measure_with_fake_timer_is_exact() -> None:
    durations = iter([0.001 * i for i in range(1, 101)])
    now = [0.0]

    def timer() -> float:
        return now[0]

    def work() -> None:
        now[0] += next(durations, 0.0)

    m = measure(work, warmup=0, iterations=100, timer=timer, cpu_timer=StepClock(0.5))
    assert m.n == 100
    assert m.median == pytest.approx(0.0505)
    assert m.p10 == pytest.approx(0.0109)
    assert m.min == pytest.approx(0.001)
    assert m.cpu_median == pytest.approx(0.5)
    assert m.method == "perf_counter"


def test_measure_runs_warmup_untimed() -> None:
    calls = []
    measure(
        lambda: calls.append(1), warmup=3, iterations=2, timer=StepClock(1), cpu_timer=StepClock(1)
    )
    assert len(calls) == 5


def test_measure_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match=r"iterations must be >= 1; got iterations=0"):
        measure(lambda: None, iterations=0)
    with pytest.raises(ValueError, match=r"warmup must be >= 0; got warmup=-1"):
        measure(lambda: None, warmup=-1)
    with pytest.raises(TypeError, match=r"iterations must be an int; got 2.5 \(float\)"):
        measure(lambda: None, iterations=2.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"profile_active": 0}, ValueError, r"profile_active must be >= 1; got profile_active=0"),
        ({"top": -1}, ValueError, r"top must be >= 0; got top=-1"),
        ({"iterations": 0}, ValueError, r"iterations must be >= 1"),
        ({"profile_active": "3"}, TypeError, r"profile_active must be an int; got '3' \(str\)"),
    ],
)
def test_profile_rejects_bad_settings_before_running_the_model(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    """A bad profiler setting is refused before the timing run, not as torch's
    AssertionError after it (profile_active=0), nor silently (top=-1)."""
    calls = []
    with pytest.raises(error, match=message):
        profile_inference_latency(lambda x: calls.append(x), torch.ones(2), **kwargs)
    assert calls == []


def test_measurement_round_trips_json() -> None:
    m = Measurement.from_times("x", "cpu", [1.0, 2.0, 3.0], [0.5], "perf_counter")
    assert Measurement.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    with pytest.raises(ValueError, match="at least one"):
        Measurement.from_times("x", "cpu", [], [], "perf_counter")


def test_profile_stages_and_trace(tmp_path) -> None:
    torch.manual_seed(0)
    layer = MoELayer(CONFIG).eval()
    x = torch.randn(32, 16)
    trace = tmp_path / "t" / "trace.json"
    result = profile_inference_latency(
        layer, x, warmup=1, iterations=3, profile_active=2, trace_path=trace,
        timer=StepClock(1e-3), cpu_timer=StepClock(1e-3),
    )  # fmt: skip
    stages = [s.stage for s in result.profile.stages]
    assert stages == list(STAGES)
    assert sum(s.share for s in result.profile.stages) == pytest.approx(1.0)
    assert all(s.calls == 1 for s in result.profile.stages)
    assert result.measurement.median == pytest.approx(1e-3)
    assert not any(op.name.startswith("moe.") for op in result.profile.top_ops)
    assert "traceEvents" in json.loads(trace.read_text())
    assert not list(trace.parent.glob(".*.tmp"))
    json.dumps(latency_section(result))


def test_dynamic_vs_static_counts_pairs() -> None:
    torch.manual_seed(0)
    dynamic = MoELayer(CONFIG).eval()
    static = MoELayer(CONFIG, router=StaticTopKRouter(CONFIG)).eval()
    x = torch.randn(64, 16)
    c = compare_dynamic_static(
        dynamic, static, x, warmup=0, iterations=3, timer=StepClock(1.0), cpu_timer=StepClock(1.0)
    )
    assert c.static_pairs == 64 * 2
    assert 64 <= c.dynamic_pairs <= 128
    assert c.pairs_ratio == c.dynamic_pairs / 128
    assert c.time_ratio == pytest.approx(1.0)
    assert c.mean_k == c.dynamic_pairs / 64


def test_profile_cli_writes_trace_and_report(tmp_path, capsys) -> None:
    args = ["profile", "--hidden-size", "16", "--expert-hidden-size", "8", "--num-experts",
            "4", "--max-k", "2", "--tokens", "32", "--iterations", "3", "--warmup", "1",
            "--profile-steps", "1", "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    report = load_report_json(tmp_path / "latency.json")
    latency = report["sections"]["latency"]
    assert latency["measurement"]["n"] == 3
    assert latency["dynamic_vs_static"]["static_pairs"] == 64
    assert (tmp_path / "trace.json").exists()
    assert "Routing stages" in capsys.readouterr().out


def test_profile_cli_usage_error(tmp_path, capsys) -> None:
    (tmp_path / "f").write_text("x")
    assert main(["profile", "--out", str(tmp_path / "f"), "--device", "cpu"]) == 2
    assert "must be a directory" in capsys.readouterr().err


def test_measurement_keeps_the_iteration_times() -> None:
    """The per-iteration times travel with the summary (the dynamic-vs-static verdict reads
    them); a stored measurement without them still loads."""
    durations = iter([0.003, 0.001, 0.002])
    now = [0.0]

    def work() -> None:
        now[0] += next(durations)

    m = measure(work, warmup=0, iterations=3, timer=lambda: now[0], cpu_timer=StepClock(1))
    assert m.times == pytest.approx((0.003, 0.001, 0.002))
    assert Measurement.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    data = m.to_dict()
    del data["times"]
    assert Measurement.from_dict(data).times == ()


def test_measure_in_turns_alternates_the_order() -> None:
    """Each iteration runs every call once, the order reversed every other iteration, so the
    i-th times of the calls were taken side by side."""
    calls: list[str] = []
    now = [0.0]

    def call(name: str, cost: float) -> Callable[[], None]:
        def run() -> None:
            calls.append(name)
            now[0] += cost

        return run

    timed = measure_in_turns(
        {"a": call("a", 1.0), "b": call("b", 3.0)}, warmup=1, iterations=3,
        timer=lambda: now[0], cpu_timer=StepClock(1),
    )  # fmt: skip
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert (timed["a"].times, timed["b"].times) == ((1.0,) * 3, (3.0,) * 3)
    assert (timed["a"].name, timed["b"].n) == ("a", 3)

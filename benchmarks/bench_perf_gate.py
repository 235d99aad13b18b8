"""The perf suite's false-alarm rate and power: HEAD against HEAD, idle and beside a busy core.

Usage: python benchmarks/bench_perf_gate.py [--runs N] [--planted-runs M] [--quick]
       [--busy-cpu CPU] [--timeout S] [--json PATH]

Clones the repository's HEAD into a temporary directory (committed code only) and runs the
suite there as ``nox -s perf`` does (``benchmarks/perf_suite.py --device cpu``, the default
budget, the clone first on PYTHONPATH), against the clone's own HEAD: identical code.

* idle: --runs suite runs with nothing started beside them;
* busy: --runs suite runs, each beside a busy-loop process started for it (on --busy-cpu, or
  wherever the kernel puts it), stopped when the run ends and never outliving --timeout;
* planted: --planted-runs runs in a second clone whose working tree adds about 0.6 ms of
  Python (``sum(range(35_000))``, no torch op) to ``MoELayer.forward`` after the experts:
  about 10% of the layer.static, layer.dynamic, model and inspector cases.

The three kinds of run are interleaved (idle, busy, planted, idle, ...), so that whatever the
machine's other users do falls on all of them alike. An identical run is a false alarm when
any case is a "regression" or an "improvement" (or a gate counts more), inconclusive when
none is but some case is "inconclusive", else a pass. A planted run catches the slowdown
when a case that runs ``MoELayer.forward`` is a regression. The verdicts are the suite's
final ones: a difference counts only when the suite's fresh workers confirmed it (the table
also counts those they did not). Prints the machine, a table per condition (outcomes, load
average, wall time) and per-case ratio ranges; ``--json`` keeps every run's verdicts, ratios
and page faults per call, and the suite's whole report (raw samples included) of each run
that did not pass or catch the slowdown. Exit 0 when identical code passes in at least 95%
of the runs of each condition and every planted run catches the slowdown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from _args import check_output_path, cpu_model, non_negative_int, positive_float, positive_int
from rich.console import Console
from rich.table import Table

from moe_devkit._argparse import ArgumentParser
from moe_devkit.reporting import write_atomic

ROOT = Path(__file__).resolve().parent.parent
PASS_GOAL = 0.95
PLANTED_FILE = Path("moe_devkit") / "routers" / "torch_router.py"
PLANTED_ANCHOR = (
    "        return MoEOutput(out.to(flat.dtype).reshape(hidden_states.shape), routing)\n"
)
PLANTED_LINE = "        sum(range(35_000))  # planted by bench_perf_gate: about 0.6 ms of Python\n"
PLANTED_CASES = ("layer.static", "layer.dynamic", "model", "inspector")
DIFFERENCES = ("regression", "improvement")
BUSY_LOOP = (
    "import os, sys, time\n"
    "if sys.argv[2] != '-': os.sched_setaffinity(0, {int(sys.argv[2])})\n"
    "end = time.monotonic() + float(sys.argv[1])\n"
    "while time.monotonic() < end: pass\n"
)


@dataclass(frozen=True)
class CaseResult:
    """One case of one suite run: its verdict, ratio (candidate / baseline) and faults."""

    case: str
    verdict: str  # pass, regression, improvement, inconclusive, skipped
    ratio: float
    ci_low: float
    ci_high: float
    pairs: int
    gate_regressions: tuple[str, ...]
    faults_baseline: float
    faults_candidate: float
    sliced: int = 0  # pairs set aside as time-sliced (wall/CPU over the policy's bound)
    baseline_cpu_ms: float = math.nan  # median thread CPU time per call, clean pairs
    first_verdict: str = ""  # a difference measured again by fresh workers: the first verdict


@dataclass
class RunResult:
    """One suite run: its condition, exit code, outcome and cases."""

    condition: str  # idle, busy, planted
    index: int
    exit_code: int
    outcome: str  # pass, false alarm, inconclusive (identical); caught, missed; error
    wall_s: float
    load_before: float
    load_after: float
    cases: list[CaseResult] = field(default_factory=list)
    error: str = ""
    report: dict[str, Any] | None = None  # the suite's whole report (samples included) of a
    # run that did not end as it should (a false alarm, a missed or inconclusive slowdown)


def case_results(report: dict[str, Any]) -> list[CaseResult]:
    """The cases of a perf-suite JSON report (``build/perf/cpu.json``'s layout)."""
    out = []
    for row in report["sections"]["perf"]["cases"]:
        comparison = row.get("comparison", {})
        decision = comparison.get("decision", {})
        faults = row.get("page_faults", {})
        gates = tuple(g["gate"] for g in row.get("gate_results", []) if g["regression"])
        out.append(
            CaseResult(
                case=row["case"],
                verdict=decision.get("verdict", "skipped"),
                ratio=float(decision.get("ratio", math.nan)),
                ci_low=float(decision.get("ci_low", math.nan)),
                ci_high=float(decision.get("ci_high", math.nan)),
                pairs=int(decision.get("pairs", 0)),
                gate_regressions=gates,
                faults_baseline=float(faults.get("baseline", math.nan)),
                faults_candidate=float(faults.get("candidate", math.nan)),
                sliced=int(decision.get("sliced", 0)),
                baseline_cpu_ms=float(comparison.get("baseline_cpu", math.nan)) * 1e3,
                first_verdict=row.get("first_comparison", {})
                .get("decision", {})
                .get("verdict", ""),
            )
        )
    return out


def differing(cases: list[CaseResult]) -> list[str]:
    """Cases with a confirmed difference in either direction, or a gate that counts more."""
    return [c.case for c in cases if c.verdict in DIFFERENCES or c.gate_regressions]


def classify(condition: str, cases: list[CaseResult]) -> str:
    """The outcome of one run: identical code passes, alarms falsely or stays inconclusive;
    planted code is caught (a regression in a case that runs it), missed (one of those cases
    passes, none regresses) or inconclusive (all of them are)."""
    if condition == "planted":
        planted = [c for c in cases if c.case in PLANTED_CASES]
        if any(c.verdict == "regression" for c in planted):
            return "caught"
        if planted and all(c.verdict == "inconclusive" for c in planted):
            return "inconclusive"
        return "missed"
    if differing(cases):
        return "false alarm"
    if any(c.verdict == "inconclusive" for c in cases):
        return "inconclusive"
    return "pass"


# ----------------------------------------------------------------------------- running


def machine_name() -> str:
    cpu = cpu_model()
    return (
        f"{cpu}, {os.cpu_count()} cpus, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def clone(dest: Path) -> str:
    """A fresh clone of this repository's HEAD at ``dest``; returns its commit."""
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(dest)], check=True)
    head = subprocess.run(
        ["git", "-C", str(dest), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return head.stdout.strip()


def plant(tree: Path) -> None:
    """Adds the planted slowdown to ``MoELayer.forward`` in ``tree``'s working tree."""
    path = tree / PLANTED_FILE
    text = path.read_text()
    if text.count(PLANTED_ANCHOR) != 1:
        raise SystemExit(f"bench_perf_gate: {PLANTED_FILE}: MoELayer.forward's return not found")
    path.write_text(text.replace(PLANTED_ANCHOR, PLANTED_LINE + PLANTED_ANCHOR))


@contextmanager
def busy_core(active: bool, cpu: int | None, seconds: float) -> Iterator[None]:
    """A busy-loop process for the duration of the block (and at most ``seconds``)."""
    if not active:
        yield
        return
    pin = "-" if cpu is None else str(cpu)
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(seconds), pin])
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def suite_once(
    tree: Path, report: Path, args: argparse.Namespace, condition: str, index: int
) -> RunResult:
    """One perf-suite run in ``tree`` against its HEAD, as ``nox -s perf`` runs it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    command = [sys.executable, "benchmarks/perf_suite.py", "--device", "cpu", "--json", report]
    command += ["--quick"] if args.quick else []
    load_before, start = os.getloadavg()[0], time.perf_counter()
    with busy_core(condition == "busy", args.busy_cpu, args.timeout + 10):
        try:
            proc = subprocess.run(
                [str(c) for c in command], cwd=tree, env=env, capture_output=True,
                text=True, timeout=args.timeout, check=False,
            )  # fmt: skip
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired:
            code, output = -1, f"timed out after {args.timeout:g} s"
    run = RunResult(condition, index, code, "error", time.perf_counter() - start, load_before, 0)
    run.load_after = os.getloadavg()[0]
    if code not in (0, 1) or not report.exists():
        run.error = output[-2000:]
        return run
    doc = json.loads(report.read_text())
    report.unlink()
    run.cases = case_results(doc)
    run.outcome = classify(condition, run.cases)
    if run.outcome not in ("pass", "caught"):
        run.report = doc
    return run


def schedule(runs: int, planted: int) -> list[tuple[str, int]]:
    """The runs in interleaved order: idle, busy, planted, idle, busy, ..."""
    order = []
    for i in range(max(runs, planted)):
        order += [("idle", i), ("busy", i)] if i < runs else []
        order += [("planted", i)] if i < planted else []
    return order


# ----------------------------------------------------------------------------- reporting


def _range(values: list[float], fmt: str = ".3f") -> str:
    finite = [v for v in values if math.isfinite(v)]
    return f"{min(finite):{fmt}}-{max(finite):{fmt}}" if finite else "-"


def summary(condition: str, runs: list[RunResult]) -> dict[str, Any]:
    counts = {o: sum(r.outcome == o for r in runs) for o in {r.outcome for r in runs}}
    loads = [r.load_before for r in runs] + [r.load_after for r in runs]
    walls = sorted(r.wall_s for r in runs)
    return {
        "condition": condition, "runs": len(runs), "outcomes": counts,
        "load_average_1min": [min(loads), max(loads)] if loads else [],
        "wall_s": {"median": walls[len(walls) // 2], "max": walls[-1], "total": sum(walls)}
        if walls else {},
    }  # fmt: skip


def _finite(value: Any) -> Any:
    """``value`` with NaN (a case without a comparison) as null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def goal_met(condition: str, runs: list[RunResult]) -> bool:
    if condition == "planted":
        return all(r.outcome == "caught" for r in runs)
    return sum(r.outcome == "pass" for r in runs) >= PASS_GOAL * len(runs)


def print_condition(console: Console, condition: str, runs: list[RunResult]) -> None:
    s = summary(condition, runs)
    first = ("caught", "missed") if condition == "planted" else ("pass", "false alarm")
    outcomes = (*first, "inconclusive", "error")
    head = ", ".join(f"{s['outcomes'].get(o, 0)} {o}" for o in outcomes)
    load = s["load_average_1min"]
    wall = s["wall_s"]
    console.print(
        f"\n[bold]{condition}[/]: {len(runs)} runs: {head}; load average (1 min) "
        f"{load[0]:.2f}-{load[1]:.2f}; wall per run median {wall['median']:.0f} s, "
        f"max {wall['max']:.0f} s, total {wall['total'] / 60:.1f} min",
        highlight=False,
    )
    table = Table(show_header=True)
    for col in ("case", "ratio range", "not pass", "sliced", "cpu ms", "faults/call"):
        table.add_column(col, justify="left" if col in ("case", "not pass") else "right")
    names = list(dict.fromkeys(c.case for r in runs for c in r.cases))
    for name in names:
        rows = [c for r in runs for c in r.cases if c.case == name]
        verdicts = [c.verdict for c in rows if c.verdict != "pass"]
        verdicts += [
            f"{c.first_verdict} not confirmed" for c in rows
            if c.first_verdict and c.first_verdict != c.verdict
        ]  # fmt: skip
        verdicts += [f"gate {g}" for c in rows for g in c.gate_regressions]
        tally = ", ".join(f"{verdicts.count(v)} {v}" for v in dict.fromkeys(verdicts)) or "-"
        faults = f"{_range([c.faults_baseline for c in rows], '.0f')} / "
        faults += _range([c.faults_candidate for c in rows], ".0f")
        sliced = f"{sum(c.sliced for c in rows)} / {sum(c.sliced + c.pairs for c in rows)}"
        cpu = _range([c.baseline_cpu_ms for c in rows], ".2f")
        table.add_row(name, _range([c.ratio for c in rows]), tally, sliced, cpu, faults)
    console.print(table)
    for r in runs:
        if r.outcome in ("false alarm", "error", "missed"):
            detail = ", ".join(differing(r.cases)) or "".join(r.error.strip().splitlines()[-1:])
            console.print(f"  run {r.index}: {r.outcome}: {detail}", highlight=False)


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=positive_int, help="runs per condition (default 20)")
    parser.add_argument(
        "--planted-runs", type=non_negative_int, help="planted-slowdown runs (default 5)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="the suite's --quick, 3 runs and 1 planted"
    )
    parser.add_argument("--busy-cpu", type=int, help="pin the busy loop here (default: unpinned)")
    parser.add_argument(
        "--timeout", type=positive_float, default=600.0, help="seconds per suite run"
    )
    parser.add_argument("--json", type=Path, help="write every run's results here")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.runs = args.runs or (3 if args.quick else 20)
    args.planted_runs = args.planted_runs if args.planted_runs is not None else (
        1 if args.quick else 5
    )  # fmt: skip
    if args.busy_cpu is not None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if args.busy_cpu not in cpus:
            parser.error(
                f"--busy-cpu: expected one of this process's cpus {cpus}; got {args.busy_cpu}"
            )
    check_output_path(parser, args.json, "--json")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)  # before minutes of runs, not after
    # A SIGTERM (a killed nohup job) unwinds like Ctrl-C: the busy loop is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    console = Console(width=None if sys.stdout.isatty() else 160)
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="moe-perf-gate-") as tmp:
        work = Path(tmp)
        commit = clone(work / "identical")
        if args.planted_runs:
            clone(work / "planted")
            plant(work / "planted")
        busy = "unpinned" if args.busy_cpu is None else f"pinned to cpu {args.busy_cpu}"
        console.print(
            f"machine: {machine_name()}\nclone of HEAD {commit}, against its HEAD; "
            f"{'--quick' if args.quick else 'default budget'}; busy loop {busy}; "
            f"{args.runs} runs per condition, {args.planted_runs} planted",
            highlight=False,
        )
        for condition, index in schedule(args.runs, args.planted_runs):
            tree = work / ("planted" if condition == "planted" else "identical")
            run = suite_once(tree, work / "report.json", args, condition, index)
            results.append(run)
            write_json(args, results, commit, None)  # what has run so far, if cut short
            ratios = " ".join(f"{c.ratio:.3f}" for c in run.cases)
            console.print(
                f"{condition} {index}: {run.outcome} ({run.wall_s:.0f} s, load "
                f"{run.load_before:.2f}/{run.load_after:.2f}) {ratios}",
                highlight=False,
            )
    return finish(console, args, results, commit)


def write_json(
    args: argparse.Namespace, results: list[RunResult], commit: str, met: bool | None
) -> None:
    """The --json report; ``met`` None: the runs so far of an unfinished benchmark."""
    if not args.json:
        return
    conditions = [c for c in ("idle", "busy", "planted") if any(r.condition == c for r in results)]
    doc = {
        "machine": machine_name(), "commit": commit, "quick": args.quick,
        "busy_cpu": args.busy_cpu, "complete": met is not None, "goal_met": met,
        "summary": [summary(c, [r for r in results if r.condition == c]) for c in conditions],
        "runs": [asdict(r) for r in results],
    }  # fmt: skip
    write_atomic(args.json, json.dumps(_finite(doc), indent=2, allow_nan=False) + "\n")


def finish(
    console: Console, args: argparse.Namespace, results: list[RunResult], commit: str
) -> int:
    conditions = [c for c in ("idle", "busy", "planted") if any(r.condition == c for r in results)]
    met = True
    for condition in conditions:
        runs = [r for r in results if r.condition == condition]
        print_condition(console, condition, runs)
        met = met and goal_met(condition, runs)
    verdict = "met" if met else "NOT met"
    console.print(
        f"\ngoal ({PASS_GOAL:.0%} of identical runs pass in each condition, every planted "
        f"run caught): {verdict}",
        highlight=False,
    )
    write_json(args, results, commit, met)
    if args.json:
        console.print(f"report: {args.json}")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())

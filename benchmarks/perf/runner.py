"""The perf suite's parent process: workers, A/B decisions, confirmation, gates, table, JSON.

Runs with the working tree's moe_devkit (``moe_devkit.diagnostics.regression`` decides); the
workers it starts (``perf.worker``, serving ``perf.serve``) may import another revision.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from moe_devkit.commands.common import writing
from moe_devkit.diagnostics.regression import (
    ABSchedule,
    Decision,
    DecisionPolicy,
    Sampler,
    compare_interleaved,
    confirm,
)
from moe_devkit.diagnostics.regression.stats import median_or_nan
from moe_devkit.reporting import make_report, write_report_json
from perf.gates import Gates, compare_gates
from perf.store import BaselineStore, environment
from perf.worker import CorePlacement, RevisionError, WorkerProcess, export_revision

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPT = ROOT / "benchmarks" / "perf_suite.py"


def _schedule(args: argparse.Namespace) -> tuple[DecisionPolicy, ABSchedule]:
    if args.quick:
        budget = args.budget or 4.0
        policy = DecisionPolicy(min_effect=args.min_effect, min_pairs=10)
        return policy, ABSchedule(budget_s=budget, target_sample_s=0.005, pairs=16, warmup=1)
    policy = DecisionPolicy(min_effect=args.min_effect)
    return policy, ABSchedule(budget_s=args.budget or 20.0, target_sample_s=0.01, pairs=40)


def _worker_args(args: argparse.Namespace) -> list[str]:
    out = ["--device", args.device, "--threads", str(args.threads)]
    return out + (["--quick"] if args.quick else [])


def _placement(
    args: argparse.Namespace, cand: WorkerProcess, base: WorkerProcess | None
) -> CorePlacement | None:
    """Both single-threaded workers on one and the same core, the quietest (they run in
    turns there, so neither is favoured by where it runs, and each case moves them away
    from a core that another process keeps busy); None for multi-threaded workers."""
    if args.threads != 1 or not hasattr(os, "sched_getaffinity"):
        return None
    placement = CorePlacement([w for w in (cand, base) if w is not None])
    return placement if len(placement.cpus) > 1 else None


def run_suite(args: argparse.Namespace, console: Console) -> int:
    """Runs every case; returns the exit code (1 on a confirmed regression).

    Each case is an interleaved A/B comparison between a baseline and a candidate worker
    (``compare_interleaved``); a case that differs is measured once more, after all cases,
    by a new pair of workers, and the difference stands only if they find it too
    (``regression.confirm``)."""
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    cases = [c for c in args.cases.split(",") if c]
    with tempfile.TemporaryDirectory(prefix="moe-perf-") as tmp:
        baseline_tree: Path | None = None
        if args.against.lower() != "none":
            try:
                baseline_tree = export_revision(args.against, Path(tmp) / "baseline", ROOT)
            except RevisionError as exc:
                console.print(f"perf_suite: error: {exc}")
                return 2
        rows = _run_cases(args, console, cases, baseline_tree)
    return _finish(args, console, rows)


def _run_cases(
    args: argparse.Namespace, console: Console, cases: list[str], baseline_tree: Path | None
) -> list[dict[str, Any]]:
    policy, schedule = _schedule(args)
    clock = "wall" if args.device == "cuda" else "cpu"
    with Progress(console=console, transient=True) as progress:
        rows = _measure(args, progress, cases, baseline_tree, policy, schedule, clock)
        differing = [r["case"] for r in rows if _differs(r)]
        if differing and baseline_tree is not None:
            # A difference stands only if fresh workers (new processes, new memory layout)
            # find it again: see regression.confirm.
            again = _measure(args, progress, differing, baseline_tree, policy, schedule, clock)
            for row, repeat in zip([r for r in rows if _differs(r)], again, strict=True):
                _confirm_row(row, repeat)
    return rows


def _measure(
    args: argparse.Namespace,
    progress: Progress,
    cases: list[str],
    baseline_tree: Path | None,
    policy: DecisionPolicy,
    schedule: ABSchedule,
    clock: str,
) -> list[dict[str, Any]]:
    """Each case of ``cases`` measured by one pair of newly started workers."""
    cand, base = start_workers(args, baseline_tree)
    placement = _placement(args, cand, base)
    rows = []
    try:
        task = progress.add_task("perf cases", total=len(cases))
        for case in cases:
            progress.update(task, description=f"perf {case}")
            rows.append(_run_case(case, cand, base, policy, schedule, clock, placement))
            progress.advance(task)
        progress.remove_task(task)
    finally:
        cand.close()
        if base is not None:
            base.close()
    return rows


def _differs(row: dict[str, Any]) -> bool:
    verdict = row.get("comparison", {}).get("decision", {}).get("verdict")
    return verdict in ("regression", "improvement")


def _confirm_row(row: dict[str, Any], repeat: dict[str, Any]) -> None:
    """``row`` (a difference) decided again with ``repeat``, the fresh workers' measurement."""
    if "comparison" not in repeat:  # the fresh workers skipped it: nothing confirms it
        repeat["comparison"] = {**row["comparison"], "decision": {
            **row["comparison"]["decision"], "verdict": "inconclusive",
            "reason": f"fresh workers did not measure it: {repeat.get('reason', '')}",
        }}  # fmt: skip
    first = Decision(**row["comparison"]["decision"])
    final = confirm(first, Decision(**repeat["comparison"]["decision"]))
    row["first_comparison"] = row["comparison"]
    row["comparison"] = {**repeat["comparison"], "decision": final.to_dict()}
    for key in ("page_faults", "placement"):
        if key in repeat:
            row[key] = repeat[key]


def start_workers(
    args: argparse.Namespace, baseline_tree: Path | None
) -> tuple[WorkerProcess, WorkerProcess | None]:
    """The candidate (working tree) and baseline workers: one command line and one
    environment for both, all but the tree they import from (``worker_environment``)."""
    worker_args = _worker_args(args)
    cand = WorkerProcess(SCRIPT, ROOT, worker_args)
    base = WorkerProcess(SCRIPT, baseline_tree, worker_args) if baseline_tree else None
    return cand, base


def _run_case(
    case: str,
    cand: WorkerProcess,
    base: WorkerProcess | None,
    policy: DecisionPolicy,
    schedule: ABSchedule,
    clock: str,
    placement: CorePlacement | None = None,
) -> dict[str, Any]:
    setup = cand.request({"op": "setup", "case": case})
    if "skip" in setup:
        return {"case": case, "status": "skipped", "reason": setup["skip"]}
    row: dict[str, Any] = {"case": case, "status": "measured"}
    base_setup = base.request({"op": "setup", "case": case}) if base else {"skip": "no baseline"}
    # Both workers count their gates before the timing, so both enter it equally warm (the
    # gates run the case a dozen times: graph captures, compilation, allocator pools).
    row["gates"] = cand.request({"op": "gates", "case": case})
    base_gates_raw = (
        base.request({"op": "gates", "case": case}) if base and "skip" not in base_setup else None
    )
    if base is None or "skip" in base_setup:
        row["reason"] = f"no A/B: baseline {base_setup.get('skip')}"
        sample = cand.sampler(case)
        sample(1)
        row["candidate"] = sample(max(1, _calls_for(sample, schedule.target_sample_s)))._asdict()
        return row
    base_faults: list[float] = []
    cand_faults: list[float] = []
    moves = placement.moves if placement else 0
    comparison = compare_interleaved(
        case, base.sampler(case, base_faults), cand.sampler(case, cand_faults),
        clock="wall" if clock == "wall" else "cpu", policy=policy, schedule=schedule,
        settle=placement.settle if placement else None,
    )  # fmt: skip
    row["comparison"] = comparison.to_dict(samples=True)
    if placement is not None:
        row["placement"] = {"cpu": placement.cpu, "moves": placement.moves - moves}
    # Page faults per call, median over samples: both near 0 unless the allocator hands
    # buffers back to the system between calls (perf.worker.ALLOCATOR_ENV).
    row["page_faults"] = {
        side: median_or_nan([v for v in faults if math.isfinite(v)])
        for side, faults in (("baseline", base_faults), ("candidate", cand_faults))
    }
    assert base_gates_raw is not None  # measured above whenever the baseline set up
    base_gates = Gates.from_dict(base_gates_raw)
    row["gate_results"] = [
        g.to_dict() for g in compare_gates(base_gates, Gates.from_dict(row["gates"]))
    ]
    return row


def _calls_for(sample: Sampler, target: float) -> int:
    one = sample(1).wall
    return max(1, math.ceil(target / max(one, 1e-9)))


def _is_regression(row: dict[str, Any]) -> bool:
    timing = row.get("comparison", {}).get("decision", {}).get("verdict") == "regression"
    return timing or any(g["regression"] for g in row.get("gate_results", []))


def _candidate_times(row: dict[str, Any]) -> tuple[float, float]:
    if "comparison" in row:
        c = row["comparison"]
        return float(c["candidate_wall"]), float(c["candidate_cpu"])
    if "candidate" in row:
        return float(row["candidate"]["wall"]), float(row["candidate"]["cpu"])
    return math.nan, math.nan


def _finish(args: argparse.Namespace, console: Console, rows: list[dict[str, Any]]) -> int:
    env = environment(args.device)
    store: BaselineStore = args.baseline_store  # opened and checked before the timing
    stored = store.lookup(env) or {}
    for row in rows:
        _add_trend(row, stored.get(row["case"]), against_none=args.against.lower() == "none")
    _print_table(console, rows, args)
    regressions = [r["case"] for r in rows if _is_regression(r)]
    report = make_report({
        "perf": {
            "device": args.device, "against": args.against, "quick": args.quick,
            "environment": env, "cases": rows, "regressions": regressions,
        }
    })  # fmt: skip
    out = args.json  # perf.suite.check_args set its default
    with writing(out, "--json"):
        write_report_json(out, report)
    console.print(f"report: {out}")
    if args.update_baseline:
        measured = {r["case"]: _baseline_entry(r) for r in rows if _storable(r)}
        with writing(store.path, "--baseline-dir"):
            path = store.update(env, measured)
        console.print(f"baseline updated: {path} ({len(measured)} cases)")
    if regressions:
        console.print(f"[red]confirmed regression[/] in: {', '.join(regressions)}")
        return 1
    return 0


def _storable(row: dict[str, Any]) -> bool:
    """A measured case with times a baseline file may hold (a comparison cut short by its
    budget has none)."""
    if row["status"] != "measured":
        return False
    return all(math.isfinite(t) and t > 0 for t in _candidate_times(row))


def _baseline_entry(row: dict[str, Any]) -> dict[str, Any]:
    wall, cpu = _candidate_times(row)
    return {"wall": wall, "cpu": cpu, "gates": row["gates"]}


def _add_trend(row: dict[str, Any], stored: dict[str, Any] | None, *, against_none: bool) -> None:
    """Stored timings are a trend only; stored gates decide only without an A/B baseline."""
    if stored is None or row["status"] != "measured":
        return
    wall, cpu = _candidate_times(row)
    row["trend"] = {"wall_vs_stored": wall / stored["wall"], "cpu_vs_stored": cpu / stored["cpu"]}
    if against_none and stored["gates"]:  # {}: no gates stored for this case
        results = compare_gates(Gates.from_dict(stored["gates"]), Gates.from_dict(row["gates"]))
        row["gate_results"] = [g.to_dict() for g in results]


def _print_table(console: Console, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    table = Table(title=f"perf({args.device}) against {args.against}")
    for col in ("case", "verdict", "ratio (CI)", "pairs/sliced", "cpu ms", "wall ms", "gates"):
        table.add_column(col, justify="left" if col in ("case", "verdict", "gates") else "right")
    for row in rows:
        table.add_row(*_cells(row))
    console.print(table)
    for row in rows:
        if row["status"] == "skipped":
            console.print(f"[yellow]skipped[/] {row['case']}: {row['reason']}")
        elif "first_comparison" in row:  # a difference measured again by fresh workers
            reason = row["comparison"]["decision"]["reason"]
            console.print(f"{row['case']}: {reason}", highlight=False)


def _cells(row: dict[str, Any]) -> list[str]:
    if row["status"] == "skipped":
        return [row["case"], "[yellow]skipped[/]", "", "", "", "", ""]
    wall, cpu = _candidate_times(row)
    gates = ", ".join(g["gate"] for g in row.get("gate_results", []) if g["regression"])
    gate_cell = f"[red]{gates}[/]" if gates else "ok"
    if "comparison" not in row:
        return [row["case"], "measured", "", "", f"{cpu * 1e3:.3f}", f"{wall * 1e3:.3f}", gate_cell]
    d = row["comparison"]["decision"]
    style = {"regression": "red", "improvement": "green", "inconclusive": "yellow"}
    verdict = f"[{style[d['verdict']]}]{d['verdict']}[/]" if d["verdict"] in style else "pass"
    ratio = f"{d['ratio']:.3f} ({d['ci_low']:.3f}-{d['ci_high']:.3f})"
    return [
        row["case"], verdict, ratio, f"{d['pairs']}/{d['sliced']}",
        f"{cpu * 1e3:.3f}", f"{wall * 1e3:.3f}", gate_cell,
    ]  # fmt: skip

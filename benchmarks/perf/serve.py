"""The worker half of the perf suite: ``python benchmarks/perf_suite.py --worker ...``.

Serves the JSON-line requests of ``perf.worker.WorkerProcess`` on stdin/stdout: builds the
cases (``perf.cases``) against the ``moe_devkit`` first on PYTHONPATH, which may be an old
revision's, times them and counts their gates (``perf.gates``, the working tree's, so both
sides count alike). It imports nothing else of moe_devkit, so it runs against old revisions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from perf.cases import CaseBuilder, Fn, Settled
from perf.gates import measure_gates


def build_parser() -> argparse.ArgumentParser:
    """The worker's options: the parent (``perf.runner``) checked them already."""
    parser = argparse.ArgumentParser(prog="perf_suite.py --worker")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    return parser


def main(argv: Sequence[str]) -> int:
    """Serves requests until ``quit`` or the end of stdin."""
    args = build_parser().parse_args(list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    builder = CaseBuilder(args.device, args.quick)
    fns: dict[str, Fn | str] = {}
    for line in sys.stdin:
        req = json.loads(line)
        op = req.get("op")
        if op == "quit":
            return 0
        try:
            reply = _serve(req, builder, fns)
        except Exception as exc:  # the parent shows it; the worker keeps serving
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


def _page_faults() -> int:
    """Minor page faults so far of this thread (of the process where threads are not told
    apart; 0 without the resource module)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    return resource.getrusage(who).ru_minflt


def _sample(fn: Fn, number: int, device: torch.device) -> dict[str, Any]:
    sync = device.type == "cuda"
    if sync:
        torch.cuda.synchronize(device)
    faults0 = _page_faults()
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    for _ in range(number):
        fn()
    if sync:
        torch.cuda.synchronize(device)
    wall1, cpu1 = time.perf_counter(), time.thread_time()
    faults = (_page_faults() - faults0) / number
    return {
        "wall": (wall1 - wall0) / number, "cpu": (cpu1 - cpu0) / number, "number": number,
        "faults": faults,
    }  # fmt: skip


def _serve(req: dict[str, Any], builder: CaseBuilder, fns: dict[str, Fn | str]) -> dict[str, Any]:
    op = req["op"]
    if op == "info":
        import moe_devkit

        return {"moe_devkit": moe_devkit.__file__, "torch": torch.__version__}
    case = req["case"]
    if case not in fns:
        fns[case] = builder.build(case)
    fn = fns[case]
    if isinstance(fn, str):
        return {"skip": fn}
    if op == "setup":
        fn()
        return {"ok": True}
    if op == "sample":
        return _sample(fn, int(req["number"]), builder.device)
    if op == "gates":
        # Gates count one call; work a case defers (the inspector folds 16 steps at once)
        # is settled after each call, so the counts do not depend on where in its cycle
        # each worker happens to be (the two workers have run different numbers of calls).
        gated = fn.settled if isinstance(fn, Settled) else fn
        result: dict[str, Any] = measure_gates(gated, builder.device).to_dict()
        return result
    return {"error": f"unknown op {op!r}"}

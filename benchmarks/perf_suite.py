"""The performance-regression suite run by ``nox -s perf``.

Each case is timed in two worker processes, the working tree (candidate) and a git revision
exported side by side (baseline, ``--against``, default HEAD), started alike (one command
line, one environment but for the tree, ``perf_worker.ALLOCATOR_ENV``) and sampled
alternately; the decision is ``moe_devkit.diagnostics.regression.compare_interleaved``
(paired, significance AND minimum effect, time-sliced samples set aside). The deterministic
gates (operators, FLOPs, CUDA host syncs, memory growth) are compared between the two sides
as well. Stored baselines (benchmarks/baselines/<device>.json, keyed by device and versions)
are checked whole before any timing, shown as a trend and rewritten only with
``--update-baseline``.

Exit codes: 0 no regression, 1 a confirmed regression, 2 usage error (a stored baseline
that is not a valid baseline file included), 77 skipped (CUDA asked for where none exists).

Usage:
    python benchmarks/perf_suite.py --device cpu [--against main] [--quick]
    python benchmarks/perf_suite.py --device cuda --update-baseline

The worker half (``--worker``) imports only torch, the reference router and the optional
modules of whichever ``moe_devkit`` is first on PYTHONPATH, so it runs against old revisions.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from _args import check_output_path, check_range, non_negative_int, positive_float

ROOT = Path(__file__).resolve().parent.parent
GATES_FILE = ROOT / "moe_devkit" / "diagnostics" / "perf_gates.py"
CASES = (
    "router.static",
    "router.dynamic",
    "router.top_p",
    "layer.static",
    "layer.dynamic",
    "model",
    "utilization",
    "inspector",
    "gradients",
)
SKIP_EXIT = 77

if TYPE_CHECKING:  # the worker half imports only what an old revision has
    from moe_devkit.diagnostics.perf_store import BaselineStore

# ----------------------------------------------------------------------------- worker side

Fn = Callable[[], object]


class Settled:
    """A case's call, plus the call that settles the work it defers (for the gates)."""

    def __init__(self, call: Fn, settle: Callable[[], None]) -> None:
        self.call, self.settle = call, settle

    def __call__(self) -> object:
        return self.call()

    def settled(self) -> object:
        out = self.call()
        self.settle()
        return out


def _drain(inspector: Any) -> None:
    """Folds an inspector's deferred steps (a no-op for revisions that defer nothing)."""
    for state in getattr(inspector, "layers", {}).values():
        drain = getattr(state, "drain", None)
        if drain is not None:
            drain()


def _sizes(device: str, quick: bool) -> dict[str, Any]:
    if device == "cuda":
        return dict(hidden=1024, experts=32, max_k=8, inner=1024, tokens=4096, dtype="bfloat16")
    if quick:
        return dict(hidden=64, experts=8, max_k=4, inner=128, tokens=128, dtype="float32")
    return dict(hidden=128, experts=16, max_k=4, inner=256, tokens=256, dtype="float32")


class CaseBuilder:
    """Builds the suite's cases against whichever moe_devkit is importable."""

    def __init__(self, device: str, quick: bool) -> None:
        from moe_devkit.config import RouterConfig

        self.device = torch.device(device)
        s = _sizes(device, quick)
        self.dtype = getattr(torch, s["dtype"])
        self.config = RouterConfig(
            hidden_size=s["hidden"], num_experts=s["experts"], max_k=s["max_k"],
            expert_hidden_size=s["inner"], mode="complexity",
        )  # fmt: skip
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(s["tokens"], s["hidden"], generator=gen).to(self.device)

    def build(self, name: str) -> Fn | str:
        """A zero-argument callable for case ``name``, or the reason it is skipped."""
        torch.manual_seed(0)
        method = getattr(self, "_" + name.replace(".", "_"), None)
        if method is None:
            return f"unknown case {name!r}"
        result: Fn | str = method()
        return result

    def _no_grad(self, module: torch.nn.Module, x: torch.Tensor) -> Fn:
        module = module.to(self.device).eval()

        def call() -> object:
            with torch.no_grad():
                return module(x)

        return call

    def _router(self, **overrides: Any) -> torch.nn.Module:
        from dataclasses import replace

        from moe_devkit.routers.torch_router import DynamicMoERouter

        return DynamicMoERouter(replace(self.config, **overrides))

    def _router_static(self) -> Fn:
        from moe_devkit.routers.torch_router import StaticTopKRouter

        return self._no_grad(StaticTopKRouter(self.config), self.x)

    def _router_dynamic(self) -> Fn:
        return self._no_grad(self._router(), self.x)

    def _router_top_p(self) -> Fn:
        return self._no_grad(self._router(mode="top_p", top_p=0.6), self.x)

    def _layer(self, static: bool) -> Fn:
        from moe_devkit.routers.torch_router import MoELayer, StaticTopKRouter

        router = StaticTopKRouter(self.config) if static else None
        layer = MoELayer(self.config, router=router).to(dtype=self.dtype)
        return self._no_grad(layer, self.x.to(self.dtype))

    def _layer_static(self) -> Fn:
        return self._layer(static=True)

    def _layer_dynamic(self) -> Fn:
        return self._layer(static=False)

    def _model_module(self) -> torch.nn.Module:
        from moe_devkit.routers.torch_router import MoEModel

        return MoEModel(self.config, num_layers=2).to(self.device)

    def _model(self) -> Fn:
        return self._no_grad(self._model_module(), self.x)

    def _utilization(self) -> Fn | str:
        mod = _optional("moe_devkit.diagnostics.utilization")
        if isinstance(mod, str):
            return mod
        fn = getattr(mod, "utilization_from_decision", None)
        if fn is None:  # an older revision, compared with --against
            return "moe_devkit.diagnostics.utilization has no utilization_from_decision here"
        routing = self._routing()
        return lambda: fn(routing)

    def _routing(self) -> Any:
        with torch.no_grad():
            return self._router().to(self.device)(self.x)

    def _inspector(self) -> Fn | str:
        mod = _optional("moe_devkit.inspect")
        if isinstance(mod, str):
            return mod
        inspector_cls = getattr(mod, "RouterInspector", None)
        if inspector_cls is None:
            return "moe_devkit.inspect has no RouterInspector yet"
        model = self._model_module()
        inspector = inspector_cls()
        inspector.attach(model)
        return Settled(self._no_grad(model, self.x), lambda: _drain(inspector))

    def _gradients(self) -> Fn | str:
        mod = _optional("moe_devkit.diagnostics.gradients")
        if isinstance(mod, str):
            return mod
        stats = getattr(mod, "gradient_statistics", None)
        if stats is None:
            return "moe_devkit.diagnostics.gradients has no gradient_statistics yet"
        model = self._model_module()
        out = model(self.x)
        (out.hidden_states.float().square().mean() + out.aux_loss).backward()
        return lambda: stats(model)


def _optional(module: str) -> ModuleType | str:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        return f"{module} is not importable in this revision ({exc})"


def _load_gates(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("_moe_perf_gates", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


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


def worker_main(args: argparse.Namespace) -> int:
    """Serves JSON-line requests (see moe_devkit.diagnostics.perf_worker) on stdin/stdout."""
    if args.threads:
        torch.set_num_threads(args.threads)
    builder = CaseBuilder(args.device, args.quick)
    gates = _load_gates(args.gates_file)
    fns: dict[str, Fn | str] = {}
    for line in sys.stdin:
        req = json.loads(line)
        op = req.get("op")
        if op == "quit":
            return 0
        try:
            reply = _serve(req, builder, fns, gates)
        except Exception as exc:  # the parent shows it; the worker keeps serving
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


def _serve(
    req: dict[str, Any], builder: CaseBuilder, fns: dict[str, Fn | str], gates: ModuleType
) -> dict[str, Any]:
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
        result: dict[str, Any] = gates.measure_gates(gated, builder.device).to_dict()
        return result
    return {"error": f"unknown op {op!r}"}


# ----------------------------------------------------------------------------- parent side


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="moe-devkit performance-regression suite")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--against", default="HEAD", help="baseline git revision, or 'none'")
    parser.add_argument("--quick", action="store_true", help="reduced sizes and budget (CI)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases")
    parser.add_argument(
        "--budget", type=positive_float, help="seconds per case (default 20, quick 4)"
    )
    parser.add_argument("--min-effect", type=float, default=0.05)
    parser.add_argument("--update-baseline", action="store_true")
    parser.add_argument("--baseline-dir", type=Path, default=ROOT / "benchmarks" / "baselines")
    parser.add_argument("--json", type=Path, help="report path (default build/perf/DEVICE.json)")
    parser.add_argument(
        "--threads", type=non_negative_int, default=1, help="torch threads on CPU (0: keep)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gates-file", default=str(GATES_FILE), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args)
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)  # logs keep whole tables
    if args.device == "cuda" and not torch.cuda.is_available():
        console.print("[yellow]SKIPPED[/]: perf(device='cuda'): torch sees no CUDA device")
        return SKIP_EXIT
    check_args(parser, args)  # before minutes of timing, not after
    sys.path.insert(0, str(ROOT))  # the parent always uses the working tree's package
    from perf_runner import run_suite  # type: ignore[import-not-found]

    from moe_devkit.commands.common import UsageError

    try:
        result: int = run_suite(args, console)
    except UsageError as exc:  # a write that failed at the end (a full disk)
        console.print(f"perf_suite: error: {exc}", highlight=False)
        return 2
    return result


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits with a usage line for an option the run would trip over; sets the default
    --json path and opens the stored baseline (``args.baseline_store``)."""
    unknown = sorted(set(args.cases.split(",")) - set(CASES))
    if unknown:
        parser.error(f"--cases: unknown case(s) {unknown}; known: {list(CASES)}")
    check_range(parser, "--min-effect", args.min_effect, 0, 1, high_open=True)
    args.json = args.json or ROOT / "build" / "perf" / f"{args.device}.json"
    check_output_path(parser, args.json, "--json")
    baseline = args.baseline_dir / f"{args.device}.json"
    if args.update_baseline:
        check_output_path(parser, baseline, "--baseline-dir")
    args.baseline_store = open_baseline(parser, baseline, args.device)


def open_baseline(parser: argparse.ArgumentParser, path: Path, device: str) -> BaselineStore:
    """The stored baseline, checked whole now, before minutes of timing; a bad file is one
    line on stderr naming it and what is wrong, and exit 2."""
    from moe_devkit.diagnostics.perf_store import BaselineStore

    try:
        return BaselineStore(path, device=device)
    except ValueError as exc:
        message = str(exc)
    except OSError as exc:
        message = f"{path}: cannot be read ({exc.strerror or exc})"
    print(f"{parser.prog}: error: --baseline-dir: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())

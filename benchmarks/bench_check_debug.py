"""Benchmark check-debug against pre-commit-hooks' debug-statement-hook, in one run.

Usage: python benchmarks/bench_check_debug.py [--corpus DIR] [--repeat N] [--fix-repeat N]
       [--tree DIR]

Both tools run as the processes pre-commit starts: a console-script wrapper (the one pip
writes: `import re, sys; from ... import main; sys.exit(main())`) over byte-compiled packages,
as a hook environment holds them. check-debug is the working tree's (or --tree's) package,
copied and compiled into a temporary directory; the baseline is the installed pre-commit-hooks.
Start-up is included. The corpus is the `.py` files of the installed torch package unless
--corpus says otherwise; "typical commit" is five files of about 10 KB from it, checked in this
repository (whose pyproject.toml has a [tool.check-debug] table) and in a project without one.
`--fix`: one of those files with five debug statements added, fixed by a fresh process on a
fresh copy each time (the baseline cannot fix: it checks the same file). Runs alternate between
the tools, so other load on the machine hits both alike; medians are printed, with the machine
and its load average.
"""

from __future__ import annotations

import argparse
import ast
import compileall
import importlib.util
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _args import positive_int

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = """import re
import sys
from {module} import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""
# Added before the first top-level `def`s of the --fix file: what a debugging session leaves.
DEBUG_LINES = [
    "import pdb\n",
    "pdb.set_trace()\n",
    "breakpoint()\n",
    "import ipdb; ipdb.set_trace()\n",
    "breakpoint()\n",
]


@dataclass(frozen=True)
class Hook:
    """A hook's process: the interpreter, its wrapper script, the arguments before the files,
    and the environment it runs in."""

    name: str
    command: tuple[str, ...]
    env: dict[str, str]


def torch_dir() -> Path:
    spec = importlib.util.find_spec("torch")  # locates torch without importing it
    if spec is None or spec.origin is None:
        raise SystemExit("torch is not installed; pass --corpus DIR")
    return Path(spec.origin).parent


def hook_environment(tree: Path, scratch: Path) -> tuple[Hook, Hook]:
    """Return (baseline, check-debug) hooks: wrappers in `scratch`, `tree`'s package compiled.

    No file-size limit for check-debug: the baseline checks every file, so both do the same
    work.
    """
    site = scratch / "site"
    shutil.copytree(
        tree / "moe_devkit", site / "moe_devkit", ignore=shutil.ignore_patterns("__pycache__")
    )
    compileall.compile_dir(str(site), quiet=1)  # what pip does on install
    env = dict(os.environ, PYTHONPATH=str(site))
    hooks = []
    for name, module, args in (
        ("debug-statement-hook", "pre_commit_hooks.debug_statement_hook", ()),
        ("check-debug", "moe_devkit.lint", ("--max-file-size", "0")),
    ):
        script = scratch / name
        script.write_text(WRAPPER.format(module=module))
        hooks.append(Hook(name, (sys.executable, str(script), *args), env))
    return hooks[0], hooks[1]


def run_once(hook: Hook, args: list[str], cwd: Path) -> tuple[float, float]:
    """Return (wall, CPU) seconds of the hook on `args` (exit 0 or 1 expected)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(
        [*hook.command, *args], capture_output=True, env=hook.env, cwd=cwd, check=False
    )
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode not in (0, 1):
        raise SystemExit(result.stderr.decode(errors="replace"))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def compare(hooks: tuple[Hook, Hook], args: list[str], repeat: int, cwd: Path) -> dict[str, float]:
    """Return median wall and CPU times of both hooks, runs interleaved so load hits both."""
    runs: dict[str, list[float]] = {"base": [], "base_cpu": [], "ours": [], "ours_cpu": []}
    for _ in range(repeat):
        for name, hook in zip(("base", "ours"), hooks, strict=True):
            wall, cpu = run_once(hook, args, cwd)
            runs[name].append(wall)
            runs[f"{name}_cpu"].append(cpu)
    return {name: statistics.median(values) for name, values in runs.items()}


def typical_commit(files: list[Path]) -> list[str]:
    sized = sorted((p for p in files if 9_000 <= p.stat().st_size <= 11_000), key=str)
    return [str(p) for p in sized[:5]]


def with_debug_statements(source: Path, target: Path) -> int:
    """Write `source` with DEBUG_LINES before its first top-level functions (above their
    decorators); return the number of lines added."""
    text = source.read_text(encoding="utf-8")
    functions = [
        node
        for node in ast.parse(text).body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    starts = {min([f.lineno] + [d.lineno for d in f.decorator_list]) for f in functions}
    pending = list(DEBUG_LINES)
    out = []
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        if number in starts and pending:
            out.append(pending.pop(0))
        out.append(line)
    target.write_text("".join(out), encoding="utf-8")
    return len(DEBUG_LINES) - len(pending)


def time_fix(
    hooks: tuple[Hook, Hook], template: Path, repeat: int, scratch: Path
) -> dict[str, float]:
    """Median wall and CPU of `check-debug --fix` on a fresh copy of `template` (a new file
    each run: the fix itself is timed, never a no-op), beside the baseline checking it."""
    runs: dict[str, list[float]] = {"base": [], "base_cpu": [], "ours": [], "ours_cpu": []}
    base, ours = hooks
    for index in range(repeat):
        copy = scratch / f"fix{index}.py"
        shutil.copyfile(template, copy)
        for name, hook, args in (("base", base, []), ("ours", ours, ["--fix"])):
            wall, cpu = run_once(hook, [*args, str(copy)], scratch)
            runs[name].append(wall)
            runs[f"{name}_cpu"].append(cpu)
        if copy.read_bytes() == template.read_bytes():
            raise SystemExit(f"bench_check_debug: --fix left {copy} unchanged")
    return {name: statistics.median(values) for name, values in runs.items()}


def report_commit(label: str, c: dict[str, float]) -> None:
    print(
        f"commit  {label}: debug-statement-hook {c['base'] * 1e3:5.1f} ms wall "
        f"{c['base_cpu'] * 1e3:5.1f} ms CPU; check-debug {c['ours'] * 1e3:5.1f} ms wall "
        f"{c['ours_cpu'] * 1e3:5.1f} ms CPU; ratio (wall) {c['ours'] / c['base']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=None)
    parser.add_argument(
        "--repeat", type=positive_int, default=3, help="runs over the corpus (median)"
    )
    parser.add_argument(
        "--commit-repeat", type=positive_int, default=21, help="runs on the typical commit"
    )
    parser.add_argument("--fix-repeat", type=positive_int, default=21, help="--fix runs")
    parser.add_argument(
        "--tree", type=Path, default=ROOT, help="checkout whose check-debug is timed"
    )
    args = parser.parse_args()
    if args.corpus is not None and not args.corpus.is_dir():
        parser.error(f"--corpus: expected a directory of .py files; got {str(args.corpus)!r}")
    if not (args.tree / "moe_devkit" / "lint").is_dir():
        parser.error(f"--tree: expected a moe-devkit checkout; got {str(args.tree)!r}")
    if importlib.util.find_spec("pre_commit_hooks") is None:
        raise SystemExit(
            "bench_check_debug: needs pre-commit-hooks (the baseline): pip install pre-commit-hooks"
        )
    corpus = (args.corpus or torch_dir()).resolve()
    files = sorted(corpus.rglob("*.py"))
    if not files:
        parser.error(f"--corpus {str(corpus)!r} holds no .py files")
    with tempfile.TemporaryDirectory(prefix="bench-check-debug-") as scratch_dir:
        scratch = Path(scratch_dir)
        hooks = hook_environment(args.tree, scratch)
        run(args, hooks, files, corpus, scratch)


def run(
    args: argparse.Namespace,
    hooks: tuple[Hook, Hook],
    files: list[Path],
    corpus: Path,
    scratch: Path,
) -> None:
    size = sum(p.stat().st_size for p in files)
    print(f"machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"python: {platform.python_version()}; check-debug from {args.tree}")
    print(f"corpus: {corpus}: {len(files)} files, {size / 1e6:.1f} MB")
    print(f"load average before: {os.getloadavg()[0]:.2f} (other work skews wall time)")
    commit = typical_commit(files)
    plain = scratch / "project"  # a pyproject.toml without [tool.check-debug]
    plain.mkdir()
    (plain / "pyproject.toml").write_text('[project]\nname = "example"\n')
    n = len(commit)
    mine = compare(hooks, commit, args.commit_repeat, ROOT)
    report_commit(f"{n} files of ~10 KB, this repository", mine)
    report_commit(
        f"{n} files of ~10 KB, no [tool.check-debug]",
        compare(hooks, commit, args.commit_repeat, plain),
    )
    template = scratch / "template.py"
    for source in commit:  # the first with a top-level function for each debug line
        added = with_debug_statements(Path(source), template)
        if added == len(DEBUG_LINES):
            break
    f = time_fix(hooks, template, args.fix_repeat, scratch)
    print(
        f"fix     {template.stat().st_size / 1e3:.1f} KB file, {added} debug lines: "
        f"check-debug --fix {f['ours'] * 1e3:.1f} ms wall {f['ours_cpu'] * 1e3:.1f} ms CPU "
        f"per file (goal < 100 ms); debug-statement-hook checking it (it cannot fix) "
        f"{f['base'] * 1e3:.1f} ms wall {f['base_cpu'] * 1e3:.1f} ms CPU"
    )
    t = compare(hooks, [str(p) for p in files], args.repeat, ROOT)
    count = len(files)
    print(f"corpus  debug-statement-hook: {t['base']:6.2f} s wall {t['base_cpu']:6.2f} s CPU")
    print(f"corpus  check-debug:          {t['ours']:6.2f} s wall {t['ours_cpu']:6.2f} s CPU")
    print(
        f"corpus  files/s: debug-statement-hook {count / t['base']:.0f}, "
        f"check-debug {count / t['ours']:.0f}"
    )
    print(f"corpus  ratio (wall): {t['ours'] / t['base']:.2f}  (goal <= 1.0, must be <= 2.0)")
    print(f"corpus  ratio (CPU):  {t['ours_cpu'] / t['base_cpu']:.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

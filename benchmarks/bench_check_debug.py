"""Benchmark check-debug against pre-commit-hooks' debug-statement-hook, in one run.

Usage: python benchmarks/bench_check_debug.py [--corpus DIR] [--repeat N]

Both tools run as fresh processes on the same file list (start-up included). The corpus is the
`.py` files of the installed torch package unless --corpus says otherwise; "typical commit" is
five files of about 10 KB from it. Prints the machine, the times, the ratios and files/s.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _args import positive_int

ROOT = Path(__file__).resolve().parents[1]
# No size limit: the baseline checks every file, so both tools do the same work.
OURS = (
    "import sys; from moe_devkit.lint import main; "
    "sys.exit(main(['--max-file-size', '0', *sys.argv[1:]]))"
)
BASELINE = "import sys; from pre_commit_hooks.debug_statement_hook import main; sys.exit(main())"


def torch_dir() -> Path:
    spec = importlib.util.find_spec("torch")  # locates torch without importing it
    if spec is None or spec.origin is None:
        raise SystemExit("torch is not installed; pass --corpus DIR")
    return Path(spec.origin).parent


def run_once(code: str, files: list[str]) -> tuple[float, float]:
    """Return (wall, CPU) seconds of `python -c code FILES...` (exit 0 or 1 expected)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code, *files], capture_output=True, env=env, check=False
    )
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode not in (0, 1):
        raise SystemExit(result.stderr.decode(errors="replace"))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def compare(files: list[str], repeat: int) -> dict[str, float]:
    """Return median wall and CPU times of both tools, runs interleaved so load hits both."""
    runs: dict[str, list[float]] = {"base": [], "base_cpu": [], "ours": [], "ours_cpu": []}
    for _ in range(repeat):
        for name, code in (("base", BASELINE), ("ours", OURS)):
            wall, cpu = run_once(code, files)
            runs[name].append(wall)
            runs[f"{name}_cpu"].append(cpu)
    return {name: statistics.median(values) for name, values in runs.items()}


def typical_commit(files: list[Path]) -> list[str]:
    sized = sorted((p for p in files if 9_000 <= p.stat().st_size <= 11_000), key=str)
    return [str(p) for p in sized[:5]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=None)
    parser.add_argument(
        "--repeat", type=positive_int, default=3, help="runs over the corpus (median)"
    )
    args = parser.parse_args()
    if args.corpus is not None and not args.corpus.is_dir():
        parser.error(f"--corpus: expected a directory of .py files; got {str(args.corpus)!r}")
    if importlib.util.find_spec("pre_commit_hooks") is None:
        raise SystemExit(
            "bench_check_debug: needs pre-commit-hooks (the baseline): pip install pre-commit-hooks"
        )
    corpus = args.corpus or torch_dir()
    files = sorted(corpus.rglob("*.py"))
    if not files:
        parser.error(f"--corpus {str(corpus)!r} holds no .py files")
    size = sum(p.stat().st_size for p in files)
    print(f"machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"python: {platform.python_version()}; corpus: {corpus}")
    print(f"corpus: {len(files)} files, {size / 1e6:.1f} MB")
    names = [str(p) for p in files]
    load = os.getloadavg()[0]
    t = compare(names, args.repeat)
    n = len(files)
    print(f"load average before: {load:.2f} (other work on the machine skews wall time)")
    print(f"corpus  debug-statement-hook: {t['base']:6.2f} s wall {t['base_cpu']:6.2f} s CPU")
    print(f"corpus  check-debug:          {t['ours']:6.2f} s wall {t['ours_cpu']:6.2f} s CPU")
    print(
        f"corpus  files/s: debug-statement-hook {n / t['base']:.0f}, "
        f"check-debug {n / t['ours']:.0f}"
    )
    print(f"corpus  ratio (wall): {t['ours'] / t['base']:.2f}  (goal <= 1.0, must be <= 2.0)")
    print(f"corpus  ratio (CPU):  {t['ours_cpu'] / t['base_cpu']:.2f}")
    commit = typical_commit(files)
    c = compare(commit, 9)
    print(f"commit  {len(commit)} files of ~10 KB: debug-statement-hook {c['base']:.3f} s wall")
    print(
        f"commit  {len(commit)} files of ~10 KB: check-debug {c['ours']:.3f} s wall (goal <= 0.3)"
    )


if __name__ == "__main__":
    main()

"""The performance-regression suite run by ``nox -s perf`` (the code is in benchmarks/perf/).

Each case is timed in two worker processes, the working tree (candidate) and a git revision
exported side by side (baseline, ``--against``, default HEAD), and sampled alternately; a
difference stands only when it is significant, at least the minimum effect, and found again
by a fresh pair of workers. The deterministic gates (operators, FLOPs, CUDA host syncs,
memory growth) are compared between the two sides as well.

Exit codes: 0 no regression, 1 a confirmed regression, 2 usage error (a stored baseline
that is not a valid baseline file included), 77 skipped (CUDA asked for where none exists).

Usage:
    python benchmarks/perf_suite.py --device cpu [--against main] [--quick]
    python benchmarks/perf_suite.py --device cuda --update-baseline

The parent process is ``perf.suite``; ``perf_suite.py --worker ...`` is a worker process
(``perf.serve``), which the parent starts once with each tree.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:  # imports nothing of moe_devkit that an old revision lacks
        from perf.serve import main as serve

        return serve(argv)
    from perf.suite import main as suite

    return suite(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""The performance-regression suite behind ``nox -s perf`` (``benchmarks/perf_suite.py``).

The statistics are the package's (``moe_devkit.diagnostics.regression``); this harness
around them runs the suite:

* ``suite``: the command line, every option checked before any timing;
* ``runner``: the parent process: workers, interleaved A/B decisions, the confirmation of a
  difference by fresh workers, the gates, the table and the JSON report;
* ``worker``: worker processes, a git revision exported side by side, core placement;
* ``serve`` and ``cases``: the worker half, which builds and times the cases against the
  ``moe_devkit`` first on its PYTHONPATH (an older revision's, in the baseline worker);
* ``gates``: what is counted instead of timed (operators, FLOPs, host syncs, memory growth);
* ``store``: stored baselines (benchmarks/baselines/<device>.json);
* ``describe``: how the gates and the store name a bad value.

``serve``, ``cases``, ``gates`` and ``describe`` import no part of moe_devkit that an older
revision lacks, since the baseline worker runs them beside that revision's package.
"""

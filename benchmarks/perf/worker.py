"""Side-by-side revisions: export a git revision to a temporary tree and time it in a worker.

Baseline and candidate each run in their own worker process (same Python, same torch, the
same environment but for the tree first on PYTHONPATH, and the same allocator settings,
``ALLOCATOR_ENV``), so the two sides see the same process conditions; the parent alternates
their samples. A worker (``perf_suite.py --worker``: ``perf.serve``) speaks JSON lines on
stdin/stdout:

    {"op": "setup", "case": NAME}            -> {"ok": true} | {"skip": REASON}
    {"op": "sample", "case": NAME, "number": N}
                                -> {"wall": s, "cpu": s, "number": N, "faults": per call}
    {"op": "gates", "case": NAME}            -> Gates.to_dict()
    {"op": "info"}                           -> {"moe_devkit": path, ...}
    {"op": "quit"}
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from moe_devkit.diagnostics.regression import Sample, Sampler

ALLOCATOR_ENV: Mapping[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
}
"""glibc malloc settings of every worker: blocks up to 32 MiB come from the heap, and the heap
is not handed back to the system while a worker runs.

With glibc's defaults a CPU tensor buffer of more than 128 KiB may be mapped fresh on each
allocation (or the top of the heap trimmed on each free), so every call of a case page-faults
its buffers in again, and the kernel's work counts in the worker's thread CPU time. Whether
it does depends on the process's own allocation history (glibc moves its threshold as blocks
are freed), not on the code under test: two workers running identical code differed by up
to 30% (the two-layer model case: one worker faulted about 1600 pages a call, the other
none). Fixed thresholds remove the history: once a case has run, neither side faults,
whatever it ran before. Other C libraries ignore these variables.
"""


def worker_environment(
    tree: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a worker importing from ``tree``: this process's, the allocator
    settings, ``env``, and ``tree`` put first on PYTHONPATH (the only difference between a
    baseline and a candidate worker)."""
    environ = dict(os.environ) | dict(ALLOCATOR_ENV) | dict(env or {})
    rest = environ.get("PYTHONPATH", "")
    environ["PYTHONPATH"] = os.pathsep.join([str(tree), rest]) if rest else str(tree)
    return environ


class RevisionError(RuntimeError):
    """A git revision could not be resolved or exported."""


def resolve_revision(rev: str, repo: str | os.PathLike[str] = ".") -> str:
    """The full commit hash of ``rev``.

    Raises:
        RevisionError: not a git repository, or no such revision.
    """
    proc = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RevisionError(
            f"cannot resolve git revision {rev!r} in {repo} ({proc.stderr.strip()})"
        )
    return proc.stdout.strip()


def export_revision(
    rev: str, dest: str | os.PathLike[str], repo: str | os.PathLike[str] = "."
) -> Path:
    """Writes the tree of ``rev`` into ``dest`` with ``git archive`` (no worktree state).

    Raises:
        RevisionError: the revision does not exist or git failed.
    """
    commit = resolve_revision(rev, repo)
    proc = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", commit],
        capture_output=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RevisionError(f"git archive {rev} failed: {proc.stderr.decode(errors='replace')}")
    target = Path(dest)
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(target, filter="data")
    return target


class WorkerProcess:
    """A benchmark worker importing ``moe_devkit`` from ``tree`` (a checkout or export).

    Args:
        script: the worker script (run as ``python script --worker ARGS``).
        tree: directory put first on PYTHONPATH, so its ``moe_devkit`` is the one imported.
        args: extra arguments for the worker.
        env: extra environment variables (``worker_environment``).
    """

    def __init__(
        self,
        script: str | os.PathLike[str],
        tree: str | os.PathLike[str],
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--worker", *args], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=worker_environment(tree, env), bufsize=1,
        )  # fmt: skip

    def request(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Sends one request and returns the reply.

        Raises:
            RuntimeError: the worker exited or answered with an error.
        """
        stdin, stdout = self._pipes()
        stdin.write(json.dumps(dict(message)) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker exited (code {self.proc.poll()})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"benchmark worker: {reply['error']}")
        return reply

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        if self.proc.stdin is None or self.proc.stdout is None:
            raise RuntimeError("benchmark worker has no pipes")
        return self.proc.stdin, self.proc.stdout

    def sampler(self, case: str, faults: list[float] | None = None) -> Sampler:
        """A Sampler that times ``case`` in this worker.

        Args:
            case: the case's name.
            faults: where to append each sample's page faults per call (NaN where the
                worker does not count them).
        """

        def sample(number: int) -> Sample:
            reply = self.request({"op": "sample", "case": case, "number": number})
            if faults is not None:
                faults.append(float(reply.get("faults", math.nan)))
            return Sample(float(reply["wall"]), float(reply["cpu"]), int(reply["number"]))

        return sample

    def pin(self, cpu: int) -> None:
        """Moves every thread of the worker onto ``cpu`` (no-op where affinity is not
        supported)."""
        set_affinity = getattr(os, "sched_setaffinity", None)
        if set_affinity is None:
            return
        try:
            threads = [int(t) for t in os.listdir(f"/proc/{self.proc.pid}/task")]
        except OSError:  # no /proc: the main thread, which the worker's threads follow
            threads = [self.proc.pid]
        for tid in threads:
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                set_affinity(tid, {cpu})

    def close(self) -> None:
        """Asks the worker to quit; kills it if it does not."""
        try:
            if self.proc.poll() is None:
                stdin, _ = self._pipes()
                stdin.write(json.dumps({"op": "quit"}) + "\n")
                stdin.flush()
                self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired, RuntimeError):
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- placement

CpuTicks = dict[int, tuple[int, int]]
"""Per-CPU (busy, total) clock ticks since boot."""


def parse_cpu_ticks(stat: str) -> CpuTicks:
    """Per-CPU busy and total ticks from the text of Linux's ``/proc/stat``.

    Busy is everything but idle and I/O wait; steal (the hypervisor running other guests)
    counts as busy, since the CPU was not there to run on. Guest time is already in user.
    """
    ticks: CpuTicks = {}
    for line in stat.splitlines():
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        # user nice system idle iowait irq softirq steal (then guest, guest_nice)
        fields = [int(v) for v in rest.split()[:8]]
        idle = sum(fields[3:5])
        ticks[int(name[3:])] = (sum(fields) - idle, sum(fields))
    return ticks


def read_cpu_ticks() -> CpuTicks | None:
    """This machine's per-CPU ticks, or None where there is no ``/proc/stat``."""
    try:
        with open("/proc/stat") as handle:
            return parse_cpu_ticks(handle.read())
    except OSError:
        return None


def quietest_cpu(
    cpus: Collection[int],
    *,
    prefer: int | None = None,
    window_s: float = 0.25,
    margin: float = 0.1,
    read: Callable[[], CpuTicks | None] = read_cpu_ticks,
    sleep: Callable[[float], None] = time.sleep,
) -> int | None:
    """The CPU of ``cpus`` that was least busy over the next ``window_s`` seconds.

    Call it while the processes to be placed are idle: what it sees busy is everybody
    else's work. ``prefer`` (the CPU they are on) is kept unless another CPU was quieter by
    more than ``margin`` (a fraction of the window), so that placement does not flap
    between two equally quiet CPUs. None where the ticks cannot be read.
    """
    before = read()
    sleep(window_s)
    after = read()
    if not before or not after:
        return None
    busy: dict[int, float] = {}
    for cpu in cpus:
        if cpu in before and cpu in after:
            total = after[cpu][1] - before[cpu][1]
            busy[cpu] = (after[cpu][0] - before[cpu][0]) / total if total > 0 else 0.0
    if not busy:
        return None
    best = min(busy, key=lambda c: (busy[c], c))
    if prefer in busy and busy[prefer] <= busy[best] + margin:
        return prefer
    return best


class CorePlacement:
    """Keeps benchmark workers together on one CPU, the one other processes leave quietest.

    Two workers sharing one CPU run in turns, so neither is favoured by where it runs; a
    busy process on that CPU, though, time-slices every sample of both (the decision sets
    such pairs aside and ends inconclusive). ``settle`` measures the CPUs while the workers
    are idle and moves both to the quietest; call it before each batch of samples.

    Args:
        workers: the workers to keep together.
        cpus: the CPUs they may use (default: this process's affinity).
        window_s: how long ``settle`` watches the CPUs.
    """

    def __init__(
        self,
        workers: Sequence[WorkerProcess],
        cpus: Collection[int] | None = None,
        *,
        window_s: float = 0.25,
        quietest: Callable[..., int | None] = quietest_cpu,
    ) -> None:
        if cpus is None:
            cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.workers = list(workers)
        self.cpus = sorted(cpus)
        self.window_s = window_s
        self._quietest = quietest
        self.cpu: int | None = self.cpus[-1] if self.cpus else None
        self.moves = 0
        if self.cpu is not None:
            for worker in self.workers:
                worker.pin(self.cpu)

    def settle(self) -> None:
        """Moves the workers to the quietest CPU, if it is not the one they are on."""
        if len(self.cpus) < 2:
            return
        cpu = self._quietest(self.cpus, prefer=self.cpu, window_s=self.window_s)
        if cpu is None or cpu == self.cpu:
            return
        for worker in self.workers:
            worker.pin(cpu)
        self.cpu = cpu
        self.moves += 1

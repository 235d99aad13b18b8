"""`check-debug [--fix] PATH...`: the command line, and the work spread over processes."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace

from moe_devkit.lint.checker import FileResult, Finding, check_file
from moe_devkit.lint.config import ConfigError, Settings, load_settings, settings_from_table
from moe_devkit.lint.rules import RULES

SKIP_DIRS = frozenset(
    {".git", ".hg", ".venv", "venv", ".nox", ".tox", "__pycache__", "build", "dist"}
)
# Below this much work a process pool costs more than it saves (fork plus imports ~ 50 ms).
PARALLEL_MIN_FILES = 16
PARALLEL_MIN_BYTES = 2_000_000


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser."""
    parser = argparse.ArgumentParser(
        prog="check-debug",
        description="Find (and with --fix remove) leftover debug statements in Python files.",
    )
    parser.add_argument(
        "paths", nargs="*", help="files or directories (directories: their .py files)"
    )
    parser.add_argument("--fix", action="store_true", help="remove what can be removed safely")
    parser.add_argument("--select", help="comma-separated codes or prefixes to check (e.g. DBG0)")
    parser.add_argument("--ignore", help="comma-separated codes or prefixes not to check")
    parser.add_argument("--config", help="pyproject.toml to read [tool.check-debug] from")
    parser.add_argument("--jobs", "-j", type=int, default=0, help="processes (default: all cores)")
    parser.add_argument(
        "--all-syntax",
        action="store_true",
        help="also parse files that cannot hold a finding, to report their syntax errors",
    )
    parser.add_argument("--list-rules", action="store_true", help="print the rule codes and exit")
    return parser


def iter_python_files(paths: Iterable[str], settings: Settings) -> Iterator[str]:
    """Yield the files to check: files as given, directories' `.py` files; minus excludes."""
    seen: set[str] = set()
    for path in _expand(paths, settings):
        key = os.path.normpath(path)
        if key not in seen:
            seen.add(key)
            yield path


def _expand(paths: Iterable[str], settings: Settings) -> Iterator[str]:
    for path in paths:
        if os.path.isdir(path):
            for directory, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
                for name in sorted(files):
                    if name.endswith((".py", ".pyi")):
                        full = os.path.join(directory, name)
                        if not settings.excluded(settings.relative(full)):
                            yield full
        elif not settings.excluded(settings.relative(path)):
            yield path


def _check_one(job: tuple[str, Settings, bool]) -> FileResult:
    path, settings, fix = job
    try:
        return check_file(path, settings, fix)
    except Exception as err:  # one bad file must not stop the others
        message = f"internal error, file not checked: {type(err).__name__}: {err}"
        return FileResult((Finding(path, 1, 1, "DBG900", message),))


def check_paths(files: list[str], settings: Settings, fix: bool, jobs: int) -> list[FileResult]:
    """Check files, in parallel when there is enough work to pay for the processes."""
    work = [(path, settings, fix) for path in files]
    size = sum(os.path.getsize(p) for p in files[: PARALLEL_MIN_FILES * 4] if os.path.isfile(p))
    jobs = jobs or os.cpu_count() or 1
    if jobs < 2 or len(files) < PARALLEL_MIN_FILES or size < PARALLEL_MIN_BYTES // 4:
        return [_check_one(job) for job in work]
    method = _start_method()
    if method is None:  # a threaded host process (tests, notebooks): stay serial
        return [_check_one(job) for job in work]
    import multiprocessing

    with multiprocessing.get_context(method).Pool(jobs) as pool:
        return list(pool.imap(_check_one, work, chunksize=4))


def _start_method() -> str | None:
    """How to start workers: fork from a single-threaded process (the CLI, the hook).

    Forking a process that runs other threads (JAX's or torch's pools, when check_paths is
    called from a test run or a notebook) can deadlock the child, and spawn needs an
    importable ``__main__``; such callers get a serial run (None). Elsewhere than Linux: spawn.
    """
    import threading

    threaded = threading.active_count() > 1 or any(m in sys.modules for m in ("jax", "torch"))
    if sys.platform == "linux":
        return None if threaded else "fork"
    return "spawn"


def write_atomically(path: str, data: bytes) -> None:
    """Replace a file's contents through a temporary file and a rename, keeping its mode."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".check-debug-")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.chmod(temporary, os.stat(path).st_mode & 0o7777)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    if args.all_syntax:
        settings = replace(settings, all_syntax=True)
    if args.select:
        table = {"select": [c.strip() for c in args.select.split(",") if c.strip()]}
        settings = replace(settings, select=settings_from_table(table).select)
    if args.ignore:
        table = {"ignore": [c.strip() for c in args.ignore.split(",") if c.strip()]}
        ignored = settings_from_table(table).ignore
        settings = replace(settings, ignore=settings.ignore + ignored)
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    """Run check-debug; return 0 when clean, 1 for findings or fixed files, 2 for usage errors."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.list_rules:
        sys.stdout.write("".join(f"{r.code} {r.name}: {r.summary}\n" for r in RULES))
        return 0
    try:
        settings = _settings(args)
    except ConfigError as err:
        sys.stderr.write(f"check-debug: error: {err}\n")
        return 2
    files = list(iter_python_files(args.paths, settings))
    results = check_paths(files, settings, args.fix, args.jobs)
    return _report(files, results)


def _report(files: list[str], results: list[FileResult]) -> int:
    status = 0
    findings: list[Finding] = []
    for path, result in zip(files, results, strict=True):
        findings.extend(result.findings)
        if result.new_data is not None:
            write_atomically(path, result.new_data)
            sys.stderr.write(f"Fixed {result.fixed} finding(s) in {path}\n")
            status = 1
    sys.stdout.write("".join(f"{finding}\n" for finding in sorted(findings)))
    return 1 if findings else status

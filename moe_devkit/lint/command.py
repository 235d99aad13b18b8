"""`check-debug [--fix] [PATH...]`: the command line, and the work spread over processes."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

from moe_devkit._argparse import ArgumentParser
from moe_devkit.lint.checker import FileResult, Finding, check_file
from moe_devkit.lint.config import (
    ConfigError,
    Settings,
    file_size,
    load_settings,
    settings_from_table,
)
from moe_devkit.lint.paths import PathError, iter_python_files, missing_paths, repository_files
from moe_devkit.lint.rules import RULES

# Below this much work a process pool costs more than it saves (fork plus imports ~ 50 ms).
PARALLEL_MIN_FILES = 16
PARALLEL_MIN_BYTES = 2_000_000


@dataclass(frozen=True)
class Job:
    """One file to check, and how."""

    path: str
    settings: Settings
    fix: bool
    unsafe_fixes: bool


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser."""
    parser = ArgumentParser(
        prog="check-debug",
        description="Find (and with --fix remove) leftover debug statements in Python files.",
    )
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="files or directories (directories: their .py files); none: the Python files "
        "git tracks or would add under the current directory",
    )
    parser.add_argument("--fix", action="store_true", help="remove what can be removed safely")
    parser.add_argument(
        "--unsafe-fixes",
        action="store_true",
        help="with --fix, also remove prints (DBG101, DBG102): this changes the program's output",
    )
    parser.add_argument("--select", help="comma-separated codes or prefixes to check (e.g. DBG0)")
    parser.add_argument("--ignore", help="comma-separated codes or prefixes not to check")
    parser.add_argument("--config", help="pyproject.toml to read [tool.check-debug] from")
    parser.add_argument("--jobs", "-j", type=int, default=0, help="processes (default: all cores)")
    parser.add_argument(
        "--all-syntax",
        action="store_true",
        help="also parse files that cannot hold a finding, to report their syntax errors",
    )
    parser.add_argument(
        "--max-file-size",
        type=_byte_count,
        metavar="BYTES",
        help="skip larger files with a note (default 1000000; 0: no limit)",
    )
    parser.add_argument("--list-rules", action="store_true", help="print the rule codes and exit")
    return parser


def _byte_count(text: str) -> int:
    try:
        return file_size(int(text), "--max-file-size")
    except (ValueError, ConfigError):
        raise argparse.ArgumentTypeError(
            f"expected a whole number of bytes >= 0 (0: no limit); got {text!r}"
        ) from None


def _check_one(job: Job) -> FileResult:
    try:
        return check_file(job.path, job.settings, job.fix, job.unsafe_fixes)
    except Exception as err:  # one bad file must not stop the others
        message = f"internal error, file not checked: {type(err).__name__}: {err}"
        return FileResult((Finding(job.path, 1, 1, "DBG900", message),))


def check_paths(
    files: list[str], settings: Settings, fix: bool, jobs: int, unsafe_fixes: bool = False
) -> list[FileResult]:
    """Check files, in parallel when there is enough work to pay for the processes."""
    work = [Job(path, settings, fix, unsafe_fixes) for path in files]
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
    import tempfile  # only to write fixes: checking alone starts faster without it

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
    if args.max_file_size is not None:
        settings = replace(settings, max_file_size=args.max_file_size)
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
        if args.unsafe_fixes and not args.fix:
            parser.error("--unsafe-fixes only applies with --fix; pass both")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.list_rules:
        sys.stdout.write("".join(f"{r.code} {r.name}: {r.summary}\n" for r in RULES))
        return 0
    try:
        settings = _settings(args)
        paths = args.paths or repository_files()
    except (ConfigError, PathError) as err:
        sys.stderr.write(f"check-debug: error: {err}\n")
        return 2
    existing = _existing(paths)
    files = list(iter_python_files(existing, settings))
    results = check_paths(files, settings, args.fix, args.jobs, args.unsafe_fixes)
    status = _report(files, results)
    return 2 if len(existing) < len(paths) else status


def _existing(paths: list[str]) -> list[str]:
    """Return the paths that exist, after one usage-error line for each that does not."""
    missing = missing_paths(paths)
    for path in missing:
        sys.stderr.write(
            f"check-debug: error: argument PATH: no such file or directory: {path!r}\n"
        )
    return [path for path in paths if path not in missing]


def _report(files: list[str], results: list[FileResult]) -> int:
    status = 0
    findings: list[Finding] = []
    for path, result in zip(files, results, strict=True):
        findings.extend(result.findings)
        if result.skipped is not None:
            sys.stderr.write(f"check-debug: skipped {path}: {result.skipped}\n")
        if result.new_data is not None:
            write_atomically(path, result.new_data)
            sys.stderr.write(f"Fixed {result.fixed} finding(s) in {path}\n")
            status = 1
    withheld = sum(result.withheld for result in results)
    if withheld:
        sys.stderr.write(
            f"check-debug: {withheld} print(s) kept: removing one changes the program's output; "
            "add --unsafe-fixes to remove them\n"
        )
    sys.stdout.write("".join(f"{finding}\n" for finding in sorted(findings)))
    return 1 if findings else status

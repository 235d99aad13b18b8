"""The moe-devkit command line: the main job runs, mistakes give one line and exit 2."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_devkit.cli import main
from moe_devkit.commands.common import UsageError, check_output


def test_diagnose_prints_utilization_and_k_histogram(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", "--steps", "2", "--batch", "2", "--seq", "16"]) == 0
    out = capsys.readouterr().out
    assert "Expert utilization" in out
    assert "Experts per token (k)" in out
    assert "mean" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["diagnose", "--min-k", "5"], "min_k must be <= max_k; got min_k=5, max_k=4"),
        (["diagnose", "--max-k", "40"], "max_k must be <= num_experts; got max_k=40"),
        (["diagnose", "--steps", "0"], "expected a positive integer; got '0'"),
        (["diagnose", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err
    assert "Traceback" not in err


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "diagnose" in capsys.readouterr().out


@pytest.mark.vscode_smoke
def test_module_entry_point_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "moe_devkit", "--version"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("moe-devkit ")


def test_import_is_lazy() -> None:
    code = (
        "import sys, moe_devkit, moe_devkit.cli;"
        "heavy = [m for m in ('torch', 'jax', 'matplotlib') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


TINY_RUN = ["--steps", "1", "--batch", "1", "--seq", "8"]


@pytest.mark.parametrize(
    ("argv", "kind"),
    [
        (["diagnose", *TINY_RUN], "dir"),
        (["profile", "--tokens", "16", "--iterations", "1", "--device", "cpu"], "dir"),
        (["gradients", *TINY_RUN], "file"),
        (["numerics", *TINY_RUN], "file"),
        (["memory", "--steps", "8", "--batch", "1", "--seq", "8"], "file"),
        (["report", "REPORT"], "dir"),
    ],
)
def test_unwritable_out_fails_before_any_work(
    argv: list[str], kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An --out that cannot be created is a usage error found up front: one line naming
    --out and the path, exit 2, nothing run (no tables printed) and nothing written."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "sub" / ("report.json" if kind == "file" else "reports")
    argv = [str(blocker) if a == "REPORT" else a for a in argv]
    assert main([*argv, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert f"--out {str(out)!r} cannot be created: {str(blocker)!r} is a file" in err
    assert "Traceback" not in err and captured.err.count("\n") == 1
    assert captured.out == ""  # the command stopped before its work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_check_output_names_what_is_in_the_way(tmp_path: Path) -> None:
    afile, adir = tmp_path / "f.json", tmp_path / "d"
    afile.write_text("{}")
    adir.mkdir()
    check_output(afile, directory=False)  # an existing file is replaced atomically
    check_output(adir / "new" / "deeper", directory=True, create=False)
    assert not (adir / "new").exists()
    check_output(adir / "new" / "deeper", directory=True)
    assert (adir / "new" / "deeper").is_dir()
    check_output(tmp_path / "sub" / "new.json", directory=False)
    assert (tmp_path / "sub").is_dir() and not (tmp_path / "sub" / "new.json").exists()
    with pytest.raises(UsageError, match=r"--out must be a directory; '.*f\.json' is a file"):
        check_output(afile, directory=True)
    with pytest.raises(UsageError, match=r"--out must be a file path; '.*d' is a directory"):
        check_output(adir, directory=False)
    with pytest.raises(UsageError, match=r"--trace '.*x\.json' cannot be created: '.*f\.json'"):
        check_output(afile / "x.json", directory=False, flag="--trace")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_check_output_refuses_a_read_only_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(UsageError, match=r"cannot be written: '.*locked' is read-only"):
            check_output(locked / "out", directory=True)
    finally:
        locked.chmod(0o700)


def test_a_write_that_fails_late_is_one_line_naming_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the early check cannot see (a full disk) still ends in one line, exit 2."""
    import moe_devkit.reporting

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / ".r.json.tmp"))

    monkeypatch.setattr(moe_devkit.reporting, "write_report_json", disk_full)
    out = tmp_path / "r.json"
    assert main(["gradients", *TINY_RUN, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {str(out)!r} cannot be written: {os.strerror(errno.ENOSPC)}" in err
    assert "Traceback" not in err and ".tmp" not in err


def test_check_output_probes_the_file_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that refuses writes even where permissions allow them (a read-only
    mount, which root cannot write either) is found by the probe file, before any work."""
    import tempfile

    def read_only(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    refused = os.strerror(errno.EROFS)
    with pytest.raises(UsageError, match=rf"--out '.*out' cannot be written: {refused}"):
        check_output(tmp_path / "out", directory=True)
    check_output(tmp_path / "other", directory=True, create=False)  # no probe, no error


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_an_unreadable_report_is_named_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "report.json"
    report.write_text("{}")
    report.chmod(0o200)
    try:
        assert main(["report", str(report)]) == 2
    finally:
        report.chmod(0o600)
    assert f"report file {str(report)!r} cannot be read" in capsys.readouterr().err


SMALL_MODEL = ["--hidden-size", "16", "--layers", "1", "--device", "cpu"]


def _diagnose_in_a_pipe(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "moe_devkit", "diagnose", *SMALL_MODEL, *argv]
    return subprocess.run(
        [*command, "--out", str(tmp_path)], capture_output=True, text=True, timeout=120
    )


def test_diagnose_in_a_pipe_prints_progress_lines_and_a_verdict(tmp_path: Path) -> None:
    """Stdout is not a terminal: progress is plain lines (no bar), and the run ends with
    what was run and the verdict."""
    proc = _diagnose_in_a_pipe(tmp_path, "--steps", "20", "--batch", "2", "--seq", "8")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    progress = [line for line in lines if line.startswith("routing: ")]
    assert progress[0] == "routing: 0/20 steps"
    assert [line.split(" (")[0] for line in progress[1:]] == [
        f"routing: {step}/20 steps" for step in range(2, 21, 2)
    ]
    assert progress[-1].startswith("routing: 20/20 steps (100%), ")
    assert lines.index(progress[-1]) < lines.index(next(x for x in lines if "Expert util" in x))
    ran = next(line for line in lines if line.startswith("ran: "))
    for part in ("torch reference model", "1 layer", "20 steps", "320 tokens", "cpu", "float32"):
        assert part in ran
    assert lines[-1] == "verdict: no alarms"
    assert "\x1b[" not in proc.stdout and "━" not in "".join(progress)


def test_diagnose_verdict_lists_the_findings_last(tmp_path: Path) -> None:
    """64 experts and 4 tokens: one expert holds a quarter of the load, 60 are dead."""
    argv = ["--steps", "1", "--batch", "1", "--seq", "4", "--num-experts", "64", "--max-k", "1"]
    proc = _diagnose_in_a_pipe(tmp_path, *argv)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    verdict = lines.index("verdict: 1 error, 1 warning")
    assert lines[verdict - 1].startswith("ran: torch reference model")
    assert lines[verdict + 1].startswith("  error: layers.0.moe.router: expert ")
    assert lines[verdict + 2].startswith("  warning: layers.0.moe.router: 60 of 64 experts")
    assert len(lines) == verdict + 3

"""What the commands share (``moe_devkit.commands.common``): the argparse types, and output
paths checked before any work and written with one clear line when a write fails late."""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path

import pytest

from moe_devkit.cli import main
from moe_devkit.commands.common import UsageError, check_output, positive_float

TINY_RUN = ["--steps", "1", "--batch", "1", "--seq", "8"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "expected a finite positive number; got '0'"),
        ("-1", "expected a finite positive number; got '-1'"),
        ("inf", "expected a finite positive number; got 'inf'"),
        ("nan", "expected a finite positive number; got 'nan'"),
        ("x", "expected a positive number; got 'x'"),
    ],
)
def test_positive_float_rejects(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{message}$"):
        positive_float(text)


def test_positive_float_accepts() -> None:
    assert positive_float("1e-3") == 1e-3


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

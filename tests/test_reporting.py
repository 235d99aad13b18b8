"""Atomic report writes: all or nothing, with the permissions a plain write would give."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from moe_devkit import reporting
from moe_devkit.reporting import write_atomic


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_file_gets_the_umask_mode_not_mkstemps_0600(tmp_path: Path, umask_022: None) -> None:
    path = write_atomic(tmp_path / "sub" / "report.json", "{}\n")
    assert path.read_text() == "{}\n"
    assert mode(path) == 0o644


def test_the_umask_is_read_where_proc_is_missing(
    tmp_path: Path, umask_022: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_read_text = Path.read_text

    def no_proc(self: Path, *args: object, **kwargs: object) -> str:
        if str(self) == "/proc/self/status":
            raise FileNotFoundError(str(self))
        return real_read_text(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", no_proc)
    assert mode(write_atomic(tmp_path / "r.json", "x")) == 0o644
    assert os.umask(0o022) == 0o022  # and it was left as it was


def test_rewriting_keeps_the_files_own_mode(tmp_path: Path, umask_022: None) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")
    target.chmod(0o640)
    write_atomic(target, "new")
    assert target.read_text() == "new"
    assert mode(target) == 0o640


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "report.json"
    target.write_text("good")

    def crash(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(reporting.os, "replace", crash)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, "half")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_set_of_files_is_replaced_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file of the set is written to its temporary before any is renamed into place."""
    first, second = tmp_path / "report.json", tmp_path / "report.html"
    assert reporting.write_atomic_set({first: "json 1", second: b"html 1"}) == [first, second]
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.fstat(fd).st_size == len("html 2"):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(reporting.os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left"):
        reporting.write_atomic_set({first: "json 22", second: "html 2"})
    assert (first.read_text(), second.read_text()) == ("json 1", "html 1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json"]

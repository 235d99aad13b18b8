"""``moe-devkit report``: a report file it cannot read is named as such."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moe_devkit.cli import main


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

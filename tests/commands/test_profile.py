"""``moe-devkit profile``: a bad option stops it before its output directory is made."""

from __future__ import annotations

from pathlib import Path

from cli_support import assert_one_line_usage_error, moe_devkit


def test_bad_profile_warmup_creates_nothing(tmp_path: Path) -> None:
    proc = moe_devkit(["profile", "--warmup", "-1", "--out", "new"], tmp_path)
    assert_one_line_usage_error(proc, "moe-devkit profile")
    assert list(tmp_path.iterdir()) == []

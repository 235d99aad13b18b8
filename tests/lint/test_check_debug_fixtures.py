"""A fixture file per rule, with its expected output beside it (rewrite: UPDATE_GOLDEN=1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moe_devkit.lint import RULES, Settings, check_file

FIXTURES = Path(__file__).parent / "fixtures"
CODES = sorted(p.stem for p in FIXTURES.glob("DBG*.py"))


def test_every_checkable_rule_has_a_fixture() -> None:
    assert set(CODES) == {rule.code for rule in RULES} - {"DBG902"}


@pytest.mark.parametrize("code", CODES)
def test_fixture(code: str) -> None:
    path = FIXTURES / f"{code}.py"
    settings = Settings(select=(code,), root=str(FIXTURES))
    result = check_file(str(path), settings)
    output = "".join(f"{f}\n".replace(str(FIXTURES) + os.sep, "") for f in result.findings)
    golden = FIXTURES / f"{code}.expected"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(output)
    assert output == golden.read_text()
    assert all(f.code == code for f in result.findings)

"""Every rule code has its documentation page, with the sections ruff's rule pages have."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_devkit.lint import RULES

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.code)
def test_rule_has_a_page(rule: object) -> None:
    from moe_devkit.lint import Rule

    assert isinstance(rule, Rule)
    page = (DOCS / "rules" / f"{rule.code}.md").read_text()
    assert page.startswith(f"# {rule.code} {rule.name}\n")
    for section in ("## What it does", "## Why is this bad?", "## Example", "## Fix"):
        assert section in page


def test_no_page_without_a_rule() -> None:
    pages = {p.stem for p in (DOCS / "rules").glob("*.md")}
    assert pages == {rule.code for rule in RULES}


def test_design_page_lists_every_code() -> None:
    text = (DOCS / "check-debug.md").read_text()
    for rule in RULES:
        assert f"rules/{rule.code}.md" in text

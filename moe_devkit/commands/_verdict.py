"""The closing lines every command prints: the verdict and one line per finding."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from moe_devkit.diagnostics.findings import Finding


def print_verdict(console: Console, findings: Sequence[Finding]) -> None:
    """``verdict: no alarms``, or the count of alarms by severity and one line for each."""
    from rich.text import Text

    if not findings:
        console.print("verdict: no alarms", highlight=False)
        return
    counts: Counter[str] = Counter(f.severity for f in findings)
    plural = {"error": "errors", "warning": "warnings", "info": "info"}
    parts = [f"{counts[s]} {s if counts[s] == 1 else plural[s]}" for s in plural if counts[s]]
    console.print(f"verdict: {', '.join(parts)}", highlight=False)
    for finding in findings:
        style = {"error": "bold red", "warning": "yellow"}.get(finding.severity, "")
        line = Text.assemble("  ", (finding.severity, style), f": {finding.message}")
        console.print(line, soft_wrap=True)

"""check-debug: find and remove leftover debug statements (debuggers, prints, ML debug switches).

Imports no torch: the hook installs and runs without the `[torch]` extra.
"""

from __future__ import annotations

from moe_devkit.lint.checker import FileResult, Finding, check_file, check_source
from moe_devkit.lint.command import main
from moe_devkit.lint.config import Settings, load_settings
from moe_devkit.lint.rules import RULES, Rule

__all__ = [
    "RULES",
    "FileResult",
    "Finding",
    "Rule",
    "Settings",
    "check_file",
    "check_source",
    "load_settings",
    "main",
]

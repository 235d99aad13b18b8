"""The last `[tool.check-debug]` table read, kept with the pyproject.toml text it came from.

Importing tomllib (and typing, datetime and its regular expressions with it) takes a hook run
longer than checking a typical commit. A run whose pyproject.toml is the one read last takes the
table from `$XDG_CACHE_HOME/moe-devkit/check-debug-settings` (default `~/.cache`) instead: the
entry holds the whole text, so any change to the file is a miss, and the table is validated as
if just parsed. The entry is a Python literal read with `ast.literal_eval` (never executed); an
unreadable, corrupt or foreign entry is a miss, and a directory that cannot be written is not
written.
"""

from __future__ import annotations

import ast
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FORMAT = "check-debug-settings 1"


def cache_file() -> str | None:
    """Return the entry's path, or None without a cache directory (no home directory)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):  # `~` unexpanded, or a relative XDG_CACHE_HOME: not a place
        return None
    return os.path.join(base, "moe-devkit", "check-debug-settings")


def _key(text: str) -> tuple[str, tuple[int, int], str]:
    return FORMAT, (sys.version_info[0], sys.version_info[1]), text


def read(text: str) -> dict[str, Any] | None:
    """Return the table stored for this exact pyproject.toml text, or None."""
    path = cache_file()
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            entry = ast.literal_eval(handle.read())
    except (OSError, UnicodeDecodeError, ValueError, TypeError, SyntaxError, RecursionError):
        return None
    if not (isinstance(entry, tuple) and len(entry) == 2 and entry[0] == _key(text)):
        return None
    return entry[1] if isinstance(entry[1], dict) else None


def write(text: str, table: dict[str, Any]) -> None:
    """Store the table read from `text`, replacing the entry; skip it when it cannot be."""
    path = cache_file()
    entry = (_key(text), table)
    literal = repr(entry)
    try:
        if path is None or ast.literal_eval(literal) != entry:  # e.g. a date: no literal
            return
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return
    temporary = f"{path}.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(literal)
        os.replace(temporary, path)  # a reader sees the old entry or the new one, whole
    except OSError:
        import contextlib

        with contextlib.suppress(OSError):
            os.unlink(temporary)

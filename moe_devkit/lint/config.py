"""`[tool.check-debug]` settings from pyproject.toml: which codes run, and where prints belong."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase

from moe_devkit.lint.rules import ERROR_CODES, RULES

TYPE_CHECKING = False  # typing is not imported at run time: the hook starts faster without it
if TYPE_CHECKING:
    from typing import Any

DEFAULT_PRINT_PATHS: tuple[str, ...] = (
    "test_*.py",
    "*_test.py",
    "conftest.py",
    "__main__.py",
    "tests/**",
    "*/tests/**",
    "scripts/**",
    "*/scripts/**",
)
KEYS = frozenset(
    {
        "select",
        "ignore",
        "per-file-ignores",
        "print-allowed-paths",
        "extend-print-allowed-paths",
        "allow-print-to-file",
        "allow-main-block",
        "exclude",
        "all-syntax",
        "max-file-size",
    }
)
# Larger files are skipped, not read: Python's `ast` takes about 140 bytes of memory per byte
# of source, and files this big are generated rather than written (and debugged) by hand.
DEFAULT_MAX_FILE_SIZE = 1_000_000


class ConfigError(ValueError):
    """Settings that cannot be used; the CLI reports it and exits 2."""


@dataclass(frozen=True)
class Settings:
    """What to check and where; paths are matched relative to `root`."""

    select: tuple[str, ...] = ("DBG",)
    ignore: tuple[str, ...] = ()
    per_file_ignores: tuple[tuple[str, tuple[str, ...]], ...] = ()
    print_allowed_paths: tuple[str, ...] = DEFAULT_PRINT_PATHS
    allow_print_to_file: bool = True
    allow_main_block: bool = True
    exclude: tuple[str, ...] = ()
    all_syntax: bool = False
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    root: str = field(default=".", compare=False)

    def relative(self, path: str) -> str:
        """Return `path` relative to the settings' root, with forward slashes."""
        try:
            rel = os.path.relpath(os.path.abspath(path), self.root)
        except ValueError:  # another drive on Windows
            rel = path
        return rel.replace(os.sep, "/")

    def enabled_codes(self, relpath: str) -> frozenset[str]:
        """Return the codes that apply to a file."""
        ignored = list(self.ignore)
        for pattern, codes in self.per_file_ignores:
            if path_matches(relpath, pattern):
                ignored.extend(codes)
        return frozenset(
            rule.code
            for rule in RULES
            if (rule.code in ERROR_CODES or rule.code.startswith(self.select))
            and not rule.code.startswith(tuple(ignored))
        )

    def print_allowed(self, relpath: str) -> bool:
        """Return whether prints are allowed in a file (tests, scripts, `__main__.py`...)."""
        return any(path_matches(relpath, pattern) for pattern in self.print_allowed_paths)

    def excluded(self, relpath: str) -> bool:
        """Return whether a file is excluded from checking."""
        return any(path_matches(relpath, pattern) for pattern in self.exclude)


def path_matches(relpath: str, pattern: str) -> bool:
    """Match a glob against a relative path; a pattern without `/` matches the file name too."""
    if fnmatchcase(relpath, pattern):
        return True
    if pattern.endswith("/**") and relpath.startswith(pattern[:-2]):
        return True
    return "/" not in pattern and fnmatchcase(relpath.rsplit("/", 1)[-1], pattern)


def _codes(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f'{key} must be a list of codes such as ["DBG101"]; got {value!r}')
    for code in value:
        if not any(rule.code.startswith(code) for rule in RULES) or not code:
            raise ConfigError(f"unknown code {code!r} in {key}; codes are DBG001..DBG902")
    return tuple(value)


def _globs(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{key} must be a list of glob patterns; got {value!r}")
    return tuple(value)


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false; got {value!r}")
    return value


def file_size(value: Any, key: str) -> int:
    """Return a size limit in bytes (0: no limit).

    Raises:
        ConfigError: when the value is not a whole number >= 0.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(
            f"{key} must be a whole number of bytes >= 0 (0: no limit); got {value!r}"
        )
    return value


def settings_from_table(table: dict[str, Any], root: str = ".") -> Settings:
    """Build settings from a `[tool.check-debug]` table.

    Raises:
        ConfigError: for an unknown key, an unknown code or a value of the wrong type.
    """
    unknown = sorted(set(table) - KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) in [tool.check-debug]: {', '.join(unknown)}")
    settings = Settings(root=root)
    if "select" in table:
        settings = replace(settings, select=_codes(table["select"], "select"))
    if "ignore" in table:
        settings = replace(settings, ignore=_codes(table["ignore"], "ignore"))
    per_file = table.get("per-file-ignores", {})
    if not isinstance(per_file, dict):
        raise ConfigError(f"per-file-ignores must be a table of glob = [codes]; got {per_file!r}")
    pairs = tuple(
        (glob, _codes(codes, f"per-file-ignores.{glob}")) for glob, codes in per_file.items()
    )
    paths = _globs(
        table.get("print-allowed-paths", list(DEFAULT_PRINT_PATHS)), "print-allowed-paths"
    )
    paths += _globs(table.get("extend-print-allowed-paths", []), "extend-print-allowed-paths")
    return replace(
        settings,
        per_file_ignores=pairs,
        print_allowed_paths=paths,
        allow_print_to_file=_flag(table.get("allow-print-to-file", True), "allow-print-to-file"),
        allow_main_block=_flag(table.get("allow-main-block", True), "allow-main-block"),
        exclude=_globs(table.get("exclude", []), "exclude"),
        all_syntax=_flag(table.get("all-syntax", False), "all-syntax"),
        max_file_size=file_size(table.get("max-file-size", DEFAULT_MAX_FILE_SIZE), "max-file-size"),
    )


def find_pyproject(start: str) -> str | None:
    """Return the path of the nearest pyproject.toml at or above `start`."""
    directory = os.path.realpath(start)
    while True:
        path = os.path.join(directory, "pyproject.toml")
        if os.path.isfile(path):
            return path
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def load_settings(config: str | None = None, start: str = ".") -> Settings:
    """Load settings from `config`, or from the nearest pyproject.toml; defaults if none.

    Raises:
        ConfigError: when the file cannot be read or parsed, or holds bad settings.
    """
    path = config or find_pyproject(start)
    if path is None:
        return Settings(root=os.path.abspath(start))
    try:
        with open(path, "rb") as handle:
            data = handle.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    root = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    if not config and not _may_hold_table(data):
        return Settings(root=root)
    return settings_from_table(_check_debug_table(data, path), root)


def _may_hold_table(data: str) -> bool:
    """Return whether a TOML document can hold `[tool.check-debug]`, without parsing it.

    A key spells `check-debug` literally, or with escapes inside a basic string (`\\u002d`).
    A pyproject.toml found by search that holds neither is not parsed (nor tomllib imported);
    one named by `--config` always is.
    """
    return "check-debug" in data or "\\u" in data or "\\U" in data


def _check_debug_table(data: str, path: str) -> dict[str, Any]:
    from moe_devkit.lint import settings_cache

    cached = settings_cache.read(data)
    if cached is not None:
        return cached
    table = _parse_table(data, path)
    if table is None:
        return {}
    settings_cache.write(data, table)
    return table


def _parse_table(data: str, path: str) -> dict[str, Any] | None:
    """Return the table parsed from the document (None: Python 3.10 without tomli, and no
    `[tool.check-debug]` header to miss)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            if "[tool.check-debug]" in data:
                raise ConfigError("reading [tool.check-debug] on Python 3.10 needs tomli") from None
            return None
    try:
        document = tomllib.loads(data)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"cannot parse {path}: {err}") from None
    table = document.get("tool", {}).get("check-debug", {})
    if not isinstance(table, dict):
        raise ConfigError(f"[tool.check-debug] in {path} must be a table")
    return table

"""The [tool.check-debug] table kept from the last run: used only for the very same text."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest

from moe_devkit.lint import load_settings, settings_cache

TABLE = '[tool.check-debug]\nignore = ["DBG101"]\nexclude = ["gen/*"]\n'


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "moe-devkit" / "check-debug-settings"


def project(tmp_path: Path, text: str) -> str:
    path = tmp_path / "project" / "pyproject.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return str(path.parent)


def test_a_read_table_is_kept_and_read_back(tmp_path: Path, cache: Path) -> None:
    start = project(tmp_path, TABLE)
    first = load_settings(start=start)
    assert (first.ignore, first.exclude) == (("DBG101",), ("gen/*",))
    assert cache.is_file()
    assert settings_cache.read(TABLE) == {"ignore": ["DBG101"], "exclude": ["gen/*"]}
    assert load_settings(start=start) == first


def test_a_changed_file_is_read_again(tmp_path: Path, cache: Path) -> None:
    start = project(tmp_path, TABLE)
    load_settings(start=start)
    project(tmp_path, TABLE.replace("DBG101", "DBG102"))
    assert load_settings(start=start).ignore == ("DBG102",)
    assert settings_cache.read(TABLE) is None  # one entry: the last file read


def test_a_kept_table_is_still_validated(tmp_path: Path, cache: Path) -> None:
    bad = '[tool.check-debug]\nselect = ["XYZ1"]\n'
    settings_cache.write(bad, {"select": ["XYZ1"]})
    from moe_devkit.lint.config import ConfigError

    with pytest.raises(ConfigError, match="unknown code 'XYZ1' in select"):
        load_settings(start=project(tmp_path, bad))


@pytest.mark.parametrize(
    "entry", ["", "not python (", "__import__('os').system('false')", "(1, 2)", "{'a': 1}"]
)
def test_a_corrupt_or_foreign_entry_is_a_miss(tmp_path: Path, cache: Path, entry: str) -> None:
    cache.parent.mkdir(parents=True)
    cache.write_text(entry)
    assert settings_cache.read(TABLE) is None
    assert load_settings(start=project(tmp_path, TABLE)).ignore == ("DBG101",)


def test_an_entry_for_another_text_is_a_miss(tmp_path: Path, cache: Path) -> None:
    settings_cache.write(TABLE, {"ignore": ["DBG003"]})
    assert settings_cache.read(TABLE + "\n") is None
    assert load_settings(start=project(tmp_path, TABLE + "\n")).ignore == ("DBG101",)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_an_unwritable_cache_is_not_written(tmp_path: Path, cache: Path) -> None:
    cache.parent.parent.mkdir(parents=True)
    cache.parent.parent.chmod(0o500)
    try:
        assert load_settings(start=project(tmp_path, TABLE)).ignore == ("DBG101",)
        assert not cache.exists()
    finally:
        cache.parent.parent.chmod(0o700)


def test_a_cache_that_is_a_file_is_not_written(tmp_path: Path, cache: Path) -> None:
    cache.parent.parent.mkdir(parents=True)
    cache.parent.write_text("a file where the directory would be")
    assert load_settings(start=project(tmp_path, TABLE)).ignore == ("DBG101",)
    assert settings_cache.read(TABLE) is None


def test_no_cache_without_a_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "relative/home")
    assert settings_cache.cache_file() is None
    assert load_settings(start=project(tmp_path, TABLE)).ignore == ("DBG101",)


def test_a_table_without_a_literal_is_not_kept(cache: Path) -> None:
    settings_cache.write(TABLE, {"when": datetime.date(1979, 5, 27)})  # a TOML date
    assert not cache.exists()

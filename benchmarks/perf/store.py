"""Stored performance baselines: JSON keyed by device and software versions.

Stored timings are kept for trends and reports only; regressions are decided by the
interleaved A/B run (``moe_devkit.diagnostics.regression.compare_interleaved``), because a
stored absolute time does not transfer between machines, not even two GPU machines of the
same kind. The deterministic gates (``perf.gates``) are compared with the stored values of
the same key.

A baseline file is checked whole when it is opened (``BaselineStore(path)``): its schema and
version, and every entry's environment, key, date and cases down to each number, so a bad
file is one ``ValueError`` naming the file, the field, what was expected and what it holds,
before a run that would use it starts.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moe_devkit.reporting import write_atomic
from perf.describe import describe_value

SCHEMA = "moe-devkit-perf-baseline"
SCHEMA_VERSION = 1
FILE_FIELDS = ("schema", "version", "entries")
ENTRY_FIELDS = ("environment", "updated", "cases")
ENVIRONMENT_FIELDS = ("device", "torch", "cuda", "python", "numpy", "moe_devkit", "torch_threads")
CASE_FIELDS = ("wall", "cpu", "gates")


def environment(device: str) -> dict[str, str]:
    """Device name and software versions: what a stored baseline is valid for."""
    import numpy
    import torch

    from moe_devkit import __version__

    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
        cuda = str(torch.version.cuda)
    else:
        name, cuda = f"{platform.machine()} {os.cpu_count()} cpus", "none"
    return {
        "device": name,
        "torch": torch.__version__,
        "cuda": cuda,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "moe_devkit": __version__,
        "torch_threads": str(torch.get_num_threads()),
    }


def environment_key(env: Mapping[str, str]) -> str:
    """A stable one-line key such as ``'x86_64 2 cpus|torch 2.13.0|cuda none|...'``."""
    return "|".join(f"{k} {env[k]}" for k in sorted(env) if k != "device") + f"|{env['device']}"


class BaselineStore:
    """A baseline file: ``{"schema", "version", "entries": {key: entry}}``.

    Each entry is ``{"environment": {...}, "updated": ISO-8601, "cases": {case: {...}}}``;
    its key is ``environment_key(environment)``. A case is ``{"wall": s, "cpu": s, "gates":
    Gates.to_dict()}`` (finite positive seconds per call; ``gates`` may be ``{}``: none kept).

    Args:
        path: the file (need not exist yet).
        device: "cpu" or "cuda": every entry must then be of that kind of device (a CPU
            entry's environment has ``"cuda": "none"``).

    Raises:
        ValueError: the file exists but is not a valid baseline file (one line: the file,
            the field, what was expected, what it holds).
        OSError: the file exists but cannot be read.
    """

    def __init__(self, path: str | os.PathLike[str], *, device: str | None = None) -> None:
        self.path = Path(path)
        self.device = device
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self.entries = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            return _check_file(_parse(self.path.read_bytes()), self.device)
        except ValueError as exc:
            raise ValueError(f"{self.path}: {exc}") from None

    def lookup(self, env: Mapping[str, str]) -> dict[str, Any] | None:
        """The cases stored for this environment, or None."""
        entry = self.entries.get(environment_key(env))
        return dict(entry["cases"]) if entry else None

    def update(self, env: Mapping[str, str], cases: Mapping[str, Mapping[str, Any]]) -> Path:
        """Replaces this environment's entry and writes the file atomically.

        Raises:
            ValueError: ``env`` or a case is not what a baseline file may hold (a NaN time,
                say); nothing is written then.
        """
        key = environment_key(env)
        entry = {
            "environment": dict(env),
            "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "cases": {name: dict(body) for name, body in cases.items()},
        }
        _check_entry(key, entry, self.device)
        self.entries[key] = entry
        body = {"schema": SCHEMA, "version": SCHEMA_VERSION, "entries": self.entries}
        text = json.dumps(body, indent=2, sort_keys=True, allow_nan=False)
        return write_atomic(self.path, text + "\n")


# ----------------------------------------------------------------------------- the file's checks


def _parse(data: bytes) -> object:
    """The JSON value of a baseline file's bytes."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"not a JSON text: expected UTF-8; got byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError("not valid JSON (nested too deeply)") from None


def _check_file(data: object, device: str | None) -> dict[str, dict[str, Any]]:
    """The entries of a parsed baseline file, every field checked."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object at the top level; got {describe_value(data)}")
    if data.get("schema") != SCHEMA:
        raise ValueError(
            f'not a perf baseline file: expected "schema": {SCHEMA!r}; '
            f"got {describe_value(data.get('schema'))}"
        )
    if data.get("version") != SCHEMA_VERSION or isinstance(data.get("version"), bool):
        raise ValueError(
            f"baseline version must be {SCHEMA_VERSION}; got {describe_value(data.get('version'))} "
            "(rewrite it with --update-baseline)"
        )
    _check_fields("the top level", data, FILE_FIELDS)
    entries = data["entries"]
    if not isinstance(entries, dict):
        raise ValueError(
            "entries: expected an object of environment key -> entry; "
            f"got {describe_value(entries)}"
        )
    for key, entry in entries.items():
        _check_entry(key, entry, device)
    return entries


def _check_entry(key: str, entry: object, device: str | None) -> None:
    where = f"entries[{key!r}]"
    if not isinstance(entry, dict):
        raise ValueError(
            f"{where}: expected an object of {list(ENTRY_FIELDS)}; got {describe_value(entry)}"
        )
    _check_fields(where, entry, ENTRY_FIELDS)
    _check_environment(where, key, entry["environment"], device)
    _check_date(f"{where}.updated", entry["updated"])
    cases = entry["cases"]
    if not isinstance(cases, dict):
        raise ValueError(
            f"{where}.cases: expected an object of case -> timings; got {describe_value(cases)}"
        )
    for name, case in cases.items():
        _check_case(f"{where}.cases[{name!r}]", case)


def _check_environment(where: str, key: str, env: object, device: str | None) -> None:
    where = f"{where}.environment"
    if not isinstance(env, dict):
        raise ValueError(
            f"{where}: expected an object of {list(ENVIRONMENT_FIELDS)}; got {describe_value(env)}"
        )
    _check_fields(where, env, ENVIRONMENT_FIELDS)
    for name, value in env.items():
        if not isinstance(value, str):
            raise ValueError(f"{where}.{name}: expected a string; got {describe_value(value)}")
    if environment_key(env) != key:
        raise ValueError(
            f"{where}: expected the entry's key {environment_key(env)!r}; got the key {key!r}"
        )
    if device is not None and (env["cuda"] == "none") != (device == "cpu"):
        raise ValueError(
            f"{where}: expected a {device} entry; "
            f"got device {env['device']!r}, cuda {env['cuda']!r}"
        )


def _check_case(where: str, case: object) -> None:
    if not isinstance(case, dict):
        raise ValueError(
            f"{where}: expected an object of {list(CASE_FIELDS)}; got {describe_value(case)}"
        )
    _check_fields(where, case, CASE_FIELDS)
    for clock in ("wall", "cpu"):
        value = case[clock]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and value > 0):
            raise ValueError(
                f"{where}.{clock}: expected seconds per call, a finite number > 0; "
                f"got {describe_value(value)}"
            )
    if case["gates"] != {}:
        from perf.gates import Gates  # torch, only for stored gates

        try:
            Gates.from_dict(case["gates"])
        except ValueError as exc:
            raise ValueError(f"{where}.gates: {exc}") from None


def _check_fields(where: str, data: dict[str, Any], fields: tuple[str, ...]) -> None:
    missing = [name for name in fields if name not in data]
    unknown = sorted(set(data) - set(fields))
    if missing or unknown:
        what = f"missing {missing}" if missing else f"unknown {unknown}"
        raise ValueError(f"{where}: expected the fields {list(fields)}; {what}")


def _check_date(where: str, value: object) -> None:
    try:
        _dt.datetime.fromisoformat(str(value))
        ok = isinstance(value, str)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{where}: expected an ISO-8601 date and time; got {describe_value(value)}"
        )

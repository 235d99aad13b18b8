"""The JSON report envelope shared by every diagnostic, and atomic file writes.

A report is ``{"schema": "moe-devkit-report", "version": N, "created": ISO-8601,
"sections": {name: section}, "findings": [Finding.to_dict(), ...]}``. Each diagnostic owns
one section (``routing``, ``numerics``, ``gradients``, ``memory``, ``latency``, ...); the
schema is documented in docs/report-schema.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from moe_devkit.diagnostics.findings import Finding

SCHEMA = "moe-devkit-report"
SCHEMA_VERSION = 1


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Writes ``data`` to a temporary file beside ``path`` and renames it into place.

    A crash never leaves a half-written file where a good one stood.
    """
    return write_atomic_set({Path(path): data})[0]


def write_atomic_set(files: Mapping[Path, str | bytes]) -> list[Path]:
    """Writes several files so that a failure leaves the previous set whole.

    Every file is written (and synced) to a temporary beside it first; only then are they
    renamed into place, one after the other. A failure before the renames (a full disk, an
    unwritable directory) removes the temporaries and leaves every old file as it was.

    Returns:
        The paths written, in the order given.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for target, data in files.items():
            staged.append((_write_temporary(target, data), target))
        for tmp, target in staged:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    return [target for _, target in staged]


def _write_temporary(target: Path, data: str | bytes) -> Path:
    """Writes ``data`` to a new temporary file beside ``target`` (removed if that fails)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    mode = _file_mode(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fchmod(handle.fileno(), mode)  # mkstemp's 0600 would hide reports from others
            os.fsync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _file_mode(target: Path) -> int:
    """The permissions a plain ``open(target, "w")`` would leave: the existing file's, else
    0666 less the process umask."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        pass
    try:  # Linux names the umask without changing it (os.umask would, for every thread)
        lines = Path("/proc/self/status").read_text(encoding="ascii").splitlines()
        umask = next(int(line.split()[1], 8) for line in lines if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _json_safe(value: Any) -> Any:
    """Replaces NaN/Inf floats by strings ("nan", "inf", "-inf"): strict JSON has none."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def make_report(
    sections: Mapping[str, Mapping[str, Any]], findings: Iterable[Finding] = ()
) -> dict[str, Any]:
    """Wraps sections and findings in the versioned report envelope."""
    return {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "sections": {name: dict(body) for name, body in sections.items()},
        "findings": [f.to_dict() for f in findings],
    }


def report_json_text(report: Mapping[str, Any]) -> str:
    """A report envelope as the strict JSON text ``write_report_json`` writes."""
    return json.dumps(_json_safe(report), indent=2, allow_nan=False, sort_keys=False) + "\n"


def write_report_json(path: str | os.PathLike[str], report: Mapping[str, Any]) -> Path:
    """Writes a report envelope as strict JSON, atomically."""
    return write_atomic(path, report_json_text(report))


def load_report_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Loads and checks a report written by ``write_report_json``.

    Raises:
        ValueError: the file is not a moe-devkit report, or of a newer schema version.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a moe-devkit report (expected schema={SCHEMA!r})")
    version = data.get("version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ValueError(
            f"{path}: report schema version must be <= {SCHEMA_VERSION}; got version={version!r}"
        )
    return data

"""Stored performance baselines: JSON keyed by device and software versions.

Stored timings are kept for trends and reports only; regressions are decided by the
interleaved A/B run (``regression.compare_interleaved``), because a stored absolute time
does not transfer between machines, not even two GPU machines of the same kind. The
deterministic gates (``perf_gates``) are compared with the stored values of the same key.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moe_devkit.reporting import write_atomic

SCHEMA = "moe-devkit-perf-baseline"
SCHEMA_VERSION = 1


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

    Each entry is ``{"environment": {...}, "updated": ISO-8601, "cases": {case: {...}}}``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self.entries = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ValueError(f"{self.path}: not a perf baseline file (schema={SCHEMA!r})")
        if data.get("version") != SCHEMA_VERSION:
            raise ValueError(
                f"{self.path}: baseline version must be {SCHEMA_VERSION}; "
                f"got {data.get('version')!r} (rewrite it with --update-baseline)"
            )
        return dict(data.get("entries", {}))

    def lookup(self, env: Mapping[str, str]) -> dict[str, Any] | None:
        """The cases stored for this environment, or None."""
        entry = self.entries.get(environment_key(env))
        return dict(entry["cases"]) if entry else None

    def update(self, env: Mapping[str, str], cases: Mapping[str, Mapping[str, Any]]) -> Path:
        """Replaces this environment's entry and writes the file atomically."""
        self.entries[environment_key(env)] = {
            "environment": dict(env),
            "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "cases": {name: dict(body) for name, body in cases.items()},
        }
        body = {"schema": SCHEMA, "version": SCHEMA_VERSION, "entries": self.entries}
        return write_atomic(self.path, json.dumps(body, indent=2, sort_keys=True) + "\n")

"""Stored baselines (benchmarks/baselines/<device>.json): written and read back, and a corrupt
file stops ``perf_suite.py`` at once: one line on stderr naming the file and what is wrong,
exit 2, before any timing."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from perf.store import BaselineStore, environment, environment_key

ROOT = Path(__file__).resolve().parents[3]
SUITE = ROOT / "benchmarks" / "perf_suite.py"

ENV = {
    "device": "x86_64 2 cpus", "torch": "2.13.0+cpu", "cuda": "none", "python": "3.11.7",
    "numpy": "2.1.0", "moe_devkit": "0.1.0", "torch_threads": "1",
}  # fmt: skip
KEY = environment_key(ENV)
GATES = {"ops": 120, "flops": 4096, "host_syncs": None, "memory_growth": 0.0,
         "top_ops": {"mm": 4}}  # fmt: skip
GOOD: dict[str, Any] = {
    "schema": "moe-devkit-perf-baseline",
    "version": 1,
    "entries": {
        KEY: {
            "environment": ENV,
            "updated": "2026-11-26T10:00:00+00:00",
            "cases": {"model": {"wall": 0.012, "cpu": 0.011, "gates": GATES}},
        }
    },
}


def _edit(change: Callable[[dict[str, Any]], object]) -> str:
    data = copy.deepcopy(GOOD)
    change(data)
    return json.dumps(data)


def _entry(data: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = data["entries"][KEY]
    return entry


def _case(data: dict[str, Any]) -> dict[str, Any]:
    case: dict[str, Any] = _entry(data)["cases"]["model"]
    return case


CASE = f"entries[{KEY!r}].cases['model']"
CORRUPT: list[tuple[str, str | bytes, str]] = [
    ("wrong JSON", "{not json", "not valid JSON (Expecting property name"),
    ("empty file", "", "not valid JSON (Expecting value"),
    ("random bytes", b"\x8f\xff\x00\x13garbage\xc3", "expected UTF-8; got byte 0x8f at offset 0"),
    ("nested too deeply", "[" * 200_000, "not valid JSON (nested too deeply)"),
    ("not an object", "[1, 2]", "expected a JSON object at the top level; got [1, 2] (an array)"),
    ("other schema", _edit(lambda d: d.update(schema="x")),
     "not a perf baseline file: expected \"schema\": 'moe-devkit-perf-baseline'; got 'x'"),
    ("version as a string", _edit(lambda d: d.update(version="1")),
     "baseline version must be 1; got '1' (a string)"),
    ("entries missing", _edit(lambda d: d.pop("entries")),
     "the top level: expected the fields ['schema', 'version', 'entries']; missing ['entries']"),
    ("entries as a list", _edit(lambda d: d.update(entries=[1, 2])),
     "entries: expected an object of environment key -> entry; got [1, 2] (an array)"),
    ("entry as a string", _edit(lambda d: d["entries"].update({KEY: "garbage"})),
     f"entries[{KEY!r}]: expected an object of ['environment', 'updated', 'cases']; "
     "got 'garbage' (a string)"),
    ("entry without cases", _edit(lambda d: _entry(d).pop("cases")),
     f"entries[{KEY!r}]: expected the fields ['environment', 'updated', 'cases']; "
     "missing ['cases']"),
    ("cases as a list", _edit(lambda d: _entry(d).update(cases=["model"])),
     "cases: expected an object of case -> timings; got ['model'] (an array)"),
    ("case as a number", _edit(lambda d: _entry(d)["cases"].update(model=3)),
     f"{CASE}: expected an object of ['wall', 'cpu', 'gates']; got 3 (an integer)"),
    ("case without cpu", _edit(lambda d: _case(d).pop("cpu")),
     f"{CASE}: expected the fields ['wall', 'cpu', 'gates']; missing ['cpu']"),
    ("wall as a string", _edit(lambda d: _case(d).update(wall="fast")),
     f"{CASE}.wall: expected seconds per call, a finite number > 0; got 'fast' (a string)"),
    ("wall NaN", _edit(lambda d: _case(d).update(wall=math.nan)),
     f"{CASE}.wall: expected seconds per call, a finite number > 0; got nan (a number)"),
    ("cpu infinite", _edit(lambda d: _case(d).update(cpu=math.inf)), f"{CASE}.cpu: "),
    ("cpu negative", _edit(lambda d: _case(d).update(cpu=-0.5)),
     f"{CASE}.cpu: expected seconds per call, a finite number > 0; got -0.5 (a number)"),
    ("gates as a string", _edit(lambda d: _case(d).update(gates="ok")),
     f"{CASE}.gates: expected an object of gates; got 'ok' (a string)"),
    ("gates without flops", _edit(lambda d: _case(d)["gates"].pop("flops")),
     f"{CASE}.gates: expected the fields ['flops', 'host_syncs', 'memory_growth', 'ops', "
     "'top_ops']; missing ['flops']"),
    ("gate ops negative", _edit(lambda d: _case(d)["gates"].update(ops=-1)),
     f"{CASE}.gates: ops: expected a non-negative integer; got -1 (an integer)"),
    ("gate memory NaN", _edit(lambda d: _case(d)["gates"].update(memory_growth=math.nan)),
     f"{CASE}.gates: memory_growth: expected a finite number; got nan (a number)"),
    ("environment value a number", _edit(lambda d: _entry(d)["environment"].update(numpy=2)),
     "environment.numpy: expected a string; got 2 (an integer)"),
    ("key unlike its environment", _edit(lambda d: d.update(entries={"k": _entry(d)})),
     f"entries['k'].environment: expected the entry's key {KEY!r}; got the key 'k'"),
    ("a CUDA entry in cpu.json", _edit(lambda d: d.update(entries={
        environment_key(ENV | {"cuda": "12.4"}): _entry(d) | {"environment": ENV | {"cuda": "12.4"}}
     })), "environment: expected a cpu entry; got device 'x86_64 2 cpus', cuda '12.4'"),
    ("updated not a date", _edit(lambda d: _entry(d).update(updated="yesterday")),
     "updated: expected an ISO-8601 date and time; got 'yesterday' (a string)"),
]  # fmt: skip
IDS = [name for name, _, _ in CORRUPT]
# Every kind of fault through the real command line (a few seconds each: torch is imported).
ON_THE_COMMAND_LINE = [
    "wrong JSON", "empty file", "random bytes", "nested too deeply", "not an object",
    "other schema", "version as a string", "entries as a list", "entry as a string",
    "entry without cases", "wall as a string", "wall NaN", "cpu negative",
    "gates without flops", "key unlike its environment", "a CUDA entry in cpu.json",
]  # fmt: skip


def _write(directory: Path, content: str | bytes) -> Path:
    directory.mkdir()
    path = directory / "cpu.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_the_command_line_set_names_known_variants() -> None:
    assert set(ON_THE_COMMAND_LINE) <= set(IDS)


def test_the_good_file_loads(tmp_path: Path) -> None:
    path = _write(tmp_path / "b", json.dumps(GOOD))
    store = BaselineStore(path, device="cpu")
    assert store.lookup(ENV) == GOOD["entries"][KEY]["cases"]


@pytest.mark.parametrize(("name", "content", "message"), CORRUPT, ids=IDS)
def test_store_names_the_file_and_the_fault(
    name: str, content: str | bytes, message: str, tmp_path: Path
) -> None:
    path = _write(tmp_path / "b", content)
    with pytest.raises(ValueError) as caught:
        BaselineStore(path, device="cpu")
    text = str(caught.value)
    assert text.startswith(f"{path}: "), text
    assert message in text, text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [pytest.param(*c, id=c[0]) for c in CORRUPT if c[0] in ON_THE_COMMAND_LINE],
)
def test_suite_stops_on_a_corrupt_baseline_before_any_timing(
    name: str, content: str | bytes, message: str, tmp_path: Path
) -> None:
    """Against HEAD with a budget of 10 minutes a case: a run that started timing would not
    end within the subprocess timeout."""
    path = _write(tmp_path / "baselines", content)
    report = tmp_path / "report.json"
    argv = ["--device", "cpu", "--budget", "600", "--json", str(report),
            "--baseline-dir", str(path.parent)]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(SUITE), *argv], capture_output=True, text=True, timeout=90,
        cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"perf_suite.py: error: --baseline-dir: {path}: "), lines[0]
    assert message in lines[0], lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout == "" and not report.exists()


def test_update_refuses_what_it_could_not_read_back(tmp_path: Path) -> None:
    store = BaselineStore(tmp_path / "cpu.json", device="cpu")
    with pytest.raises(ValueError, match=r"\.wall: expected seconds per call.*got nan"):
        store.update(ENV, {"model": {"wall": math.nan, "cpu": 0.01, "gates": {}}})
    assert not (tmp_path / "cpu.json").exists()
    store.update(ENV, {"model": {"wall": 0.01, "cpu": 0.01, "gates": GATES}})
    assert BaselineStore(tmp_path / "cpu.json", device="cpu").lookup(ENV) == {
        "model": {"wall": 0.01, "cpu": 0.01, "gates": GATES}
    }


def test_baseline_store_round_trip(tmp_path: Path) -> None:
    env = environment("cpu")
    store = BaselineStore(tmp_path / "cpu.json")
    assert store.lookup(env) is None
    store.update(env, {"router": {"wall": 1e-3, "cpu": 1e-3, "gates": {}}})
    again = BaselineStore(tmp_path / "cpu.json")
    assert again.lookup(env) == {"router": {"wall": 1e-3, "cpu": 1e-3, "gates": {}}}
    assert environment_key(env) in json.loads((tmp_path / "cpu.json").read_text())["entries"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_baseline_store_rejects_other_files(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"schema": "other"}')
    with pytest.raises(ValueError, match="not a perf baseline"):
        BaselineStore(tmp_path / "x.json")

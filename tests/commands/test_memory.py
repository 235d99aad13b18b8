"""``moe-devkit memory``: no leak on the reference model, and a planted leak found at its line."""

from __future__ import annotations

import json
from pathlib import Path

from cli_support import TINY

from moe_devkit.cli import main


def test_memory_clean_and_planted_leak(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    # tolerance well above the Python caches' warm-up growth, well below the 256 KiB leak
    run = ["memory", *TINY, "--steps", "7", "--warmup", "2", "--tolerance", "32768"]
    assert main([*run, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["sections"]["memory"]["leak"]["leaking"] is False
    code = main([*run, "--plant-leak", "--out", str(out)])
    assert code == 1
    (finding,) = json.loads(out.read_text())["findings"]
    assert finding["code"] == "memory-leak"
    assert "commands/memory.py" in finding["location"]

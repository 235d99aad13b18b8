"""Reports: JSON round trip, atomic writes, escaping, the page in a real headless browser."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from moe_devkit import MoEModel, RouterConfig
from moe_devkit.cli import main
from moe_devkit.inspect import InspectorConfig, RouterInspector
from moe_devkit.inspect.adapters import decision_from_tensors
from moe_devkit.inspect.report import render_report, write_report
from moe_devkit.inspect.summary import InspectorSummary
from moe_devkit.reporting import SCHEMA_VERSION, load_report_json, write_report_json


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    model = MoEModel(RouterConfig(hidden_size=16, num_experts=6, max_k=3, expert_hidden_size=16))
    with torch.no_grad(), RouterInspector(model, InspectorConfig(window=3)) as inspector:
        for _ in range(9):
            model(torch.randn(2, 16, 16))
        bad = '<script>alert("x")</script>&'
        inspector.record(
            decision_from_tensors(torch.rand(2), torch.ones(2), torch.tensor([[0], [1]])), layer=bad
        )
    paths = inspector.report(out)
    assert (paths.json, paths.png, paths.html) == (
        out / "report.json",
        out / "routing_analysis.png",
        out / "report.html",
    )
    return out


def test_report_json_round_trip(report_dir: Path) -> None:
    report = load_report_json(report_dir / "report.json")
    assert report["version"] == SCHEMA_VERSION
    section = report["sections"]["routing"]
    assert section["totals"]["layers"] == 3
    assert section["totals"]["decisions"] == 19
    layer = section["layers"]["layers.0.moe.router"]
    assert sum(layer["utilization"]["counts"]) == layer["selections"]
    assert len(layer["windows"]) == 3
    write_report_json(report_dir / "copy.json", report)
    assert load_report_json(report_dir / "copy.json") == report


def test_load_rejects_foreign_and_future_files(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a moe-devkit report"):
        load_report_json(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"schema": "moe-devkit-report", "version": 99}))
    with pytest.raises(ValueError, match="version must be <= 1; got version=99"):
        load_report_json(tmp_path / "b.json")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_report_json(tmp_path / "c.json")


def test_html_escapes_model_supplied_names(report_dir: Path) -> None:
    page = (report_dir / "report.html").read_text()
    assert '<script>alert("x")</script>' not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in page
    assert "http://" not in page and "https://" not in page


def test_rerender_from_stored_json(report_dir: Path, tmp_path: Path) -> None:
    paths = render_report(report_dir / "report.json", tmp_path)
    assert paths.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(report_dir / "report.json"), "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "report.html").exists()


def test_report_command_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    (tmp_path / "bad.json").write_text("[]")
    assert main(["report", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "not a moe-devkit report" in err
    assert "Traceback" not in err
    assert not (tmp_path / "report.html").exists()


def test_failed_write_leaves_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "report.json"
    write_report_json(target, {"schema": "moe-devkit-report", "version": 1, "ok": True})
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        write_report_json(target, {"ok": False})
    assert json.loads(target.read_text())["ok"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_diagnose_writes_three_files(tmp_path: Path) -> None:
    argv = ["diagnose", "--steps", "3", "--batch", "2", "--seq", "16", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "report.html",
        "report.json",
        "routing_analysis.png",
    ]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (.ci/run installs it)")
def test_html_in_headless_browser(report_dir: Path, tmp_path: Path) -> None:
    browser = _chromium()
    assert browser is not None
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
    ]
    url = (report_dir / "report.html").as_uri()
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120
    )
    assert 'data-ready="ok"' in dom.stdout, dom.stderr[-2000:]
    console_errors = [
        line
        for line in dom.stderr.splitlines()
        if "CONSOLE" in line and ("Error" in line or "Refused" in line or "Uncaught" in line)
    ]
    assert console_errors == []
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1400,1800", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    # The plots are in the screenshot: a large share of non-white pixels with many colours.
    rgb = pixels[..., :3].reshape(-1, 3)
    non_white = (rgb < 0.95).any(axis=1).mean()
    colourful = ((rgb.max(axis=1) - rgb.min(axis=1)) > 0.2).mean()
    assert non_white > 0.05 and colourful > 0.01


def _tiny_summary(steps: int, config: InspectorConfig | None = None) -> InspectorSummary:
    torch.manual_seed(0)
    model = MoEModel(RouterConfig(hidden_size=16, num_experts=6, max_k=3, expert_hidden_size=16))
    with torch.no_grad(), RouterInspector(model, config) as inspector:
        for _ in range(steps):
            model(torch.randn(2, 8, 16))
    summary: InspectorSummary = inspector.summary()
    return summary


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _boom(*args: object, **kwargs: object) -> None:
    raise RuntimeError("renderer crashed")


@pytest.mark.parametrize("renderer", ["moe_devkit.inspect.html.render_html", "plots"])
@pytest.mark.parametrize("writer", ["write_report", "render_report"])
def test_a_failed_render_leaves_the_previous_report_set_whole(
    renderer: str, writer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The three files are rendered before any is replaced: a renderer that raises leaves the
    old report.json, PNG and HTML byte-identical, and no temporary file behind."""
    old, new = tmp_path / "old", tmp_path / "new"
    write_report(_tiny_summary(3), old)
    write_report(summary := _tiny_summary(5), new)  # `moe-devkit report` renders a stored one
    before = _snapshot(old)
    assert sorted(before) == ["report.html", "report.json", "routing_analysis.png"]
    target = "moe_devkit.inspect.plots.routing_figure_png" if renderer == "plots" else renderer
    monkeypatch.setattr(target, _boom)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        if writer == "write_report":
            write_report(summary, old)
        else:
            render_report(new / "report.json", old)
    assert _snapshot(old) == before


def test_a_failed_file_write_leaves_the_previous_report_set_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fills while the third file is written: the first two are not renamed."""
    import os

    from moe_devkit import reporting

    write_report(_tiny_summary(3), tmp_path)
    before, summary = _snapshot(tmp_path), _tiny_summary(5)
    calls, real_fsync = [], os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(reporting.os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left"):
        write_report(summary, tmp_path)
    assert len(calls) == 3
    assert _snapshot(tmp_path) == before


def test_the_page_shows_the_model_signals_and_rerenders_them(tmp_path: Path) -> None:
    """The reference model returns an aux loss: the page has its table and figure, and
    `moe-devkit report` renders them again from report.json alone."""
    torch.manual_seed(0)
    model = MoEModel(RouterConfig(hidden_size=16, num_experts=4, max_k=2, expert_hidden_size=16))
    with torch.no_grad(), RouterInspector(model) as inspector:
        for _ in range(3):
            model(torch.randn(2, 8, 16))
    paths = inspector.report(tmp_path / "a")
    aux = load_report_json(paths.json)["sections"]["routing"]["aux_loss"]
    assert aux["status"]["value"] == 3 and aux["definition"] == "model"
    page = paths.html.read_text()
    assert "<h3>Aux loss</h3>" in page and 'alt="model signals"' in page
    assert "not compared: the model's aux loss has its own definition" in page
    assert "<h3>Selection bias</h3>" not in page  # the reference router has none
    again = render_report(paths.json, tmp_path / "b")
    assert again.html.read_text() == page
    # A report without signals (the JAX inspector's, a distributed merge) has no such section.
    report = load_report_json(paths.json)
    del report["sections"]["routing"]["aux_loss"]
    write_report_json(tmp_path / "c" / "report.json", report)
    plain = render_report(tmp_path / "c" / "report.json").html.read_text()
    assert "Model signals" not in plain and 'alt="model signals"' not in plain

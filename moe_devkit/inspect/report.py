"""The inspector's report files: ``report.json``, ``routing_analysis.png``, ``report.html``.

``write_report`` renders ``report.json`` (versioned envelope, see docs/report-schema.md) from
an ``InspectorSummary``, then ``routing_analysis.png`` and ``report.html`` from that JSON
alone (the model signals' figure, when the report has any, is embedded in the page), so
``render_report`` can re-render a stored report (``moe-devkit report report.json``). The
files of a set are all rendered, then written to temporaries and renamed into place together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_devkit.inspect.summary import SECTION
from moe_devkit.reporting import load_report_json, report_json_text, write_atomic_set

if TYPE_CHECKING:
    from moe_devkit.inspect.summary import InspectorSummary


@dataclass(frozen=True)
class ReportPaths:
    """Files written by ``write_report``."""

    json: Path
    png: Path
    html: Path


def write_report(summary: InspectorSummary, out_dir: str | Path) -> ReportPaths:
    """Writes report.json, routing_analysis.png and report.html, the last two rendered from
    the JSON text; all three are rendered before any file is replaced, so a failure leaves
    the previous set whole."""
    out = Path(out_dir)
    text = report_json_text(summary.to_report())
    files = {out / "report.json": text, **_rendered(json.loads(text), out)}
    json_path, png_path, html_path = write_atomic_set(files)
    return ReportPaths(json=json_path, png=png_path, html=html_path)


def render_report(report_json: str | Path, out_dir: str | Path | None = None) -> ReportPaths:
    """Renders routing_analysis.png and report.html from a stored report.json (both are
    rendered before either file is replaced).

    Raises:
        ValueError: the file is not a moe-devkit report or has no routing section.
        FileNotFoundError: the file does not exist.
    """
    json_path = Path(report_json)
    report = load_report_json(json_path)
    if SECTION not in report.get("sections", {}):
        raise ValueError(f"{json_path}: the report has no {SECTION!r} section to render")
    out = Path(out_dir) if out_dir is not None else json_path.parent
    png_path, html_path = write_atomic_set(_rendered(report, out))
    return ReportPaths(json=json_path, png=png_path, html=html_path)


def _rendered(report: dict[str, Any], out: Path) -> dict[Path, str | bytes]:
    """routing_analysis.png and report.html of a report envelope, in memory."""
    from moe_devkit.inspect.html import render_html
    from moe_devkit.inspect.plots import routing_figure_png, signals_figure_png

    section = report["sections"][SECTION]
    png = routing_figure_png(section)
    page = render_html(report, png, signals_figure_png(section))
    return {out / "routing_analysis.png": png, out / "report.html": page}

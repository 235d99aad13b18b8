"""``report.html``: one self-contained page (plots embedded, no network) from a report.

Alarms come first, then a summary table per layer, then the model signals (the aux loss
and the selection biases, when the report has them: a table each and their figure), then the
plots, and below them why a plot shows a note rather than data (a run too short for a
trend). Every string that comes from a model or a user (layer names, messages) is
HTML-escaped. A Content-Security-Policy
forbids any network load, and a small inline script marks the page ready once every image
has decoded (``<body data-ready="ok">``), which the browser test reads.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable
from typing import Any

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1500px}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td.name{text-align:left;font-family:monospace}
.error{color:#a00}.warning{color:#a60}.info{color:#06a}
img{max-width:100%;border:1px solid #ddd}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.length > 0 && imgs.every(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute('data-ready', ok ? 'ok' : 'broken-image');
});
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return "n/a"
    return html.escape(str(value))


def _findings_html(findings: list[dict[str, Any]]) -> str:
    if not findings:
        return "<p>No alarms.</p>"
    items = "".join(
        f'<li class="{html.escape(f["severity"])}"><b>{html.escape(f["severity"])}</b> '
        f"<code>{html.escape(f['code'])}</code>: {html.escape(f['message'])}</li>"
        for f in findings
    )
    return f"<ul>{items}</ul>"


_COLUMNS = (
    ("layer", lambda x: x["name"]),
    ("steps", lambda x: x["steps"]),
    ("tokens", lambda x: x["tokens"]),
    ("mean k", lambda x: x["k"]["mean"]),
    ("compute saved", lambda x: x["k"]["compute_saved"]),
    ("CV", lambda x: x["utilization"]["cv"]),
    ("max/mean", lambda x: x["utilization"]["max_over_mean"]),
    ("Gini", lambda x: x["utilization"]["gini"]),
    ("entropy", lambda x: x["utilization"]["entropy"]),
    ("dead", lambda x: len(x["utilization"]["dead_experts"])),
    ("complexity mean", lambda x: x["complexity"]["mean"]),
    ("complexity-k ρ", lambda x: x["complexity"]["k_spearman"]),
    ("non-finite", lambda x: x["nonfinite_tokens"]),
    ("dropped", lambda x: x["dropped_pairs"]),
)


def _layers_table(layers: dict[str, Any]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in _COLUMNS)
    rows = []
    for layer in layers.values():
        cells = [f'<td class="name">{html.escape(str(layer["name"]))}</td>']
        cells += [f"<td>{_fmt(get(layer))}</td>" for _, get in _COLUMNS[1:]]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _notes_html(section: dict[str, Any]) -> str:
    """Why a plot shows a note instead of data (the same words as in the figure)."""
    from moe_devkit.inspect.plots import TREND_TITLES, trend_note

    note = trend_note(section)
    if note is None:
        return ""
    return f'<p class="note"><b>{" and ".join(TREND_TITLES)}:</b> {html.escape(note)}</p>'


_AUX_ROWS = (
    ("model", "model_type"),
    ("forwards", "steps"),
    ("definition of the model's aux_loss", "definition"),
    ("forwards in training mode", "training_steps"),
    ("aux_loss returned / None / absent / unreadable", None),
    ("model aux_loss, mean", "model_mean"),
    ("inspector load-balancing loss, mean", "inspector_mean"),
    ("model aux_loss, last", "model_last"),
    ("inspector load-balancing loss, last", "inspector_last"),
    ("ratio model / inspector (median)", "ratio"),
    ("router_aux_loss_coef", "router_aux_loss_coef"),
    ("output_router_logits", "output_router_logits"),
)

_STATUSES = ("value", "none", "absent", "unreadable")

_BIAS_COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], Any]], ...] = (
    ("layer", lambda b: b["layer"]),
    ("tensor", lambda b: b["tensor"]),
    ("steps", lambda b: b["steps"]),
    ("|b| max, last", lambda b: b["last"]["abs_max"]),
    ("|b| max, run", lambda b: b["max_abs_max"]),
    ("mean", lambda b: b["last"]["mean"]),
    ("std", lambda b: b["last"]["std"]),
    ("max - min", lambda b: b["last"]["range"]),
    ("sign flips, last", lambda b: b["last"]["flip_fraction"]),
    ("sign flips, mean", lambda b: b["mean_flip_fraction"]),
)


def _signals_html(section: dict[str, Any], signals_png: bytes | None) -> str:
    """The aux-loss table, the selection-bias table and the signals figure ("" without)."""
    parts = []
    aux = section.get("aux_loss")
    if aux:
        rows = []
        for label, key in _AUX_ROWS:
            if key is None:
                status = aux.get("status", {})
                value = " / ".join(str(status.get(s, 0)) for s in _STATUSES)
            elif key == "ratio" and aux.get("definition") == "model":
                value = "not compared: the model's aux loss has its own definition"
            else:
                value = _fmt(aux.get(key), 4) if aux.get(key) is not None else "n/a"
            rows.append(f'<tr><td class="name">{html.escape(label)}</td><td>{value}</td></tr>')
        parts.append(f"<h3>Aux loss</h3><table><tbody>{''.join(rows)}</tbody></table>")
    biases = [
        {"layer": name, **layer["selection_bias"]}
        for name, layer in section["layers"].items()
        if "selection_bias" in layer
    ]
    if biases:
        head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in _BIAS_COLUMNS)
        body = []
        for bias in biases:
            cells = [f'<td class="name">{html.escape(str(bias["layer"]))}</td>']
            cells.append(f'<td class="name">{html.escape(str(bias["tensor"]))}</td>')
            for _, get in _BIAS_COLUMNS[2:]:
                value = get(bias)
                cells.append(f"<td>{'n/a' if value is None else _fmt(value, 4)}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        parts.append(
            "<h3>Selection bias</h3><p>Per recorded step: the abs max, mean, population "
            "standard deviation and max - min of the bias, and the share of its entries "
            "whose sign flipped since the previous recorded step.</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        )
    if signals_png is not None:
        image = base64.b64encode(signals_png).decode("ascii")
        parts.append(f'<img alt="model signals" src="data:image/png;base64,{image}">')
    if not parts:
        return ""
    return "<h2>Model signals</h2>\n" + "\n".join(parts)


def render_html(report: dict[str, Any], png: bytes, signals_png: bytes | None = None) -> str:
    """Returns the page for a report envelope, its routing figure and (when the report has
    model signals) its signals figure."""
    section = report["sections"]["routing"]
    totals = section["totals"]
    image = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<title>moe-devkit routing report</title><style>{_CSS}</style></head>
<body data-ready="pending">
<h1>moe-devkit routing report</h1>
<p>Created {html.escape(str(report.get("created")))} · {totals["layers"]} router(s) ·
{totals["decisions"]} decisions · {totals["tokens"]} tokens · schema version
{html.escape(str(report.get("version")))}</p>
<h2>Alarms</h2>
{_findings_html(report.get("findings", []))}
<h2>Layers</h2>
{_layers_table(section["layers"])}
{_signals_html(section, signals_png)}
<h2>Plots</h2>
<img alt="routing analysis" src="data:image/png;base64,{image}">
{_notes_html(section)}
<script>{_SCRIPT}</script>
</body></html>
"""

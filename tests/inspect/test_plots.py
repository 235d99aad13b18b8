"""Every panel of the routing figure has data, or a note saying why it has none."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moe_devkit import MoEModel, RouterConfig
from moe_devkit.cli import main
from moe_devkit.inspect import RouterInspector
from moe_devkit.inspect.plots import routing_figure, trend_note

TREND_PANELS = ("Utilization over time", "Mean k over time")


def _panels(section: dict[str, Any]) -> dict[str, Any]:
    """The figure's panels by title (colorbars left out)."""
    fig = routing_figure(section)
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def _plotted_points(ax: Any) -> int:
    """Points drawn on the panel: line vertices, scatter offsets, bars and image cells."""
    lines = sum(len(line.get_xdata()) for line in ax.get_lines())
    scatter = sum(len(c.get_offsets()) for c in ax.collections)
    bars = sum(_patch_points(p) for p in ax.patches)
    image = sum(int(np.isfinite(im.get_array()).sum()) for im in ax.get_images())
    return int(lines + scatter + bars + image)


def _patch_points(patch: Any) -> int:
    if hasattr(patch, "get_data"):  # a histogram's StepPatch
        return int((np.asarray(patch.get_data().values) > 0).sum())
    return int(patch.get_height() > 0)  # a bar


def _is_note(ax: Any) -> bool:
    return not ax.axison and any(t.get_text().startswith("No trend") for t in ax.texts)


def _section(out: Path) -> dict[str, Any]:
    report = json.loads((out / "report.json").read_text())
    section: dict[str, Any] = report["sections"]["routing"]
    return section


@pytest.mark.slow
def test_the_default_diagnose_run_fills_every_plot(tmp_path: Path) -> None:
    """The data behind each plot is in report.json, and each panel drawn from it has data."""
    assert main(["diagnose", "--out", str(tmp_path)]) == 0
    section = _section(tmp_path)
    for layer in section["layers"].values():
        assert layer["steps"] == 20
        assert len(layer["windows"]) >= 5
        assert all(w["tokens"] > 0 and w["mean_k"] > 0 for w in layer["windows"])
        assert layer["sample"]["k"] and sum(layer["complexity"]["histogram"]) > 0
        assert sum(layer["k"]["histogram"]) > 0 and sum(layer["utilization"]["counts"]) > 0
    panels = _panels(section)
    assert len(panels) == 6
    for title, ax in panels.items():
        assert not _is_note(ax), title
        assert _plotted_points(ax) >= 1, title
    for title in TREND_PANELS:
        assert all(len(line.get_xdata()) >= 5 for line in panels[title].get_lines())
    assert trend_note(section) is None
    assert "No trend" not in (tmp_path / "report.html").read_text()


def test_a_short_diagnose_run_labels_the_trend_panels(tmp_path: Path) -> None:
    argv = ["--steps", "3", "--batch", "2", "--seq", "8", "--hidden-size", "16", "--layers", "1"]
    assert main(["diagnose", *argv, "--device", "cpu", "--out", str(tmp_path)]) == 0
    section = _section(tmp_path)
    assert len(section["layers"]["layers.0.moe.router"]["windows"]) < 2
    panels = _panels(section)
    for title, ax in panels.items():
        if title in TREND_PANELS:
            assert _is_note(ax) and _plotted_points(ax) == 0, title
        else:
            assert _plotted_points(ax) >= 1, title
    note = trend_note(section)
    assert note is not None and "3 steps recorded" in note
    assert note in (tmp_path / "report.html").read_text()


def test_an_inspector_with_the_default_window_names_it_in_the_note(tmp_path: Path) -> None:
    """A library user's short run: the note says which window and how many steps it needs."""
    torch.manual_seed(0)
    model = MoEModel(RouterConfig(hidden_size=16, num_experts=4, max_k=2, expert_hidden_size=16))
    with torch.no_grad(), RouterInspector(model) as inspector:
        for _ in range(60):
            model(torch.randn(1, 4, 16))
    inspector.report(tmp_path)
    section = _section(tmp_path)
    assert len(section["layers"]["layers.0.moe.router"]["windows"]) == 1
    note = trend_note(section)
    assert note == (
        "No trend over time: 60 steps recorded, fewer than two windows of 50 steps; record "
        "at least 100 steps, or lower InspectorConfig.window."
    )
    assert all(_is_note(_panels(section)[title]) for title in TREND_PANELS)


def _signals_section() -> dict[str, Any]:
    """A routing section with an aux loss of 3 forwards and one biased layer of 3 steps."""
    bias = {
        "tensor": "gate.e_score_correction_bias",
        "history": {
            "steps": [0, 1, 2],
            "abs_max": [0.1, 0.2, 0.3],
            "mean": [0.0, 0.0, 0.0],
            "std": [0.05, 0.1, 0.15],
            "range": [0.2, 0.4, 0.6],
            "flip_fraction": [None, 0.25, 0.5],
        },
    }
    aux = {"history": {"steps": [0, 1, 2], "model": [2.0, 2.1, None], "inspector": [2.0, 2.1, 2.2]}}
    return {"layers": {"gate": {"name": "gate", "selection_bias": bias}}, "aux_loss": aux}


def test_the_signals_figure_plots_each_signal() -> None:
    from moe_devkit.inspect.plots import SIGNAL_TITLES, has_signals, signals_figure

    section = _signals_section()
    assert has_signals(section)
    panels = {ax.get_title(): ax for ax in signals_figure(section).axes}
    aux_lines = panels[SIGNAL_TITLES[0]].get_lines()
    assert [list(line.get_ydata()) for line in aux_lines] == [[2.0, 2.1], [2.0, 2.1, 2.2]]
    bias_lines = panels[SIGNAL_TITLES[1]].get_lines()
    assert [list(line.get_ydata()) for line in bias_lines] == [[0.1, 0.2, 0.3], [0.05, 0.1, 0.15]]
    (flips,) = panels[SIGNAL_TITLES[2]].get_lines()
    assert list(flips.get_xdata()) == [1, 2] and list(flips.get_ydata()) == [0.25, 0.5]


def test_without_signals_there_is_no_signals_figure_and_empty_panels_say_so() -> None:
    from moe_devkit.inspect.plots import (
        SIGNAL_TITLES,
        has_signals,
        signals_figure,
        signals_figure_png,
    )

    section = _signals_section()
    del section["layers"]["gate"]["selection_bias"]
    panels = {ax.get_title(): ax for ax in signals_figure(section).axes}
    for title in SIGNAL_TITLES[1:]:
        assert not panels[title].axison
        assert any(
            "no router of this model has a selection bias" in " ".join(t.get_text().split())
            for t in panels[title].texts
        )
    del section["aux_loss"]
    assert not has_signals(section) and signals_figure_png(section) is None


def test_many_biased_layers_are_drawn_as_their_max_and_median() -> None:
    from moe_devkit.inspect.plots import BIAS_LINES, SIGNAL_TITLES, signals_figure

    layers = {}
    for i in range(BIAS_LINES + 1):
        bias = _signals_section()["layers"]["gate"]["selection_bias"]
        bias["history"]["abs_max"] = [0.1 * i, 0.2 * i, 0.3 * i]
        layers[f"layer{i}"] = {"name": f"layer{i}", "selection_bias": bias}
    panels = {ax.get_title(): ax for ax in signals_figure({"layers": layers}).axes}
    lines = panels[SIGNAL_TITLES[1]].get_lines()
    assert len(lines) == 4  # max and median, abs max and std each
    top, _, median, _ = (list(line.get_ydata()) for line in lines)
    assert top == pytest.approx([0.1 * BIAS_LINES, 0.2 * BIAS_LINES, 0.3 * BIAS_LINES])
    assert median == pytest.approx(
        [0.1 * BIAS_LINES / 2, 0.2 * BIAS_LINES / 2, 0.3 * BIAS_LINES / 2]
    )
    labels = [t.get_text() for t in panels[SIGNAL_TITLES[2]].get_legend().get_texts()]
    assert labels == [f"max of {BIAS_LINES + 1} layers", "median"]


def test_an_aux_loss_of_the_models_own_definition_gets_its_own_axis() -> None:
    from moe_devkit.inspect.plots import SIGNAL_TITLES, signals_figure

    section = _signals_section()
    section["aux_loss"]["definition"] = "model"
    fig = signals_figure(section)
    panel = next(ax for ax in fig.axes if ax.get_title() == SIGNAL_TITLES[0])
    twins = [ax for ax in fig.axes if ax is not panel and ax.get_ylabel() == "model's aux_loss"]
    assert [list(line.get_ydata()) for line in panel.get_lines()] == [[2.0, 2.1, 2.2]]
    assert len(twins) == 1 and [list(x.get_ydata()) for x in twins[0].get_lines()] == [[2.0, 2.1]]
    legend = [t.get_text() for t in panel.get_legend().get_texts()]
    assert legend == [
        "model's aux_loss (right axis: its own definition)",
        "inspector's load-balancing loss",
    ]

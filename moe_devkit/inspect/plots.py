"""Routing plots, drawn from the report's ``routing`` section alone (matplotlib, Agg).

Panels: complexity vs k, the complexity histogram and the k histogram, then a
layers x experts utilization heatmap, utilization over time (max and min expert share per
window) and mean k over time. A panel is never drawn empty: the two trends need two trend
windows of some layer, and without them (a run shorter than two windows) each shows
``trend_note`` instead; any other panel without data says so.

A second figure, ``signals_figure`` (embedded in report.html), shows the model signals when
the section has them: the model's aux loss beside the inspector's load-balancing loss per step,
and each selection bias's abs max, standard deviation and sign flips per recorded step.
"""

from __future__ import annotations

import io
import textwrap
from typing import Any

import numpy as np

TREND_TITLES = ("Utilization over time", "Mean k over time")


def routing_figure_png(section: dict[str, Any], dpi: int = 110) -> bytes:
    """Renders the routing analysis figure and returns PNG bytes."""
    buffer = io.BytesIO()
    routing_figure(section, dpi).savefig(buffer, format="png")
    return buffer.getvalue()


def routing_figure(section: dict[str, Any], dpi: int = 110) -> Any:
    """The routing analysis figure (a matplotlib ``Figure``, 2 x 3 panels)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    layers = [layer for layer in section["layers"].values() if layer["tokens"]]
    fig = Figure(figsize=(16, 9), dpi=dpi, layout="constrained")
    axes = fig.subplots(2, 3)
    _complexity_vs_k(axes[0, 0], layers)
    _complexity_histogram(axes[0, 1], layers)
    _k_histogram(axes[0, 2], layers)
    _utilization_heatmap(fig, axes[1, 0], layers)
    _trends(axes[1, 1], axes[1, 2], layers, trend_note(section))
    for ax in axes.flat:
        if ax.axison and not ax.has_data():
            _note(ax, "No data: the report records no token for this plot.")
    fig.suptitle("moe-devkit routing analysis")
    return fig


def trend_note(section: dict[str, Any]) -> str | None:
    """Why the trend panels are not drawn (no layer has two trend windows), else None."""
    layers = section["layers"].values()
    if any(_trend_windows(layer) for layer in layers):
        return None
    steps = max((int(layer["steps"]) for layer in layers), default=0)
    window = section.get("config", {}).get("window")
    if isinstance(window, int) and steps < 2 * window:
        lower = ", or lower InspectorConfig.window" if window > 2 else ""  # 2 is its minimum
        return (
            f"No trend over time: {steps} steps recorded, fewer than two windows of {window} "
            f"steps; record at least {2 * window} steps{lower}."
        )
    return "No trend over time: the run recorded fewer than two trend windows with tokens."


def _trends(share_ax: Any, k_ax: Any, layers: list[dict[str, Any]], note: str | None) -> None:
    """The two trend panels, or, when there is no trend, the note on both."""
    if note is None:
        _shares_over_time(share_ax, layers)
        _mean_k_over_time(k_ax, layers)
        return
    for ax, title in zip((share_ax, k_ax), TREND_TITLES, strict=True):
        ax.set_title(title)
        _note(ax, note)


def _trend_windows(layer: dict[str, Any]) -> list[dict[str, Any]]:
    """The layer's windows with tokens, when there are two or more (a trend), else []."""
    windows = [w for w in layer["windows"] if w["tokens"]]
    return windows if len(windows) >= 2 else []


def _note(ax: Any, text: str) -> None:
    """Replaces a panel's plot by a centred note, keeping its title."""
    ax.set_axis_off()
    wrapped = "\n".join(textwrap.wrap(text, 48))
    ax.text(0.5, 0.5, wrapped, ha="center", va="center", transform=ax.transAxes, color="0.3")


def _label(layer: dict[str, Any]) -> str:
    name = str(layer["name"])
    return name if len(name) <= 28 else "…" + name[-27:]


def _complexity_vs_k(ax: Any, layers: list[dict[str, Any]]) -> None:
    rng = np.random.default_rng(0)
    for layer in [lay for lay in layers if lay["sample"]["k"]]:
        c = np.asarray(layer["sample"]["complexity"], dtype=float)
        k = np.asarray(layer["sample"]["k"], dtype=float)
        jitter = rng.uniform(-0.15, 0.15, size=k.shape)  # separate the integer rows
        ax.scatter(c, k + jitter, s=4, alpha=0.35, label=_label(layer))
    ax.set(xlabel="complexity score", ylabel="experts selected (k)", title="Complexity vs k")
    ax.yaxis.get_major_locator().set_params(integer=True)
    if len(ax.collections) > 1:
        ax.legend(fontsize=7, markerscale=3)


def _complexity_histogram(ax: Any, layers: list[dict[str, Any]]) -> None:
    for layer in [lay for lay in layers if sum(lay["complexity"]["histogram"])]:
        hist = np.asarray(layer["complexity"]["histogram"], dtype=float)
        edges = np.linspace(0, 1, len(hist) + 1)
        ax.stairs(hist / max(hist.sum(), 1), edges, label=_label(layer))
    ax.set(xlabel="complexity score", ylabel="share of tokens", title="Complexity distribution")


def _k_histogram(ax: Any, layers: list[dict[str, Any]]) -> None:
    width = 0.8 / max(len(layers), 1)
    for i, layer in enumerate(layers):
        hist = np.asarray(layer["k"]["histogram"], dtype=float)
        ks = np.arange(len(hist))
        ax.bar(
            ks + i * width - 0.4 + width / 2, hist / max(hist.sum(), 1), width, label=_label(layer)
        )
    ax.set(xlabel="experts selected (k)", ylabel="share of tokens", title="Expert selection (k)")


def _utilization_heatmap(fig: Any, ax: Any, layers: list[dict[str, Any]]) -> None:
    ax.set_title("Load / mean load per expert")
    if not layers:
        return
    width = max(len(layer["utilization"]["counts"]) for layer in layers)
    shares = np.full((len(layers), width), np.nan)
    for i, layer in enumerate(layers):
        counts = np.asarray(layer["utilization"]["counts"], dtype=float)
        shares[i, : len(counts)] = counts / max(counts.sum(), 1) * len(counts)
    image = ax.imshow(shares, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set(xlabel="expert", ylabel="layer")
    ax.set_yticks(range(len(layers)), [_label(layer) for layer in layers], fontsize=7)
    fig.colorbar(image, ax=ax)


def _shares_over_time(ax: Any, layers: list[dict[str, Any]]) -> None:
    for layer in layers:
        windows = _trend_windows(layer)
        if not windows:
            continue
        ends = [w["end_step"] for w in windows]
        counts = [np.asarray(w["counts"], dtype=float) for w in windows]
        top = [c.max() / c.sum() if c.sum() else np.nan for c in counts]
        low = [c.min() / c.sum() if c.sum() else np.nan for c in counts]
        (line,) = ax.plot(ends, top, marker=".", label=f"{_label(layer)} max")
        ax.plot(ends, low, marker=".", linestyle="--", color=line.get_color())
    ax.set(xlabel="step", ylabel="expert share (max solid, min dashed)", title=TREND_TITLES[0])
    ax.xaxis.get_major_locator().set_params(integer=True)
    if len(ax.get_lines()) > 2:
        ax.legend(fontsize=7)


def _mean_k_over_time(ax: Any, layers: list[dict[str, Any]]) -> None:
    for layer in layers:
        windows = _trend_windows(layer)
        if windows:
            ax.plot(
                [w["end_step"] for w in windows],
                [w["mean_k"] for w in windows],
                marker=".",
                label=_label(layer),
            )
    ax.set(xlabel="step", ylabel="mean k per window", title=TREND_TITLES[1])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)


SIGNAL_TITLES = (
    "Aux loss per step",
    "Selection bias: |b| max and std",
    "Selection bias: sign flips",
)


def has_signals(section: dict[str, Any]) -> bool:
    """True when the section holds model signals to plot (an aux loss or a selection bias)."""
    aux = section.get("aux_loss") or {}
    history = aux.get("history") or {}
    values = [v for key in ("model", "inspector") for v in history.get(key, [])]
    return any(v is not None for v in values) or any(
        "selection_bias" in layer for layer in section["layers"].values()
    )


def signals_figure_png(section: dict[str, Any], dpi: int = 110) -> bytes | None:
    """Renders the model-signals figure (``signals_figure``) as PNG bytes; None without
    signals."""
    if not has_signals(section):
        return None
    buffer = io.BytesIO()
    signals_figure(section, dpi).savefig(buffer, format="png")
    return buffer.getvalue()


def signals_figure(section: dict[str, Any], dpi: int = 110) -> Any:
    """The model-signals figure (1 x 3 panels): the model's aux loss and the inspector's
    load-balancing loss per step, then per layer with a selection bias its abs max (solid)
    and standard deviation (dashed), and the fraction of its entries that flipped sign."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.5), dpi=dpi, layout="constrained")
    aux_ax, bias_ax, flip_ax = fig.subplots(1, 3)
    _aux_loss_over_steps(aux_ax, section.get("aux_loss") or {})
    biased = [layer for layer in section["layers"].values() if "selection_bias" in layer]
    _bias_over_steps(bias_ax, flip_ax, biased)
    if not aux_ax.has_data():
        _note(aux_ax, "No data: no forward returned an aux loss or had router probabilities.")
    for ax in (bias_ax, flip_ax):
        if not ax.has_data():
            _note(ax, "No data: no router of this model has a selection bias.")
    fig.suptitle("moe-devkit model signals")
    return fig


def _series(steps: list[int], values: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) without the missing (None) entries."""
    pairs = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
    return np.asarray([p[0] for p in pairs]), np.asarray([p[1] for p in pairs], dtype=float)


def _aux_loss_over_steps(ax: Any, aux: dict[str, Any]) -> None:
    """The two losses per forward; a loss of the model's own definition (not transformers')
    gets its own y axis on the right, as its scale need not match."""
    ax.set_title(SIGNAL_TITLES[0])
    history = aux.get("history")
    if not history:
        return
    model_steps, model = _series(history["steps"], history["model"])
    steps, mine = _series(history["steps"], history["inspector"])
    own = aux.get("definition") == "model" and len(steps) > 0 and len(model_steps) > 0
    model_ax = ax.twinx() if own else ax
    handles = []
    if len(model_steps):
        label = "model's aux_loss" + (" (right axis: its own definition)" if own else "")
        handles += model_ax.plot(model_steps, model, marker=".", color="C0", label=label)
    if len(steps):
        label = "inspector's load-balancing loss"
        handles += ax.plot(steps, mine, linestyle="--", marker=".", color="C1", label=label)
    if own:
        model_ax.set_ylabel("model's aux_loss")
    ax.set(xlabel="forward", ylabel="inspector's loss" if own else "loss")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if handles:
        ax.legend(handles=handles, fontsize=7)


BIAS_LINES = 8
"""Biased layers drawn one line each; with more, the panels draw their max and median."""


def _bias_over_steps(bias_ax: Any, flip_ax: Any, layers: list[dict[str, Any]]) -> None:
    bias_ax.set_title(SIGNAL_TITLES[1])
    flip_ax.set_title(SIGNAL_TITLES[2])
    series = [(_label(layer), layer["selection_bias"]["history"]) for layer in layers]
    if len(series) > BIAS_LINES:
        series = _across_layers([history for _, history in series])
    for label, history in series:
        steps, abs_max = _series(history["steps"], history["abs_max"])
        (line,) = bias_ax.plot(steps, abs_max, marker=".", label=label)
        steps, std = _series(history["steps"], history["std"])
        bias_ax.plot(steps, std, linestyle="--", color=line.get_color())
        steps, flips = _series(history["steps"], history["flip_fraction"])
        if len(steps):
            flip_ax.plot(steps, flips, marker=".", color=line.get_color(), label=label)
    bias_ax.set(xlabel="recorded step", ylabel="|b| max (solid), std (dashed)")
    flip_ax.set(xlabel="recorded step", ylabel="share of entries flipping sign", ylim=(-0.02, 1.02))
    for ax in (bias_ax, flip_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_lines():
            ax.legend(fontsize=7)


def _across_layers(histories: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The max and the median over the layers of each statistic, per recorded step."""
    steps = sorted({step for history in histories for step in history["steps"]})
    out = []
    for label, reduce in ((f"max of {len(histories)} layers", np.max), ("median", np.median)):
        columns: dict[str, Any] = {"steps": steps}
        for key in ("abs_max", "std", "flip_fraction"):
            at: dict[int, list[float]] = {}
            for history in histories:
                for step, value in zip(history["steps"], history[key], strict=True):
                    if value is not None:
                        at.setdefault(step, []).append(float(value))
            columns[key] = [float(reduce(at[s])) if s in at else None for s in steps]
        out.append((label, columns))
    return out

"""Routing plots, drawn from the report's ``routing`` section alone (matplotlib, Agg).

Panels: the seed's three (complexity vs k, complexity histogram, k histogram), then a
layers x experts utilization heatmap, utilization over time (max and min expert share per
window) and mean k over time.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def routing_figure_png(section: dict[str, Any], dpi: int = 110) -> bytes:
    """Renders the routing analysis figure and returns PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    layers = list(section["layers"].values())
    fig = Figure(figsize=(16, 9), dpi=dpi, layout="constrained")
    axes = fig.subplots(2, 3)
    _complexity_vs_k(axes[0, 0], layers)
    _complexity_histogram(axes[0, 1], layers)
    _k_histogram(axes[0, 2], layers)
    _utilization_heatmap(fig, axes[1, 0], layers)
    _shares_over_time(axes[1, 1], layers)
    _mean_k_over_time(axes[1, 2], layers)
    fig.suptitle("moe-devkit routing analysis")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _label(layer: dict[str, Any]) -> str:
    name = str(layer["name"])
    return name if len(name) <= 28 else "…" + name[-27:]


def _complexity_vs_k(ax: Any, layers: list[dict[str, Any]]) -> None:
    rng = np.random.default_rng(0)
    for layer in layers:
        c = np.asarray(layer["sample"]["complexity"], dtype=float)
        k = np.asarray(layer["sample"]["k"], dtype=float)
        jitter = rng.uniform(-0.15, 0.15, size=k.shape)  # separate the integer rows
        ax.scatter(c, k + jitter, s=4, alpha=0.35, label=_label(layer))
    ax.set(xlabel="complexity score", ylabel="experts selected (k)", title="Complexity vs k")
    ax.yaxis.get_major_locator().set_params(integer=True)
    if len(layers) > 1:
        ax.legend(fontsize=7, markerscale=3)


def _complexity_histogram(ax: Any, layers: list[dict[str, Any]]) -> None:
    for layer in layers:
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
    if not layers:
        return
    width = max(len(layer["utilization"]["counts"]) for layer in layers)
    shares = np.full((len(layers), width), np.nan)
    for i, layer in enumerate(layers):
        counts = np.asarray(layer["utilization"]["counts"], dtype=float)
        shares[i, : len(counts)] = counts / max(counts.sum(), 1) * len(counts)
    image = ax.imshow(shares, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set(xlabel="expert", ylabel="layer", title="Load / mean load per expert")
    ax.set_yticks(range(len(layers)), [_label(layer) for layer in layers], fontsize=7)
    fig.colorbar(image, ax=ax)


def _shares_over_time(ax: Any, layers: list[dict[str, Any]]) -> None:
    for layer in layers:
        windows = layer["windows"]
        if not windows:
            continue
        ends = [w["end_step"] for w in windows]
        counts = [np.asarray(w["counts"], dtype=float) for w in windows]
        top = [c.max() / c.sum() if c.sum() else np.nan for c in counts]
        low = [c.min() / c.sum() if c.sum() else np.nan for c in counts]
        (line,) = ax.plot(ends, top, label=f"{_label(layer)} max")
        ax.plot(ends, low, linestyle="--", color=line.get_color())
    ax.set(
        xlabel="step", ylabel="expert share (max solid, min dashed)", title="Utilization over time"
    )


def _mean_k_over_time(ax: Any, layers: list[dict[str, Any]]) -> None:
    for layer in layers:
        windows = layer["windows"]
        if windows:
            ax.plot(
                [w["end_step"] for w in windows],
                [w["mean_k"] for w in windows],
                label=_label(layer),
            )
    ax.set(xlabel="step", ylabel="mean k per window", title="Mean k over time")
    if any(layer["windows"] for layer in layers):
        ax.legend(fontsize=7)

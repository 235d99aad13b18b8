"""What the training-loop tests share: token data, the metric definitions recomputed from
what the experts received, and readers of TensorBoard event files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moe_devkit import RouterConfig
from moe_devkit.inspect import RouterInspector
from moe_devkit.routers.torch_router import MoEModel

SEQ = 8
BATCH = 2


class TokenIds(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random token ids, labels the same (a causal LM shifts them itself)."""

    def __init__(self, n: int, vocab: int, seed: int = 0, seq: int = SEQ) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def truth_windows(
    by_step: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]],
) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
    """Per log step: each layer's expert counts and k histogram since the previous log, from
    cumulative ``(counts, k_histogram)`` snapshots taken at each log (``hf_zoo.ExpertInputs``)."""
    out: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    before: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for step in sorted(by_step):
        now = by_step[step]
        out[step] = []
        for path, (counts, hist) in now.items():
            old_counts, old_hist = before.get(path, (0 * counts, np.zeros(0, np.int64)))
            width = max(len(hist), len(old_hist))
            h = np.pad(hist, (0, width - len(hist))) - np.pad(old_hist, (0, width - len(old_hist)))
            out[step].append((counts - old_counts, h))
        before = now
    return out


def truth_metrics(layers: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """docs/metrics.md's definitions, from the experts' own inputs."""
    entropies, top_shares, dead = [], [], 0
    for counts, _ in layers:
        share = counts / counts.sum()
        nz = share[share > 0]
        entropies.append(float(-(nz * np.log(nz)).sum() / math.log(len(counts))))
        top_shares.append(float(share.max()))
        dead += int((counts == 0).sum())
    hist = sum(h for _, h in layers)
    ks = np.arange(len(hist))
    mean_k = float((hist * ks).sum() / hist.sum())
    return {
        "routing_entropy_mean": float(np.mean(entropies)),
        "routing_entropy_min": min(entropies),
        "max_expert_share_mean": float(np.mean(top_shares)),
        "max_expert_share_max": max(top_shares),
        "dead_expert_fraction": dead / sum(len(c) for c, _ in layers),
        "mean_k": mean_k,
        "k_std": float(math.sqrt(max((hist * ks**2).sum() / hist.sum() - mean_k**2, 0.0))),
    }


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar tag of the event files under ``log_dir``: step -> value."""
    out: dict[str, dict[int, float]] = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def images_and_histograms(log_dir: Path) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """The steps of every image and histogram tag under ``log_dir``."""
    images: dict[str, list[int]] = {}
    histograms: dict[str, list[int]] = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"images": 0, "histograms": 0})
        acc.Reload()
        for tag in acc.Tags()["images"]:
            images.setdefault(tag, []).extend(e.step for e in acc.Images(tag))
        for tag in acc.Tags()["histograms"]:
            histograms.setdefault(tag, []).extend(e.step for e in acc.Histograms(tag))
    return images, histograms


def same_float32(a: float, b: float) -> bool:
    """TensorBoard stores scalars as float32."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return bool(np.float32(a) == np.float32(b))


def reference_windows() -> tuple[list[dict[str, float]], Any]:
    """Three windows of a 2-layer x 6-expert reference model in a plain loop, and a summary."""
    torch.manual_seed(0)
    model = MoEModel(RouterConfig(hidden_size=16, num_experts=6, min_k=1, max_k=3), num_layers=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    with RouterInspector(model) as inspector:
        for _ in range(3):
            for _ in range(2):
                step_out = model(torch.randn(4, 8, 16))
                loss = step_out.hidden_states.pow(2).mean() + step_out.aux_loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            out.append(inspector.metrics(prefix="moe/"))
    return out, inspector.summary()

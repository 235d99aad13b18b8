"""On CUDA, recording a transformers MoE model adds no host synchronisation of its own.

transformers' eager experts loop synchronises by itself (``nonzero`` over the experts hit),
so sync-debug mode "error" cannot run the model at all; mode "warn" reports every
synchronising call with the Python frame that made it, and none may come from moe-devkit.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import moe_devkit
from moe_devkit.inspect import InspectorConfig, RouterInspector

transformers = pytest.importorskip("transformers")

from hf_zoo import build_tiny  # noqa: E402

PACKAGE = str(Path(moe_devkit.__file__).parent)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["mixtral", "deepseek_v3", "jetmoe"])
def test_recording_a_transformers_model_makes_no_sync_of_its_own(kind: str) -> None:
    torch.manual_seed(0)
    model = build_tiny(kind).to("cuda")
    ids = torch.randint(3, 64, (2, 16), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    inspector = RouterInspector(model, InspectorConfig(window=2)).attach()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # first step: checks and lazy set-up
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(3):
                    model(input_ids=ids, attention_mask=mask)
            finally:
                torch.cuda.set_sync_debug_mode(0)
    ours = [
        f"{w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if "synchroniz" in str(w.message) and w.filename.startswith(PACKAGE)
    ]
    assert not ours, ours
    assert any("synchroniz" in str(w.message) for w in caught)  # the model's own syncs
    layers = inspector.summary().layers
    assert layers and all(layer["tokens"] == 4 * 27 for layer in layers.values())

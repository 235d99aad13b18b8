"""A real transformers.Trainer run of a tiny Mixtral with RouterInspectorCallback and any
``report_to`` backend, beside a second, independently attached inspector read at the same
training logs (what the logged values must equal)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers
from hf_zoo import build_tiny
from training_support import BATCH, TokenIds

from moe_devkit.inspect import RouterInspector
from moe_devkit.integrations.hf import RouterInspectorCallback

LOGGING_STEPS = 5


class Reference(transformers.TrainerCallback):  # type: ignore[misc]
    """A second inspector's ``metrics(prefix="moe/")`` at each training log, by step."""

    def __init__(self, inspector: RouterInspector) -> None:
        self.inspector = inspector
        self.by_step: dict[int, dict[str, float]] = {}

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs is not None and "loss" in logs:
            self.by_step[state.global_step] = self.inspector.metrics(prefix="moe/")


def train_reported(
    tmp_path: Path, report_to: list[str], *, max_steps: int = 20, **callback_kw: Any
) -> tuple[Any, RouterInspectorCallback, Reference]:
    """Trains ``max_steps`` optimizer steps, logging every ``LOGGING_STEPS``."""
    model = build_tiny("mixtral")
    model.config.output_router_logits = True
    model.train()
    callback = RouterInspectorCallback(**callback_kw)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        logging_steps=LOGGING_STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-3,
        report_to=report_to,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    data = TokenIds(BATCH * max_steps, model.config.vocab_size)
    reference = Reference(RouterInspector().attach(model))
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, callbacks=[callback, reference]
    )
    try:
        trainer.train()
    finally:
        reference.inspector.detach()
    return trainer, callback, reference

"""RouterInspectorCallback in a real transformers.Trainer run, read back from TensorBoard."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("tensorboard")

from hf_zoo import ExpertInputs, build_tiny, record_expert_inputs  # noqa: E402
from training_support import (  # noqa: E402
    BATCH,
    SEQ,
    TokenIds,
    images_and_histograms,
    same_float32,
    scalars,
    truth_metrics,
    truth_windows,
)

from moe_devkit.inspect import RouterInspector  # noqa: E402
from moe_devkit.inspect.live import METRIC_KEYS  # noqa: E402
from moe_devkit.integrations.hf import RouterInspectorCallback  # noqa: E402
from moe_devkit.integrations.sinks import JsonLinesSink  # noqa: E402

LOGGING_STEPS = 5


pytestmark = pytest.mark.usefixtures("one_thread")


class Reference(transformers.TrainerCallback):  # type: ignore[misc]
    """A second inspector's metrics, read at the same training logs (independent windows)."""

    def __init__(
        self,
        inspector: RouterInspector,
        truth: dict[str, ExpertInputs],
        fired: list[Any] | None = None,
    ) -> None:
        self.inspector = inspector
        self.by_step: dict[int, dict[str, float]] = {}
        self.truth = truth  # what the experts received, by hooks on the experts themselves
        self.truth_by_step: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self.fired = fired if fired is not None else []
        self.fired_by_step: dict[int, int] = {}  # alarm deliveries so far, at each log

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs is not None and "loss" in logs:
            self.by_step[state.global_step] = self.inspector.metrics(prefix="moe/")
            self.truth_by_step[state.global_step] = {
                path: (layer.counts.numpy().copy(), np.array(layer.k_histogram))
                for path, layer in self.truth.items()
            }
            self.fired_by_step[state.global_step] = len(self.fired)

    def truth_windows(self) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
        """Per log: each layer's expert counts and k histogram since the previous log."""
        return truth_windows(self.truth_by_step)


def train(
    tmp_path: Path,
    *,
    accumulation: int = 1,
    max_steps: int = 20,
    router_logits: bool = True,
    fired: list[Any] | None = None,
    add_later: bool = False,
    **callback_kw: Any,
) -> tuple[Any, RouterInspectorCallback, Reference]:
    model = build_tiny("mixtral")
    model.config.output_router_logits = router_logits  # the aux loss reaches the loss
    model.train()
    callback = RouterInspectorCallback(**callback_kw)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        logging_steps=LOGGING_STEPS,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-3,
        report_to=["tensorboard"],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    data = TokenIds(BATCH * accumulation * max_steps, model.config.vocab_size)
    with record_expert_inputs(model) as truth:
        reference = Reference(RouterInspector().attach(model), truth, fired)
        callbacks = [reference] if add_later else [callback, reference]
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=data, callbacks=callbacks
        )
        if add_later:  # behind the reporting callbacks and the reference: it must move ahead
            trainer.add_callback(callback)
        trainer.train()
    reference.inspector.detach()
    return trainer, callback, reference


def test_trainer_logs_every_key_at_every_logging_step_to_tensorboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    jsonl = tmp_path / "moe.jsonl"
    trainer, callback, reference = train(
        tmp_path, sinks=[JsonLinesSink(jsonl)], on_alarm="raise", images_every=10
    )

    steps = list(range(LOGGING_STEPS, 21, LOGGING_STEPS))
    assert sorted(reference.by_step) == steps
    logged = scalars(tmp_path / "tb")
    for key in METRIC_KEYS:
        tag = f"train/moe/{key}"
        assert tag in logged, f"{tag} not in TensorBoard: {sorted(logged)}"
        assert sorted(logged[tag]) == steps, tag
        for step in steps:
            expected = reference.by_step[step][f"moe/{key}"]
            assert same_float32(logged[tag][step], expected), (tag, step)
    # and to the definitions, recomputed from what the experts themselves received
    truth = reference.truth_windows()
    for step in steps:
        assert len(truth[step]) == model_layers(trainer.model)
        for key, value in truth_metrics(truth[step]).items():
            assert logged[f"train/moe/{key}"][step] == pytest.approx(value, rel=1e-6), (key, step)
    # each window holds the 5 optimizer steps since the previous log, BATCH x SEQ tokens each
    for step in steps:
        assert logged["train/moe/steps"][step] == LOGGING_STEPS
        assert logged["train/moe/tokens"][step] == LOGGING_STEPS * BATCH * SEQ
    # the Trainer's own history has them too
    history = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    for step in steps:
        assert {f"moe/{k}" for k in METRIC_KEYS} <= set(history[step])

    lines = jsonl.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["step"] for line in lines] == steps
    for line in lines:
        record = json.loads(line)
        assert set(record["metrics"]) == {f"moe/{k}" for k in METRIC_KEYS}
        for key, value in record["metrics"].items():
            expected = reference.by_step[record["step"]][key]
            assert (value is None and math.isnan(expected)) or value == expected, key

    # every 10 steps, the heatmap and the k histogram in the Trainer's own event files
    images, histograms = images_and_histograms(tmp_path / "tb")
    assert images == {"train/moe/utilization": [10, 20]}
    assert histograms == {"train/moe/k": [10, 20]}

    report = tmp_path / "out" / "moe_devkit_report" / "report.json"
    assert report.is_file()
    layers = json.loads(report.read_text())["sections"]["routing"]["layers"]
    assert len(layers) == model_layers(trainer.model)
    assert not callback.inspector or not callback.inspector.attached


def model_layers(model: Any) -> int:
    return int(model.config.num_hidden_layers)


def test_window_covers_every_micro_batch_with_gradient_accumulation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    report_dir = tmp_path / "report"
    _, _, reference = train(
        tmp_path, accumulation=2, max_steps=10, add_later=True, report_dir=report_dir
    )

    logged = scalars(tmp_path / "tb")
    assert sorted(logged["train/moe/steps"]) == [5, 10]
    for step in (5, 10):
        # 5 optimizer steps of 2 micro-batches each: 10 forwards of BATCH x SEQ tokens
        assert logged["train/moe/steps"][step] == 2 * LOGGING_STEPS
        assert logged["train/moe/tokens"][step] == 2 * LOGGING_STEPS * BATCH * SEQ
        for key in METRIC_KEYS:
            expected = reference.by_step[step][f"moe/{key}"]
            assert same_float32(logged[f"train/moe/{key}"][step], expected), (key, step)
    assert (report_dir / "report.json").is_file()


def test_alarms_fire_at_the_first_logging_step_once_per_episode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without output_router_logits the model's aux loss is missing from the first window."""
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    fired: list[list[Any]] = []
    _, _, reference = train(
        tmp_path, max_steps=15, router_logits=False, fired=fired, on_alarm=fired.append
    )

    # delivered at the log of step 5 (the callback runs before the reference), then quiet
    assert reference.fired_by_step == {5: 1, 10: 1, 15: 1}, [[f.code for f in b] for b in fired]
    assert [f.code for f in fired[0]] == ["aux-loss-missing"]


def test_importing_the_hf_integration_loads_no_transformers() -> None:
    code = (
        "import sys, moe_devkit.integrations.hf as hf; "
        "from moe_devkit.integrations.hf import *; "
        "assert 'transformers' not in sys.modules, 'loaded'; "
        "hf.RouterInspectorCallback; assert 'transformers' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_transformers_the_callback_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import moe_devkit.integrations.hf as hf\n"
        "hf.RouterInspectorCallback\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last == (
        "ModuleNotFoundError: RouterInspectorCallback needs transformers: "
        'pip install "moe-devkit[hf]"'
    ), run.stderr


def test_only_the_main_process_logs_and_writes_the_report(tmp_path: Path) -> None:
    """Another rank records, and adds no keys, raises no alarm and writes no report."""
    model = build_tiny("mixtral")
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True)
    state = transformers.TrainerState(is_world_process_zero=False, global_step=5)
    control = transformers.TrainerControl()
    callback = RouterInspectorCallback(on_alarm="raise")
    with pytest.warns(UserWarning, match="could not find its Trainer's callback list"):
        callback.on_train_begin(args, state, control, model=model)  # called by no Trainer
    with torch.no_grad():
        model(input_ids=torch.randint(0, model.config.vocab_size, (BATCH, SEQ)))
    logs = {"loss": 1.0}
    callback.on_log(args, state, control, logs=logs)
    callback.on_train_end(args, state, control, model=model)

    assert logs == {"loss": 1.0}
    assert not (tmp_path / "out").exists()
    assert callback.inspector is not None and not callback.inspector.attached
    assert callback.inspector.metrics()["moe/tokens"] == BATCH * SEQ  # it did record

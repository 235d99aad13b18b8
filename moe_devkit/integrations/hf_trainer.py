"""``RouterInspectorCallback``: the inspector in a ``transformers.Trainer`` run.

::

    trainer = Trainer(model, args, train_dataset=..., callbacks=[RouterInspectorCallback()])

- ``on_train_begin``: attaches the inspector (a new ``RouterInspector`` unless one is given)
  to the Trainer's model, unless it is attached already.
- Each training log (every ``logging_steps`` optimizer steps): adds ``inspector.metrics()``
  (the window since the previous log, every micro-batch of every accumulation step in it) to
  the Trainer's logs, so every ``report_to`` backend and ``state.log_history`` get the keys,
  writes them to the extra ``sinks``, and runs ``inspector.check_alarms(on_alarm)``.
- ``on_train_end``: writes the report to ``report_dir`` (default
  ``<output_dir>/moe_devkit_report``) and closes the sinks.

Callbacks see a log in the order of the Trainer's callback list, where the ``report_to``
callbacks come before the ones passed in ``callbacks=``; so at its first event this callback
moves itself in front of them (just after ``DefaultFlowCallback``). Under DDP every rank
records, and only the world's main process (``state.is_world_process_zero``) reads
metrics, raises alarms and writes the report.

This module imports transformers; ``moe_devkit.integrations.hf`` loads it only when
``RouterInspectorCallback`` is first used.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moe_devkit.inspect.inspector import RouterInspector
from moe_devkit.inspect.live import OnAlarm
from moe_devkit.integrations._loop import ImageCadence
from moe_devkit.integrations.sinks import MetricSink, MLflowSink, TensorBoardSink, WandbSink

try:
    from transformers import TrainerCallback
    from transformers.integrations.integration_utils import (
        MLflowCallback,
        TensorBoardCallback,
        WandbCallback,
    )
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback
except ImportError:
    raise ModuleNotFoundError(
        'RouterInspectorCallback needs transformers: pip install "moe-devkit[hf]"'
    ) from None

TRAINING_LOG_KEY = "loss"  # in the logs of training steps, not in eval or end-of-run logs


class RouterInspectorCallback(TrainerCallback):  # type: ignore[misc]
    """Logs the inspector's live metrics and alarms through a ``transformers.Trainer``.

    Args:
        inspector: the inspector to use (default: a new ``RouterInspector()``).
        report_dir: where ``on_train_end`` writes the report (default:
            ``<args.output_dir>/moe_devkit_report``).
        on_alarm: ``"warn"``, ``"raise"`` or a callable, passed to ``check_alarms``.
        prefix: the prefix of every metric key.
        images_every: every this many optimizer steps (at a logging step), the sinks and
            the runs of the Trainer's ``report_to`` TensorBoard, MLflow and W&B callbacks get
            the utilization heatmap and the k histogram (default: never).
        sinks: sinks written besides the Trainer's ``report_to`` backends (for instance a
            ``JsonLinesSink``); closed at the end of training.
    """

    def __init__(
        self,
        inspector: RouterInspector | None = None,
        *,
        report_dir: str | Path | None = None,
        on_alarm: OnAlarm = "warn",
        prefix: str = "moe/",
        images_every: int | None = None,
        sinks: Sequence[MetricSink] = (),
    ) -> None:
        self._images = ImageCadence(images_every)
        self._run_sinks: dict[str, MetricSink] = {}  # image sinks of report_to runs
        self.inspector = inspector
        self.report_dir = None if report_dir is None else Path(report_dir)
        self.on_alarm = on_alarm
        self.prefix = prefix
        self.sinks = list(sinks)
        self._attached_here = False
        self._placed = False
        self._handler: Any = None

    # ------------------------------------------------------------------ placement

    def _place_first(self) -> None:
        """Moves this callback in front of the reporting callbacks of its Trainer's handler.

        The handler is the caller of the current event (``CallbackHandler.call_event``);
        moving an item from behind the loop's position to before it neither skips nor
        repeats a callback of the event being delivered.
        """
        if self._placed:
            return
        handler = _calling_handler(self)
        if handler is None:
            warnings.warn(
                "RouterInspectorCallback could not find its Trainer's callback list: the "
                "report_to callbacks listed before it will not receive the moe/ metrics",
                stacklevel=3,
            )
            self._placed = True
            return
        self._handler = handler
        callbacks: list[Any] = handler.callbacks
        position = 0
        while position < len(callbacks) and isinstance(callbacks[position], DefaultFlowCallback):
            position += 1
        index = next(i for i, cb in enumerate(callbacks) if cb is self)
        if index > position:
            callbacks.insert(position, callbacks.pop(index))
        self._placed = True

    # ------------------------------------------------------------------ events

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._place_first()

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        self._place_first()
        if self.inspector is None:
            self.inspector = RouterInspector()
        if not self.inspector.attached:
            if model is None:
                raise ValueError("RouterInspectorCallback: the Trainer passed no model")
            self.inspector.attach(model)
            self._attached_here = True
        if state.is_world_process_zero and self.inspector.layers:
            self.inspector.metrics(prefix=self.prefix)  # the first window starts here

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if logs is None or TRAINING_LOG_KEY not in logs or self.inspector is None:
            return
        if not state.is_world_process_zero:
            return
        step = int(state.global_step)
        metrics = self.inspector.metrics(prefix=self.prefix)
        logs.update(metrics)
        history = state.log_history
        if history and history[-1].get("step") == step and TRAINING_LOG_KEY in history[-1]:
            history[-1].update(metrics)  # the Trainer stored a copy before calling on_log
        for sink in self.sinks:
            sink.log(metrics, step)
        if self._images.due(step):
            summary = self.inspector.summary()
            for sink in [*self.sinks, *self._report_to_sinks()]:
                sink.log_images(summary, step)
            self._images.written(step)
        self.inspector.check_alarms(on_alarm=self.on_alarm)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.inspector is None:
            return
        if state.is_world_process_zero:
            out = self.report_dir or Path(args.output_dir) / "moe_devkit_report"
            self.inspector.report(out)
            for sink in self.sinks:
                sink.close()
        if self._attached_here:
            self.inspector.detach()
            self._attached_here = False

    def _report_to_sinks(self) -> list[MetricSink]:
        """Image sinks into the runs of the Trainer's ``report_to`` callbacks, named as their
        scalars are: TensorBoard's writer and W&B's run under ``train/<prefix>`` (W&B on the
        ``train/global_step`` axis), MLflow's active run under ``<prefix>``."""
        callbacks = [] if self._handler is None else self._handler.callbacks
        out: list[MetricSink] = []
        for cb in callbacks:
            if isinstance(cb, TensorBoardCallback) and cb.tb_writer is not None:
                out.append(TensorBoardSink(cb.tb_writer, image_tag=f"train/{self.prefix}"))
            elif isinstance(cb, WandbCallback | MLflowCallback) and cb._initialized:
                sink = self._run_sink(cb)
                if sink is not None:
                    out.append(sink)
        return out

    def _run_sink(self, callback: Any) -> MetricSink | None:
        """The image sink of a W&B or MLflow callback's current run (one per run)."""
        if isinstance(callback, WandbCallback):
            run = callback._wandb.run
            key = None if run is None else f"wandb:{id(run)}"
        else:
            active = callback._ml_flow.active_run()
            run = None if active is None else active.info.run_id
            key = None if run is None else f"mlflow:{run}"
        if key is None:
            return None
        if key not in self._run_sinks:
            self._run_sinks[key] = (
                WandbSink(
                    run,
                    step_metric="train/global_step",
                    image_tag=f"train/{self.prefix}",
                    scalars=False,
                )
                if isinstance(callback, WandbCallback)
                else MLflowSink(run, image_tag=self.prefix, scalars=False)
            )
        return self._run_sinks[key]


def _calling_handler(callback: Any) -> Any:
    """The ``CallbackHandler`` up the call stack whose callback list holds ``callback``."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, CallbackHandler) and any(cb is callback for cb in owner.callbacks):
            return owner
        frame = frame.f_back  # type: ignore[assignment]
    return None


__all__ = ["RouterInspectorCallback"]

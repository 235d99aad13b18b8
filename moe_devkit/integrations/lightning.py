"""``RouterInspectorCallback``: the inspector in a Lightning (``lightning.pytorch``) run.

::

    trainer = lightning.pytorch.Trainer(callbacks=[RouterInspectorCallback()])
    trainer.fit(module, train_dataloaders=loader)

- ``on_train_start``: attaches the inspector (a new ``RouterInspector`` unless one is given)
  to the ``LightningModule``'s model (``routed_model``), unless it is attached already.
- Each logging step (every ``log_every_n_steps`` optimizer steps, ``trainer.global_step``):
  logs ``inspector.metrics()`` (the window since the previous logging step, every
  micro-batch of every accumulation step in it) with ``pl_module.log_dict``, so every
  logger of the Trainer gets the keys; writes them to the extra ``sinks``; runs
  ``inspector.check_alarms(on_alarm)``.
- ``on_train_end``: writes the report to ``report_dir`` (default
  ``<trainer.log_dir>/moe_devkit_report``), closes the sinks and detaches the inspector if
  it attached it (also when ``fit`` ends in an exception, without a report).

The keys are logged from ``on_train_batch_end`` exactly when Lightning writes that batch's
logged values to its loggers (right after the hook returns), with ``on_step=True,
on_epoch=False``: each key once per logging step, never averaged over an epoch nor
carried over to another step. Lightning writes them at its own step for that write
(``trainer.global_step - 1`` with automatic optimization: the window of optimizer steps 1 to
5 is at step 4, beside the module's own ``self.log`` values); the sinks and the TensorBoard
images use the same step. Under DDP every rank records, and only the global zero process
(``trainer.is_global_zero``) reads metrics, logs them (``rank_zero_only=True``), raises
alarms and writes the report.

Importing this module imports lightning; without it, a one-line ``ModuleNotFoundError``
names ``pip install "moe-devkit[lightning]"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moe_devkit.inspect.discovery import find_probes
from moe_devkit.inspect.inspector import RouterInspector
from moe_devkit.inspect.live import OnAlarm
from moe_devkit.integrations._loop import ImageCadence
from moe_devkit.integrations.sinks import MetricSink, TensorBoardSink

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.utilities.types import STEP_OUTPUT
except ModuleNotFoundError as err:
    if not (err.name or "lightning").startswith("lightning"):
        raise
    raise ModuleNotFoundError(
        'RouterInspectorCallback needs lightning: pip install "moe-devkit[lightning]"'
    ) from None

REPORT_FOLDER = "moe_devkit_report"


class RouterInspectorCallback(pl.Callback):
    """Logs the inspector's live metrics and alarms through a ``lightning.pytorch.Trainer``.

    Args:
        inspector: the inspector to use (default: a new ``RouterInspector()``).
        report_dir: where ``on_train_end`` writes the report (default:
            ``<trainer.log_dir>/moe_devkit_report``: the first logger's version folder, or
            ``default_root_dir`` without a logger).
        on_alarm: ``"warn"``, ``"raise"`` or a callable, passed to ``check_alarms``.
        prefix: the prefix of every metric key.
        images_every: every this many optimizer steps (at a logging step), the sinks and the
            Trainer's ``TensorBoardLogger`` get the utilization heatmap and the k histogram
            (default: never).
        sinks: sinks written besides the Trainer's loggers (for instance a
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
        self.inspector = inspector
        self.report_dir = None if report_dir is None else Path(report_dir)
        self.on_alarm = on_alarm
        self.prefix = prefix
        self.images_every = images_every
        self.sinks = list(sinks)
        self._attached_here = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.inspector is None:
            self.inspector = RouterInspector()
        if not self.inspector.attached:
            self.inspector.attach(routed_model(pl_module))
            self._attached_here = True
        if trainer.is_global_zero and self.inspector.layers:
            self.inspector.metrics(prefix=self.prefix)  # the first window starts here

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.inspector is None or not trainer.is_global_zero or not _writes_logs_now(trainer):
            return
        metrics = self.inspector.metrics(prefix=self.prefix)
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step the loggers record
        if trainer.loggers:
            pl_module.log_dict(
                # float64 on the host: exact for MLflow, W&B and CSV, no device copy
                {key: torch.tensor(value, dtype=torch.float64) for key, value in metrics.items()},
                on_step=True,
                on_epoch=False,
                prog_bar=False,
                logger=True,
                batch_size=1,  # a window, not a batch: nothing for Lightning to infer
                sync_dist=False,
                rank_zero_only=True,  # only the global zero process logs them
            )
        for sink in self.sinks:
            sink.log(metrics, step)
        if self._images.due(trainer.global_step):
            summary = self.inspector.summary()
            for sink in [*self.sinks, *self._logger_tensorboards(trainer)]:
                sink.log_images(summary, step)
            self._images.written(trainer.global_step)
        self.inspector.check_alarms(on_alarm=self.on_alarm)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.inspector is None:
            return
        # trainer.log_dir is a broadcast: every rank asks for it
        out = self.report_dir or Path(trainer.log_dir or trainer.default_root_dir) / REPORT_FOLDER
        if trainer.is_global_zero:
            self.inspector.report(out)
        self._finish()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._finish()

    def _finish(self) -> None:
        for sink in self.sinks:
            sink.close()
        if self._attached_here and self.inspector is not None:
            self.inspector.detach()
            self._attached_here = False

    def _logger_tensorboards(self, trainer: pl.Trainer) -> list[MetricSink]:
        """The writers of the Trainer's ``TensorBoardLogger``s, as sinks whose image tags sit
        beside the scalars (``<prefix>utilization``, ``<prefix>k``)."""
        return [
            TensorBoardSink(logger.experiment, image_tag=self.prefix)
            for logger in trainer.loggers
            if isinstance(logger, TensorBoardLogger)
        ]


def routed_model(pl_module: torch.nn.Module) -> torch.nn.Module:
    """What the callback attaches the inspector to: the one child of the LightningModule that
    holds every router (its model, ``self.model = ...``), else the LightningModule itself.

    The inspector reads the aux loss from the outputs of the module it is attached to. The
    LightningModule's own ``forward`` is not the model's: under DDP, FSDP and DeepSpeed
    Lightning redirects it to ``training_step``, whose output (the loss) has no aux loss.
    """
    blocks = {id(probe.site.block) for probe in find_probes(pl_module)}
    holders = [
        child
        for child in pl_module.children()
        if blocks and blocks <= {id(module) for module in child.modules()}
    ]
    return holders[0] if len(holders) == 1 else pl_module


def _writes_logs_now(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this batch's logged values to its loggers right after
    ``on_train_batch_end`` returns: its own test (``_TrainingEpochLoop.advance`` calls
    ``_LoggerConnector.update_train_step_metrics``). Not on a micro-batch that accumulates
    gradients; then when the optimizer step is a multiple of ``log_every_n_steps`` (never if
    it is 0), when the Trainer is stopping, or on every step of ``fast_dev_run``."""
    if trainer.fit_loop._should_accumulate() and trainer.lightning_module.automatic_optimization:
        return False
    fast_dev_run = bool(getattr(trainer, "fast_dev_run", False))
    return trainer._logger_connector.should_update_logs or fast_dev_run


__all__ = ["RouterInspectorCallback"]

"""RouterInspectorCallback in a real lightning.pytorch.Trainer run, read back from its loggers."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("transformers")
pytest.importorskip("tensorboard")

from hf_zoo import ExpertInputs, build_tiny, record_expert_inputs  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from training_support import (  # noqa: E402
    BATCH,
    SEQ,
    TokenIds,
    images_and_histograms,
    same_float32,
    truth_metrics,
    truth_windows,
)

from moe_devkit import MoEModel, RouterConfig  # noqa: E402
from moe_devkit.diagnostics.findings import Finding  # noqa: E402
from moe_devkit.inspect import METRIC_KEYS, RouterInspector, RoutingAlarmError  # noqa: E402
from moe_devkit.integrations.lightning import RouterInspectorCallback  # noqa: E402
from moe_devkit.integrations.sinks import JsonLinesSink  # noqa: E402

LOG_EVERY = 5
KEYS = {f"moe/{key}" for key in METRIC_KEYS}
HIDDEN = 16

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ modules


class CausalLM(pl.LightningModule):  # type: ignore[misc]
    """A tiny transformers MoE in training mode; logs its own loss at every step."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss: torch.Tensor = self.model(**batch).loss
        self.log("train_loss", loss, on_step=True, on_epoch=False, batch_size=BATCH)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class ReferenceMoE(pl.LightningModule):  # type: ignore[misc]
    """moe-devkit's reference MoEModel (dynamic k), trained on its output norm plus aux loss."""

    def __init__(self, layers: int = 2, experts: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = RouterConfig(
            hidden_size=HIDDEN, num_experts=experts, min_k=1, max_k=2, expert_hidden_size=16
        )
        self.model = MoEModel(config, num_layers=layers)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(batch[0])
        loss: torch.Tensor = out.hidden_states.pow(2).mean() + out.aux_loss
        self.log("train_loss", loss, on_step=True, on_epoch=False, batch_size=BATCH)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def routers(self) -> list[torch.nn.Linear]:
        return [layer.moe.router.router_network for layer in self.model.layers]


def hidden_states(n: int) -> torch.utils.data.DataLoader[Any]:
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, SEQ, HIDDEN, generator=gen))
    return torch.utils.data.DataLoader(data, batch_size=BATCH)


# ------------------------------------------------------------------------------ callbacks


class Reference(pl.Callback):  # type: ignore[misc]
    """A second inspector's metrics, read at the same logging steps (independent windows):
    after the batch that makes ``global_step`` a multiple of LOG_EVERY."""

    def __init__(
        self,
        inspector: RouterInspector,
        truth: dict[str, ExpertInputs] | None = None,
        fired: list[list[Finding]] | None = None,
    ) -> None:
        self.inspector = inspector
        self.truth = truth  # what the experts received, by hooks on the experts themselves
        self.fired = fired if fired is not None else []
        self.by_step: dict[int, dict[str, float]] = {}
        self.truth_by_step: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self.fired_by_step: dict[int, list[str]] = {}  # codes delivered at each logging step
        self._seen = 0

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        step = trainer.global_step
        if step == self._seen or step % LOG_EVERY:
            self._seen = step
            return
        self._seen = step
        self.by_step[step] = self.inspector.metrics(prefix="moe/")
        if self.truth is not None:
            self.truth_by_step[step] = {
                path: (layer.counts.numpy().copy(), np.array(layer.k_histogram))
                for path, layer in self.truth.items()
            }
        self.fired_by_step[step] = [f.code for batch in self.fired for f in batch]
        self.fired.clear()


class PlantCollapse(pl.Callback):  # type: ignore[misc]
    """Zeroes the routers' weights before every batch of the optimizer steps in ``spans``
    (start, end]: every token's logits tie, so every token goes to the same experts. Between
    spans the weights saved before the first one come back."""

    def __init__(self, routers: Callable[[], list[torch.nn.Linear]], *spans: range) -> None:
        self.routers = routers
        self.spans = spans
        self.saved: list[torch.Tensor] | None = None
        self.forced = False

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        upcoming = trainer.global_step + 1  # the optimizer step this batch belongs to
        forced = any(upcoming in span for span in self.spans)
        routers = self.routers()
        with torch.no_grad():
            if forced:
                if self.saved is None:
                    self.saved = [r.weight.detach().clone() for r in routers]
                for router in routers:
                    router.weight.zero_()
            elif self.forced and self.saved is not None:
                for router, weight in zip(routers, self.saved, strict=True):
                    router.weight.copy_(weight)
        self.forced = forced


# ------------------------------------------------------------------------------ helpers


def trainer(root: Path, steps: int, callbacks: list[Any], **kw: Any) -> Any:
    kw.setdefault("logger", TensorBoardLogger(str(root), name="tb"))
    kw.setdefault("devices", 1)
    return pl.Trainer(
        default_root_dir=str(root),
        accelerator="cpu",
        max_steps=steps,
        log_every_n_steps=LOG_EVERY,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kw,
    )


def scalar_events(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event of the event files under ``log_dir``, in order: (step, value), so
    a key written twice at a step shows twice."""
    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def csv_rows(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# ------------------------------------------------------------------------------ tests


def test_mixtral_logs_every_key_once_at_every_logging_step(tmp_path: Path) -> None:
    model = build_tiny("mixtral")
    model.config.output_router_logits = True  # the aux loss reaches the loss
    model.train()
    module = CausalLM(model)
    jsonl = tmp_path / "moe.jsonl"
    callback = RouterInspectorCallback(
        on_alarm="raise", images_every=10, sinks=[JsonLinesSink(jsonl)]
    )
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    table = CSVLogger(str(tmp_path), name="csv")
    data = torch.utils.data.DataLoader(
        TokenIds(20 * BATCH, model.config.vocab_size), batch_size=BATCH
    )
    with record_expert_inputs(model) as truth:
        reference = Reference(RouterInspector().attach(module), truth)
        run = trainer(tmp_path, 20, [callback, reference], logger=[tb, table])
        run.fit(module, train_dataloaders=data)
    reference.inspector.detach()

    # Lightning writes the window of optimizer steps 1-5 at its step 4, beside train_loss
    assert sorted(reference.by_step) == [5, 10, 15, 20]
    written = [4, 9, 14, 19]
    at = dict(zip(written, sorted(reference.by_step), strict=True))  # logger step -> global
    events = scalar_events(Path(tb.log_dir))
    assert {tag for tag in events if tag.startswith("moe/")} == KEYS  # all, and only, these
    assert [step for step, _ in events["train_loss"]] == written
    for key in KEYS:
        assert [step for step, _ in events[key]] == written, key  # once per logging step
        for step, value in events[key]:
            assert same_float32(value, reference.by_step[at[step]][key]), (key, step)
    # and to the definitions, recomputed from what the experts themselves received
    truth_by_window = truth_windows(reference.truth_by_step)
    logged = {key: dict(events[key]) for key in KEYS}
    for step in written:
        layers = truth_by_window[at[step]]
        assert len(layers) == model.config.num_hidden_layers
        for key, value in truth_metrics(layers).items():
            assert logged[f"moe/{key}"][step] == pytest.approx(value, rel=1e-6), (key, step)
        assert logged["moe/steps"][step] == LOG_EVERY
        assert logged["moe/tokens"][step] == LOG_EVERY * BATCH * SEQ

    # the CSV logger got them too, in float64, one row per logging step and no epoch row
    rows = [row for row in csv_rows(Path(table.log_dir)) if row["moe/steps"]]
    assert [int(row["step"]) for row in rows] == written
    for row in rows:
        for key in KEYS:
            assert same(float(row[key]), reference.by_step[at[int(row["step"])]][key]), key

    # the extra sink, at the loggers' steps
    lines = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert [line["step"] for line in lines] == written
    for line in lines:
        assert set(line["metrics"]) == KEYS
        for key, value in line["metrics"].items():
            expected = reference.by_step[at[line["step"]]][key]
            assert (value is None and math.isnan(expected)) or value == expected, key

    # every 10 optimizer steps, the heatmap and the k histogram in the logger's event files
    images, histograms = images_and_histograms(Path(tb.log_dir))
    assert images == {"moe/utilization": [9, 19]}
    assert histograms == {"moe/k": [9, 19]}

    # the report, in the first logger's version folder (trainer.log_dir)
    report = Path(tb.log_dir) / "moe_devkit_report" / "report.json"
    assert Path(run.log_dir) == Path(tb.log_dir)
    layers = json.loads(report.read_text())["sections"]["routing"]["layers"]
    assert len(layers) == model.config.num_hidden_layers
    assert callback.inspector is not None and not callback.inspector.attached
    # it was attached to the module's model, so its layers are named as in the model
    gates = [name for name, _ in model.named_modules() if name.endswith(".mlp.gate")]
    assert (
        sorted(callback.inspector.layers) == gates == [f"{block}.gate" for block in sorted(truth)]
    )


def test_a_model_without_aux_loss_alarms_at_the_first_logging_step(tmp_path: Path) -> None:
    """The inspector reads the outputs of the module's model: without output_router_logits
    the Mixtral returns no aux loss, found at the first logging step and not again."""
    model = build_tiny("mixtral").train()
    fired: list[list[Finding]] = []
    callback = RouterInspectorCallback(on_alarm=fired.append)
    data = torch.utils.data.DataLoader(
        TokenIds(15 * BATCH, model.config.vocab_size), batch_size=BATCH
    )
    module = CausalLM(model)
    reference = Reference(RouterInspector().attach(module), fired=fired)
    trainer(tmp_path, 15, [callback, reference]).fit(module, train_dataloaders=data)
    reference.inspector.detach()

    assert reference.fired_by_step == {5: ["aux-loss-missing"], 10: [], 15: []}


def test_reference_model_window_covers_every_micro_batch(tmp_path: Path) -> None:
    """accumulate_grad_batches=2: 20 optimizer steps of 2 micro-batches each."""
    module = ReferenceMoE(layers=3, experts=6)
    callback = RouterInspectorCallback(on_alarm="raise", report_dir=tmp_path / "report")
    reference = Reference(RouterInspector().attach(module))
    run = trainer(tmp_path, 20, [callback, reference], accumulate_grad_batches=2)
    run.fit(module, train_dataloaders=hidden_states(40 * BATCH))
    reference.inspector.detach()

    assert sorted(reference.by_step) == [5, 10, 15, 20]
    written = [4, 9, 14, 19]
    at = dict(zip(written, sorted(reference.by_step), strict=True))
    events = scalar_events(Path(run.logger.log_dir))
    assert {tag for tag in events if tag.startswith("moe/")} == KEYS  # whatever the model size
    assert [step for step, _ in events["train_loss"]] == written
    for key in KEYS:
        assert [step for step, _ in events[key]] == written, key
        for step, value in events[key]:
            assert same_float32(value, reference.by_step[at[step]][key]), (key, step)
    # 5 optimizer steps of 2 micro-batches each: 10 forwards of BATCH x SEQ tokens
    assert [value for _, value in events["moe/steps"]] == [2 * LOG_EVERY] * 4
    assert [value for _, value in events["moe/tokens"]] == [2 * LOG_EVERY * BATCH * SEQ] * 4
    layers = json.loads((tmp_path / "report" / "report.json").read_text())["sections"]
    assert len(layers["routing"]["layers"]) == 3


def test_planted_collapse_raises_at_the_first_logging_step_after_it(tmp_path: Path) -> None:
    module = ReferenceMoE()
    callback = RouterInspectorCallback(on_alarm="raise")
    reference = Reference(RouterInspector().attach(module))
    plant = PlantCollapse(module.routers, range(11, 21))  # from optimizer step 11 on
    run = trainer(tmp_path, 20, [plant, callback, reference])
    with pytest.raises(RoutingAlarmError) as raised:
        run.fit(module, train_dataloaders=hidden_states(20 * BATCH))
    reference.inspector.detach()

    assert run.global_step == 15  # the logging step after the collapse: not before, not at the end
    assert sorted(reference.by_step) == [5, 10]  # it runs after the callback: never saw 15
    collapses = [f for f in raised.value.findings if f.code == "routing-collapse"]
    assert sorted(f.location for f in collapses) == sorted(callback.inspector.layers)
    assert all(f.details["token_share"] == 1.0 for f in collapses)
    assert not callback.inspector.attached  # detached on the exception
    assert not list(tmp_path.rglob("report.json"))  # a fit that raised writes no report


def test_a_callable_gets_each_collapse_once_per_episode(tmp_path: Path) -> None:
    """Collapsed over optimizer steps 11-20 and 26-35, healthy between; no logger at all."""
    module = ReferenceMoE()
    fired: list[list[Finding]] = []
    jsonl = tmp_path / "moe.jsonl"
    callback = RouterInspectorCallback(on_alarm=fired.append, sinks=[JsonLinesSink(jsonl)])
    reference = Reference(RouterInspector().attach(module), fired=fired)
    plant = PlantCollapse(module.routers, range(11, 21), range(26, 36))
    run = trainer(tmp_path, 40, [plant, callback, reference], logger=False)
    run.fit(module, train_dataloaders=hidden_states(40 * BATCH))
    reference.inspector.detach()

    collapse = {
        step: codes.count("routing-collapse") for step, codes in reference.fired_by_step.items()
    }
    layers = len(callback.inspector.layers)
    assert collapse == {5: 0, 10: 0, 15: layers, 20: 0, 25: 0, 30: layers, 35: 0, 40: 0}
    # without a logger the sinks still get every window, at Lightning's steps
    lines = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert [line["step"] for line in lines] == [4, 9, 14, 19, 24, 29, 34, 39]
    for line in lines:
        assert set(line["metrics"]) == KEYS
        for key, value in line["metrics"].items():
            expected = reference.by_step[line["step"] + 1][key]
            assert (value is None and math.isnan(expected)) or value == expected, key
    assert (tmp_path / "moe_devkit_report" / "report.json").is_file()  # default_root_dir


class PerRank(pl.Callback):  # type: ignore[misc]
    """In each process of a DDP run: one thread, a report folder of its own, and at the end
    what its inspector recorded and what its alarms delivered, in ``rank<N>.json``."""

    def __init__(self, root: Path, callback: RouterInspectorCallback) -> None:
        self.root = root
        self.callback = callback
        self.fired: list[list[Finding]] = []

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        torch.set_num_threads(1)
        self.callback.report_dir = self.root / f"report{trainer.global_rank}"
        self.callback.on_alarm = self.fired.append

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        assert self.callback.inspector is not None
        metrics = self.callback.inspector.metrics()  # the window since this rank's last read
        record = {
            "steps": metrics["moe/steps"],
            "tokens": metrics["moe/tokens"],
            "fired": [f.code for batch in self.fired for f in batch],
            "logged": sorted(k for k in trainer.callback_metrics if k.startswith("moe/")),
        }
        (self.root / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_under_ddp_only_the_global_zero_process_logs_alarms_and_reports(tmp_path: Path) -> None:
    """Two CPU processes (gloo): both record their half of the batches; only rank 0 reads
    windows, logs them, gets the planted collapse and writes the report."""
    module = ReferenceMoE()
    callback = RouterInspectorCallback()
    per_rank = PerRank(tmp_path, callback)
    plant = PlantCollapse(module.routers, range(6, 11))
    run = trainer(tmp_path, 10, [per_rank, plant, callback], devices=2, strategy="ddp_spawn")
    run.fit(module, train_dataloaders=hidden_states(2 * 10 * BATCH))

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # rank 0 read its windows at steps 5 and 10: nothing is left after them
    assert ranks[0]["steps"] == 0 and ranks[0]["fired"] == ["routing-collapse"] * 2
    assert ranks[0]["logged"] == sorted(KEYS)
    # rank 1 recorded its 10 batches (one per optimizer step) and read nothing
    assert ranks[1]["steps"] == 10 and ranks[1]["tokens"] == 10 * BATCH * SEQ
    assert ranks[1]["fired"] == [] and ranks[1]["logged"] == []
    assert (tmp_path / "report0" / "report.json").is_file()
    assert not (tmp_path / "report1").exists()
    events = scalar_events(tmp_path / "tb")
    assert [step for step, _ in events["moe/steps"]] == [4, 9]


def test_without_lightning_the_callback_names_the_extra() -> None:
    code = "import sys; sys.modules['lightning'] = None\nimport moe_devkit.integrations.lightning\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last == (
        "ModuleNotFoundError: RouterInspectorCallback needs lightning: "
        'pip install "moe-devkit[lightning]"'
    ), run.stderr


def test_images_every_must_be_positive() -> None:
    for wrong in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="images_every must be a positive integer"):
            RouterInspectorCallback(images_every=wrong)  # type: ignore[arg-type]

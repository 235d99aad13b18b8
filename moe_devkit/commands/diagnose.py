"""``moe-devkit diagnose``: run a model on a workload under the RouterInspector and report.

The model is the built-in reference router (the default), a transformers model directory or a
``pkg.module:factory`` Python path (``--model``; see ``moe_devkit.commands._model_source``).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_devkit.commands._torch import (
    add_device_arguments,
    add_router_arguments,
    device_name,
    require_torch,
    resolve_device,
    resolve_dtype,
    router_config,
    step_progress,
)
from moe_devkit.commands._verdict import print_verdict
from moe_devkit.commands.common import (
    Command,
    UsageError,
    check_output,
    positive_float,
    positive_int,
    writing,
)

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from torch import nn

    from moe_devkit.commands._model_source import LoadedModel, ModelSource
    from moe_devkit.config import RouterConfig
    from moe_devkit.inspect import InspectorConfig
    from moe_devkit.inspect.report import ReportPaths
    from moe_devkit.inspect.summary import InspectorSummary

MODEL_HELP = (
    "the model to run: 'reference' (the built-in reference router, default), a transformers "
    "model directory (config.json, with or without weights), or a Python path "
    "'pkg.module:factory' whose factory() returns a torch.nn.Module"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the options of ``moe-devkit diagnose``."""
    parser.add_argument("--model", default="reference", metavar="SOURCE", help=MODEL_HELP)
    model = add_router_arguments(
        parser, hidden_size=256, num_experts=16, title="reference model (--model reference)"
    )
    model.add_argument("--layers", type=positive_int, default=2)
    work = parser.add_argument_group("workload")
    work.add_argument(
        "--steps", type=positive_int, default=20, help="forward passes (steps with --train)"
    )
    work.add_argument(
        "--batch-size", "--batch", dest="batch", metavar="N", type=positive_int, default=8
    )
    work.add_argument("--seq-len", "--seq", dest="seq", metavar="N", type=positive_int, default=128)
    work.add_argument(
        "--text",
        default=None,
        metavar="FILE",
        help="feed this text, tokenized with the model directory's tokenizer and packed into "
        "batch x seq-len windows (default: random token ids of the model's vocabulary)",
    )
    work.add_argument(
        "--train",
        action="store_true",
        help="take an AdamW step after each forward pass (the model's loss, its router loss "
        "included), so the report shows routing change over training",
    )
    work.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate")
    add_device_arguments(work)
    work.add_argument(
        "--framework",
        choices=("torch", "jax"),
        default="torch",
        help="run the PyTorch or the JAX reference model (same weights for the same seed)",
    )
    parser.add_argument(
        "--out", default="moe_devkit_report", help="directory of report.json/.png/.html"
    )


def run(args: argparse.Namespace, console: Console) -> int:
    """Runs the diagnose command; returns 0, or 1 when an error-level alarm fired."""
    require_torch()
    from moe_devkit.commands._model_source import parse_source
    from moe_devkit.inspect import InspectorConfig

    source = parse_source(getattr(args, "model", "reference"))
    train, text = getattr(args, "train", False), getattr(args, "text", None)
    framework = getattr(args, "framework", "torch")
    if framework == "jax" and (source.kind != "reference" or train):
        what = source.flag if source.kind != "reference" else "--train"
        raise UsageError(f"--framework jax runs the reference model only, untrained; got {what}")
    if source.kind == "reference" and text is not None:
        raise UsageError(
            "--text needs the model's tokenizer, and only a model directory has one; "
            "got --model reference"
        )
    inspector_config = InspectorConfig(window=trend_window(args.steps))
    if source.kind != "reference":
        return _run_source(source, args, inspector_config, console)
    config = router_config(args)
    check_output(args.out, directory=True)
    if framework == "jax":
        from moe_devkit.commands import _diagnose_jax as jax_path

        jax_path.require_jax()
        jax_device = jax_path.resolve_jax_device(args.device)
        summary = jax_path.run_jax(args, config, jax_device, inspector_config, console)
        device = jax_path.jax_device_name(jax_device)
        summary = with_run(summary, reference_run(args, config, None))
        return _finish(summary, args, describe_run(args, device), console)
    torch_device = resolve_device(args.device)
    if train:
        workload = _reference_workload(args, config)
        return _run_workload(workload, args, torch_device, inspector_config, console)
    summary, parameters = _run_torch(args, config, torch_device, inspector_config, console)
    summary = with_run(summary, reference_run(args, config, parameters))
    return _finish(summary, args, describe_run(args, device_name(torch_device)), console)


COMMAND = Command(
    "diagnose",
    "run the reference router or your MoE model on a workload and report its routing",
    add_arguments,
    run,
)


def trend_window(steps: int, points: int = 10) -> int:
    """Steps per trend window so that a run of ``steps`` steps gives ``points`` windows (the
    inspector's minimum window is 2; fewer than 4 steps give no trend)."""
    return max(2, steps // points)


def _run_torch(
    args: argparse.Namespace,
    config: RouterConfig,
    device: torch.device,
    inspector_config: InspectorConfig,
    console: Console,
) -> tuple[InspectorSummary, int]:
    """Runs ``args.steps`` forward passes of the PyTorch reference model under the inspector;
    returns the summary and the model's parameter count."""
    import torch

    from moe_devkit.inspect import RouterInspector
    from moe_devkit.routers.torch_router import MoEModel
    from moe_devkit.workloads import mixed_difficulty_batch

    dtype = resolve_dtype(args.dtype)
    torch.manual_seed(args.seed)
    model = MoEModel(config, num_layers=args.layers).to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(args.seed)
    with (
        torch.no_grad(),
        RouterInspector(model, inspector_config) as inspector,
        step_progress(console, "routing", args.steps) as advance,
    ):
        for _ in range(args.steps):
            batch = mixed_difficulty_batch(
                args.batch, args.seq, config.hidden_size, generator=generator
            )
            model(batch.hidden_states.to(device=device, dtype=dtype))
            advance()
    summary: InspectorSummary = inspector.summary()
    return summary, sum(p.numel() for p in model.parameters())


def _finish(summary: InspectorSummary, args: argparse.Namespace, ran: str, console: Console) -> int:
    """Prints the tables, writes the report files, then what ran and the verdict; 1 when an
    error-level alarm fired."""
    print_summary(console, summary.layers)
    paths = write_report_files(summary, args.out)
    report = f"report: {paths.json}  {paths.png}  {paths.html}"
    console.print(report, highlight=False, soft_wrap=True)  # a log keeps each line whole
    console.print(f"ran: {ran}", highlight=False, markup=False, soft_wrap=True)
    print_verdict(console, summary.findings)
    return 1 if any(f.severity == "error" for f in summary.findings) else 0


def describe_run(args: argparse.Namespace, device: str) -> str:
    """One line naming the reference model, the workload and where it ran."""
    return f"{_reference_words(args)}; {_workload_words(args)}; device {device}; {args.dtype}"


def _reference_words(args: argparse.Namespace) -> str:
    framework = getattr(args, "framework", "torch")
    layers = f"{args.layers} layer{'s' if args.layers != 1 else ''}"
    mode = "complexity" if args.mode == "complexity" else f"top_p {args.top_p}"
    model = f"{layers} x {args.num_experts} experts, hidden {args.hidden_size}"
    return f"{framework} reference model, {model}, k {args.min_k}-{args.max_k} ({mode})"


def _workload_words(args: argparse.Namespace) -> str:
    tokens = args.steps * args.batch * args.seq
    return f"{args.steps} steps x {args.batch} x {args.seq} = {tokens} tokens"


def reference_run(
    args: argparse.Namespace, config: RouterConfig, parameters: int | None
) -> dict[str, Any]:
    """What the report records of a reference run (``routing.config.run``)."""
    return {
        "source": "reference",
        "kind": "reference",
        "class": "MoEModel",
        "config_class": "RouterConfig",
        "parameters": parameters,
        "weights": "random",
        "missing_weights": [],
        "inputs": {
            "kind": "hidden",
            "size": config.hidden_size,
            "rule": "mixed_difficulty_batch",
            "text_tokens": None,
        },
        **_workload_record(args),
    }


def _workload_record(args: argparse.Namespace, losses: list[float] | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "steps": args.steps,
        "batch_size": args.batch,
        "seq_len": args.seq,
        "text": getattr(args, "text", None),
        "seed": args.seed,
        "dtype": args.dtype,
        "train": bool(getattr(args, "train", False)),
    }
    if record["train"]:
        record.update(optimizer="AdamW", lr=args.lr, losses=losses or [])
    return record


def with_run(summary: InspectorSummary, run: dict[str, Any]) -> InspectorSummary:
    """The summary with what was run recorded in its config, as ``config["run"]``."""
    return dataclasses.replace(summary, config={**summary.config, "run": run})


# ----------------------------------------------------------------------------- --model SOURCE


@dataclass
class _Workload:
    """A model, the inputs of each step, its forward call and its training loss."""

    model: nn.Module
    flag: str  # what errors name: --model '...'
    batch_of: Callable[[int], torch.Tensor]
    call: Callable[[nn.Module, torch.Tensor, bool], Any]
    loss: Callable[[Any, torch.Tensor], torch.Tensor]
    record: dict[str, Any]  # the model part of the report's run record
    describe: str  # the model part of the `ran:` line
    inputs: str  # what the inputs are, for the `ran:` line
    notes: tuple[str, ...] = ()  # printed once the model is attached


def _reference_workload(args: argparse.Namespace, config: RouterConfig) -> _Workload:
    import torch

    from moe_devkit.commands._model_source import training_loss
    from moe_devkit.routers.torch_router import MoEModel
    from moe_devkit.workloads import mixed_difficulty_batch

    torch.manual_seed(args.seed)
    model = MoEModel(config, num_layers=args.layers)
    generator = torch.Generator().manual_seed(args.seed)

    def batch_of(_: int) -> torch.Tensor:
        batch = mixed_difficulty_batch(
            args.batch, args.seq, config.hidden_size, generator=generator
        )
        return batch.hidden_states

    return _Workload(
        model=model,
        flag="--model 'reference'",
        batch_of=batch_of,
        call=lambda m, x, _: m(x),
        loss=lambda out, x: training_loss(out, x, lm_head=False),
        record=reference_run(args, config, sum(p.numel() for p in model.parameters())),
        describe=_reference_words(args),
        inputs="mixed-difficulty hidden states",
    )


def _source_workload(loaded: LoadedModel, args: argparse.Namespace) -> _Workload:
    from moe_devkit.commands._model_source import (
        batches,
        call_model,
        text_token_ids,
        training_loss,
    )

    token_ids = text_token_ids(loaded, args.text) if args.text is not None else None
    _check_seq_len(loaded, args.seq)
    inputs = loaded.inputs
    if token_ids is not None:
        need = args.steps * args.batch * args.seq
        repeat = ", repeated" if len(token_ids) < need else ""
        words = f"text {args.text} ({len(token_ids)} tokens{repeat})"
    elif inputs.kind == "tokens":
        words = f"random token ids in [0, {inputs.size}) ({inputs.rule})"
    else:
        words = f"random float inputs [batch, seq, {inputs.size}] ({inputs.rule})"
    lm_head = loaded.lm_head
    weights = {
        "loaded": "weights loaded",
        "random": "random weights from config.json",
        "factory": "built by the factory",
    }[loaded.weights]
    if loaded.missing_weights:
        weights += f", {len(loaded.missing_weights)} missing"
    record = loaded.describe()
    record["inputs"]["text_tokens"] = len(token_ids) if token_ids is not None else None
    return _Workload(
        model=loaded.model,
        flag=loaded.source.flag,
        batch_of=batches(inputs, args.batch, args.seq, args.seed, token_ids),
        call=lambda m, x, train: call_model(m, x, lm_head=lm_head, train=train),
        loss=lambda out, x: training_loss(out, x, lm_head=lm_head),
        record=record,
        describe=(
            f"{loaded.class_name} from {loaded.source.text} ({weights}), "
            f"{loaded.parameters:,} parameters"
        ),
        inputs=words,
        notes=tuple(loaded.notes),
    )


def _check_seq_len(loaded: LoadedModel, seq: int) -> None:
    limit = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and 0 < limit < seq:
        raise UsageError(
            f"--seq-len must be <= the model's max_position_embeddings ({limit}); got {seq}"
        )


def _run_source(
    source: ModelSource,
    args: argparse.Namespace,
    inspector_config: InspectorConfig,
    console: Console,
) -> int:
    """Loads the model of a directory or factory SOURCE and runs it; every check (the
    output directory included) comes before the output directory is created."""
    from moe_devkit.commands._model_source import load_model

    check_output(args.out, directory=True, create=False)
    device = resolve_device(args.device)
    loaded = load_model(source, args.seed)
    workload = _source_workload(loaded, args)
    return _run_workload(workload, args, device, inspector_config, console)


def _run_workload(
    workload: _Workload,
    args: argparse.Namespace,
    device: torch.device,
    inspector_config: InspectorConfig,
    console: Console,
) -> int:
    """Attaches the inspector, runs ``args.steps`` steps (AdamW steps with ``--train``),
    writes the report and prints the verdict. A run that fails removes the folders of
    ``--out`` it created, when they are still empty."""
    from moe_devkit.inspect import RouterInspector

    dtype = resolve_dtype(args.dtype)
    model = workload.model.to(device=device, dtype=dtype)
    model.train(args.train)
    inspector = RouterInspector(config=inspector_config)
    try:
        inspector.attach(model)
    except ValueError as exc:
        config = getattr(model, "config", None)
        of = f" ({type(config).__name__})" if config is not None else ""
        raise UsageError(
            f"{workload.flag}: found no router to record in {type(model).__name__}{of}: "
            f"{' '.join(str(exc).split())}"
        ) from None
    created = _missing_folders(args.out)
    try:
        check_output(args.out, directory=True)
        for note in workload.notes:
            console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
        try:
            losses = _steps(workload, model, args, device, dtype, console)
            summary = inspector.summary()
        finally:
            inspector.detach()
        summary = with_run(summary, {**workload.record, **_workload_record(args, losses)})
        ran = f"{workload.describe}; {workload.inputs}; {_workload_words(args)}"
        if losses:
            ran += f"; trained with AdamW (lr {args.lr:g}), loss {losses[0]:.4g} -> "
            ran += f"{losses[-1]:.4g}"
        ran += f"; device {device_name(device)}; {args.dtype}"
        return _finish(summary, args, ran, console)
    except BaseException:
        _remove_empty(created)
        raise


def _steps(
    workload: _Workload,
    model: nn.Module,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    console: Console,
) -> list[float]:
    """Runs the steps under a progress bar; returns the losses of the training steps. A
    step that raises is a UsageError naming the step and its inputs."""
    import torch

    from moe_devkit.commands._model_source import one_line

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr) if args.train else None
    losses: list[float] = []
    with step_progress(console, "training" if args.train else "routing", args.steps) as advance:
        for step in range(args.steps):
            inputs = workload.batch_of(step).to(device)
            if inputs.is_floating_point():
                inputs = inputs.to(dtype)
            try:
                if optimizer is None:
                    with torch.no_grad():
                        workload.call(model, inputs, False)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    loss = workload.loss(workload.call(model, inputs, True), inputs)
                    loss.backward()  # type: ignore[no-untyped-call]
                    optimizer.step()
                    losses.append(float(loss.detach()))
            except Exception as exc:
                shape = "x".join(str(n) for n in inputs.shape)
                raise UsageError(
                    f"{workload.flag}: step {step + 1} failed on {inputs.dtype} inputs "
                    f"[{shape}]: {one_line(exc)}"
                ) from None
            advance()
    return losses


def _missing_folders(out: str) -> list[Path]:
    """The folders of ``out`` that do not exist yet, deepest first."""
    missing, path = [], Path(out).absolute()
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Removes the folders, deepest first, stopping at the first one that is not empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def write_report_files(summary: InspectorSummary, out: str) -> ReportPaths:
    """Writes the three report files; a path that cannot be written is a UsageError."""
    from moe_devkit.inspect.report import write_report

    with writing(out):
        return write_report(summary, out)


def print_summary(console: Console, layers: dict[str, Any]) -> None:
    """Prints the per-expert utilization and the k histogram of every layer."""
    from rich.markup import escape
    from rich.table import Table

    names = list(layers)
    table = Table(title="Expert utilization (share of token-expert selections)")
    table.add_column("expert", justify="right")
    for name in names:
        table.add_column(escape(name), justify="right")
    for expert in range(max(layers[n]["num_experts"] for n in names)):
        cells = []
        for name in names:
            shares = layers[name]["utilization"]["shares"]
            cells.append(f"{100 * shares[expert]:5.1f}%" if expert < len(shares) else "")
        table.add_row(str(expert), *cells)
    console.print(table)
    _print_k_table(console, layers)


def _print_k_table(console: Console, layers: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="Experts per token (k)")
    table.add_column("k", justify="right")
    for name in layers:
        table.add_column(escape(name), justify="right")
    hists = [layer["k"]["histogram"] for layer in layers.values()]
    for k in range(max(len(h) for h in hists)):
        if all(k >= len(h) or h[k] == 0 for h in hists):
            continue
        cells = [f"{100 * h[k] / max(sum(h), 1):5.1f}%" if k < len(h) else "" for h in hists]
        table.add_row(str(k), *cells)
    table.add_row("mean", *[f"{layer['k']['mean']:.2f}" for layer in layers.values()], style="bold")
    table.add_row(
        "saved", *[f"{100 * layer['k']['compute_saved']:.0f}%" for layer in layers.values()]
    )
    console.print(table)

"""The model ``moe-devkit diagnose --model SOURCE`` runs, and the inputs it feeds it.

SOURCE is one of:

* ``reference``: the built-in reference model (the default; ``diagnose`` builds it itself);
* a directory holding a transformers ``config.json``: the model is built from its weights
  (``*.safetensors`` or ``pytorch_model*.bin``, sharded or not) when there are any, else with
  random weights from the config (seeded by ``--seed``). The class is the one
  ``config.architectures`` names, else the config's causal-LM class, else its
  sequence-to-sequence LM class, else its base model class. transformers is needed only here;
* ``pkg.module:factory``: a Python path; ``factory()`` is called with no arguments, after
  ``torch.manual_seed(--seed)``, and must return a ``torch.nn.Module``. The current directory
  is put first on ``sys.path`` for the import and the call, as ``python -m`` does.

Whatever its source, the model is then moved to ``--device`` and ``--dtype``.

Inputs (``ModelInputs``): token ids when the model has a vocabulary, read in this order:
``model.config.vocab_size``, the module ``model.get_input_embeddings()`` returns (an
``nn.Embedding``), the first ``nn.Embedding`` of the model; the ids are random in
``[0, vocab_size)`` (seeded), or ``--text FILE`` tokenized with the directory's tokenizer and
packed into ``batch x seq-len`` windows. A model without a vocabulary gets float inputs
``[batch, seq-len, hidden]``, where hidden is ``model.config.hidden_size`` (or
``config.d_model``), else the model's ``hidden_size`` attribute, else the ``in_features`` of
its first ``nn.Linear``.

Every mistake in SOURCE or ``--text`` is a ``UsageError`` (one line, exit 2).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeGuard

from moe_devkit.commands.common import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

SourceKind = Literal["reference", "directory", "factory"]
InputKind = Literal["tokens", "hidden"]

REFERENCE = "reference"
HF_INSTALL = 'pip install "moe-devkit[hf]"'
_FACTORY = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class ModelSource:
    """A parsed ``--model`` value."""

    text: str
    kind: SourceKind
    path: Path | None = None  # directory
    module: str | None = None  # factory
    attr: str | None = None  # factory

    @property
    def flag(self) -> str:
        """``--model 'TEXT'``, the prefix of every error about this source."""
        return f"--model {self.text!r}"


def parse_source(text: str) -> ModelSource:
    """Reads ``--model``: ``reference``, an existing directory, or ``pkg.module:factory``.

    Raises:
        UsageError: a path that does not exist or is not a directory, or a string that is
            none of the three forms.
    """
    if text == REFERENCE:
        return ModelSource(text, "reference")
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelSource(text, "directory", path=path)
    match = _FACTORY.match(text)
    if match and not path.exists():
        return ModelSource(text, "factory", module=match.group(1), attr=match.group(2))
    if path.exists():
        raise UsageError(f"--model {text!r}: expected a model directory; got a file")
    if os.sep in text or "/" in text or text.startswith(("~", ".")):
        raise UsageError(f"--model {text!r}: no such directory")
    raise UsageError(
        "--model expects 'reference', a transformers model directory (with config.json) or a "
        f"Python path 'pkg.module:factory'; got {text!r}"
    )


@dataclass(frozen=True)
class ModelInputs:
    """What the model is fed: token ids of a vocabulary, or float hidden states."""

    kind: InputKind
    size: int  # vocab_size for tokens, hidden size for float inputs
    rule: str  # where the size was read, e.g. "config.vocab_size"


@dataclass
class LoadedModel:
    """A model from a directory or a factory, and what the report says about it."""

    source: ModelSource
    model: nn.Module
    weights: Literal["loaded", "random", "factory"]
    inputs: ModelInputs
    config_class: str | None = None
    tokenizer_dir: Path | None = None  # the directory holds a tokenizer
    missing_weights: list[str] = field(default_factory=list)  # not in the checkpoint: random
    lm_head: bool = False  # a transformers LM: called with labels=input_ids to train
    notes: list[str] = field(default_factory=list)

    @property
    def class_name(self) -> str:
        return type(self.model).__name__

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> dict[str, Any]:
        """The run's model, as the report records it."""
        return {
            "source": self.source.text,
            "kind": self.source.kind,
            "class": self.class_name,
            "config_class": self.config_class,
            "parameters": self.parameters,
            "weights": self.weights,
            "missing_weights": self.missing_weights,
            "inputs": {
                "kind": self.inputs.kind,
                "size": self.inputs.size,
                "rule": self.inputs.rule,
            },
        }


def load_model(source: ModelSource, seed: int) -> LoadedModel:
    """Builds the model of a directory or factory source (UsageError on any mistake)."""
    if source.kind == "directory":
        return _load_directory(source, seed)
    if source.kind == "factory":
        return _load_factory(source, seed)
    raise ValueError("the reference model is built by diagnose itself")


# ----------------------------------------------------------------------------- directory


def _require_transformers(source: ModelSource) -> Any:
    if importlib.util.find_spec("transformers") is None:
        raise UsageError(
            f"{source.flag}: a model directory needs transformers, not installed here: "
            f"`{HF_INSTALL}`"
        )
    import transformers

    return transformers


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(exc).strip()
    first = text.splitlines()[0].strip() if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' loading progress bars and warnings off while the model loads."""
    from transformers.utils import logging

    hf_logging: Any = logging
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a model directory (safetensors or PyTorch bins, sharded or not)."""
    found = [*directory.glob("*.safetensors"), *directory.glob("*.safetensors.index.json")]
    for pattern in ("pytorch_model*.bin", "model*.bin", "pytorch_model.bin.index.json"):
        found += directory.glob(pattern)
    return sorted(set(found))


def _load_directory(source: ModelSource, seed: int) -> LoadedModel:
    import torch

    assert source.path is not None
    directory = source.path
    if not (directory / "config.json").is_file():
        raise UsageError(
            f"{source.flag}: no config.json in the directory (expected a transformers model "
            "directory, as save_pretrained writes it)"
        )
    transformers = _require_transformers(source)
    with quiet_transformers():
        try:
            config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
        except Exception as exc:
            raise UsageError(
                f"{source.flag}: config.json cannot be read: {one_line(exc)}"
            ) from None
        cls, lm_head = _model_class(transformers, config, source)
        weights = weight_files(directory)
        torch.manual_seed(seed)
        info: dict[str, Any] = {}
        try:
            if weights:
                model, info = cls.from_pretrained(
                    directory, config=config, local_files_only=True, output_loading_info=True
                )
            else:
                model = cls(config)
        except Exception as exc:
            what = "its weights cannot be loaded" if weights else "the model cannot be built"
            raise UsageError(f"{source.flag}: {what} ({cls.__name__}): {one_line(exc)}") from None
    loaded = LoadedModel(
        source=source,
        model=model,
        weights="loaded" if weights else "random",
        inputs=model_inputs(model, source),
        config_class=type(config).__name__,
        lm_head=lm_head,
        missing_weights=sorted(info.get("missing_keys", ())),
    )
    _loading_notes(loaded, info)
    if not weights:
        loaded.notes.append(
            f"{directory} has no weights (*.safetensors, pytorch_model*.bin): random weights "
            f"from config.json (seed {seed})"
        )
    if any((directory / name).is_file() for name in _TOKENIZER_FILES):
        loaded.tokenizer_dir = directory  # loaded only when --text asks for it
    return loaded


def _loading_notes(loaded: LoadedModel, info: dict[str, Any]) -> None:
    """Notes on what from_pretrained did not load: weights the checkpoint lacks (left at
    random values), weights it holds that the model has no place for, and shape mismatches."""
    kinds = (
        ("missing_keys", "weight", "missing from the checkpoint, left random"),
        ("mismatched_keys", "weight", "of another shape in the checkpoint, left random"),
        ("unexpected_keys", "checkpoint weight", "the model has no place for, ignored"),
    )
    for key, noun, words in kinds:
        names = sorted(str(n[0] if isinstance(n, tuple) else n) for n in info.get(key, ()))
        if names:
            more = f" (+{len(names) - 4} more)" if len(names) > 4 else ""
            plural = "s" if len(names) != 1 else ""
            loaded.notes.append(
                f"{len(names)} {noun}{plural} {words}: {', '.join(names[:4])}{more}"
            )


def _model_class(transformers: Any, config: Any, source: ModelSource) -> tuple[type[Any], bool]:
    """The class ``config.architectures`` names, else the causal-LM, seq2seq-LM or base class
    of the config; and whether it is an LM (trained on labels = input ids)."""
    from transformers.models.auto import modeling_auto

    lm_names = {
        *modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values(),
        *modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values(),
    }
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls, name in lm_names
    autos = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModel")
    for auto in autos:
        mapping = getattr(transformers, auto)._model_mapping
        if type(config) in mapping:
            cls = mapping[type(config)]
            return cls, auto != "AutoModel"
    raise UsageError(
        f"{source.flag}: transformers has no model class for {type(config).__name__} "
        f"(model_type {getattr(config, 'model_type', None)!r}) in {', '.join(autos)}"
    )


# ----------------------------------------------------------------------------- factory


def _load_factory(source: ModelSource, seed: int) -> LoadedModel:
    import torch
    from torch import nn

    assert source.module is not None and source.attr is not None
    with _cwd_on_path():
        factory = _import_factory(source)
        if not callable(factory):
            raise UsageError(
                f"{source.flag}: {source.module}.{source.attr} is not callable "
                f"(got {type(factory).__name__})"
            )
        torch.manual_seed(seed)
        try:
            model = factory()
        except Exception as exc:
            raise UsageError(
                f"{source.flag}: {source.module}.{source.attr}() raised {one_line(exc)}"
            ) from None
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"{source.flag}: {source.module}.{source.attr}() must return a torch.nn.Module; "
            f"got {type(model).__name__}"
        )
    config = getattr(model, "config", None)
    return LoadedModel(
        source=source,
        model=model,
        weights="factory",
        inputs=model_inputs(model, source),
        config_class=type(config).__name__ if config is not None else None,
        lm_head=_is_transformers_lm(model),
    )


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """The current directory first on ``sys.path`` (as ``python -m`` puts it), unless it is
    there already."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def _import_factory(source: ModelSource) -> Any:
    assert source.module is not None and source.attr is not None
    try:
        module = importlib.import_module(source.module)
    except Exception as exc:
        raise UsageError(f"{source.flag}: cannot import {source.module}: {one_line(exc)}") from None
    value: Any = module
    for part in source.attr.split("."):
        if not hasattr(value, part):
            raise UsageError(
                f"{source.flag}: module {source.module} has no attribute {source.attr!r}"
            )
        value = getattr(value, part)
    return value


def _is_transformers_lm(model: nn.Module) -> bool:
    """A transformers causal or seq2seq LM (read without importing transformers)."""
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return False
    from transformers.models.auto import modeling_auto

    names = {
        *modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values(),
        *modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values(),
    }
    return type(model).__name__ in names


# ----------------------------------------------------------------------------- inputs


def model_inputs(model: nn.Module, source: ModelSource) -> ModelInputs:
    """Token ids when the model has a vocabulary, else float hidden states (module docstring).

    Raises:
        UsageError: neither a vocabulary nor a hidden size can be read from the model.
    """
    from torch import nn

    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if _positive_int(vocab):
        return ModelInputs("tokens", vocab, "config.vocab_size")
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        with contextlib.suppress(Exception):
            embedding = get_embeddings()
            if isinstance(embedding, nn.Embedding):
                return ModelInputs("tokens", embedding.num_embeddings, "get_input_embeddings()")
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            return ModelInputs("tokens", module.num_embeddings, f"nn.Embedding {name}")
    for key in ("hidden_size", "d_model"):
        if _positive_int(value := getattr(config, key, None)):
            return ModelInputs("hidden", value, f"config.{key}")
    if _positive_int(value := getattr(model, "hidden_size", None)):
        return ModelInputs("hidden", value, "hidden_size")
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            return ModelInputs("hidden", module.in_features, f"nn.Linear {name}")
    raise UsageError(
        f"{source.flag}: cannot tell what to feed {type(model).__name__}: it has no "
        "config.vocab_size, nn.Embedding, config.hidden_size, hidden_size attribute or "
        "nn.Linear to read an input size from"
    )


def _positive_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_text(path: str) -> str:
    """The text of ``--text FILE`` (UsageError when missing, unreadable or empty)."""
    file = Path(path)
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "no such file"
        raise UsageError(f"--text {path!r}: {what}")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--text {path!r} cannot be read as UTF-8 text: {one_line(exc)}") from None
    if not text.strip():
        raise UsageError(f"--text {path!r} is empty")
    return text


def text_token_ids(loaded: LoadedModel, path: str) -> list[int]:
    """``--text FILE`` tokenized with the directory's tokenizer (UsageError when there is
    none, it fails, yields no token, or yields ids outside the model's vocabulary)."""
    source = loaded.source
    text = read_text(path)
    if loaded.tokenizer_dir is None:
        where = "its directory has" if source.kind == "directory" else "only a model directory has"
        raise UsageError(
            f"--text needs the model's tokenizer, and {where} none "
            f"({', '.join(_TOKENIZER_FILES)}); got {source.flag}"
        )
    if loaded.inputs.kind != "tokens":
        raise UsageError(f"--text: {source.flag} takes float inputs, not token ids")
    import transformers

    with quiet_transformers():
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                loaded.tokenizer_dir, local_files_only=True
            )
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        except Exception as exc:
            raise UsageError(
                f"{source.flag}: its tokenizer cannot tokenize --text {path!r}: {one_line(exc)}"
            ) from None
    if not ids:
        raise UsageError(f"--text {path!r}: the tokenizer gives no token for its text")
    vocab = loaded.inputs.size
    if max(ids) >= vocab:
        raise UsageError(
            f"--text {path!r}: the tokenizer gives token id {max(ids)}, outside the model's "
            f"vocabulary of {vocab} ({loaded.inputs.rule})"
        )
    return ids


def batches(
    inputs: ModelInputs, batch: int, seq: int, seed: int, token_ids: list[int] | None = None
) -> Callable[[int], torch.Tensor]:
    """``batch_of(step)``: the step's [batch, seq] int64 token ids or [batch, seq, hidden]
    float32 inputs, on the CPU. Text ids are packed end to end into windows of ``seq``
    tokens, the stream starting over when it runs out; random inputs come from a generator
    seeded with ``seed``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    if token_ids is not None:
        stream = torch.tensor(token_ids, dtype=torch.long)
        per_step = batch * seq

        def from_text(step: int) -> torch.Tensor:
            positions = torch.arange(step * per_step, (step + 1) * per_step) % stream.numel()
            return stream[positions].view(batch, seq)

        return from_text
    if inputs.kind == "tokens":
        return lambda _: torch.randint(0, inputs.size, (batch, seq), generator=generator)
    return lambda _: torch.randn(batch, seq, inputs.size, generator=generator)


# ----------------------------------------------------------------------------- forward, loss


def forward_kwargs(model: nn.Module, *, train: bool) -> dict[str, bool]:
    """Keyword arguments a transformers model's forward takes beside its inputs:
    ``use_cache=False``, and when training ``output_router_logits=True`` (so the model's own
    router loss is part of its loss)."""
    try:
        names = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}
    kwargs: dict[str, bool] = {}
    if "use_cache" in names:
        kwargs["use_cache"] = False
    if train and "output_router_logits" in names:
        kwargs["output_router_logits"] = True
    return kwargs


def call_model(model: nn.Module, inputs: torch.Tensor, *, lm_head: bool, train: bool) -> Any:
    """One forward pass. A transformers model gets ``input_ids``, and when training an LM
    ``labels`` = the inputs; an encoder-decoder also gets ``decoder_input_ids``: the inputs
    shifted right by one behind its decoder start token (0 when its config names none).
    Any other module is called with the tensor alone."""
    import torch

    if not is_transformers_model(model):
        return model(inputs)
    kwargs: dict[str, Any] = {"input_ids": inputs, **forward_kwargs(model, train=train)}
    config = getattr(model, "config", None)
    if train and lm_head:
        kwargs["labels"] = inputs
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None)
        start = start if isinstance(start, int) else 0
        first = torch.full_like(inputs[:, :1], start)
        kwargs["decoder_input_ids"] = torch.cat([first, inputs[:, :-1]], dim=1)
    return model(**kwargs)


def training_loss(output: Any, inputs: torch.Tensor, *, lm_head: bool) -> torch.Tensor:
    """The loss a ``--train`` step minimises.

    A transformers LM: its own loss on labels = the inputs, which holds its router
    (auxiliary) loss when it computes one. Any other model: the next-token cross-entropy of
    its logits when it takes token ids and returns [batch, seq, vocab] logits, else the mean
    square of its first float output; plus its ``aux_loss`` when it returns one.
    """
    import torch

    loss = _field(output, "loss")
    if lm_head and isinstance(loss, torch.Tensor):
        return loss
    main = _first_float_tensor(output)
    if main is None:
        raise TypeError(f"the model returned no float tensor to train on ({type(output).__name__})")
    if inputs.dtype == torch.long and main.dim() == 3 and main.shape[:2] == inputs.shape:
        logits = main[:, :-1].float()
        value = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), inputs[:, 1:].reshape(-1)
        )
    else:
        value = main.float().square().mean()
    aux = _field(output, "aux_loss")
    if isinstance(aux, torch.Tensor) and aux.numel() == 1:
        value = value + aux.float().reshape(())
    return value


def _field(output: Any, name: str) -> Any:
    if isinstance(output, dict):
        return output.get(name)
    return getattr(output, name, None)


def _first_float_tensor(output: Any) -> torch.Tensor | None:
    import torch

    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    for name in ("logits", "last_hidden_state", "hidden_states"):
        value = _field(output, name)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    values = output.values() if isinstance(output, dict) else output
    if isinstance(values, tuple | list) or isinstance(output, dict):
        for value in values:
            found = _first_float_tensor(value)
            if found is not None:
                return found
    return None


def is_transformers_model(model: nn.Module) -> bool:
    """An instance of transformers' PreTrainedModel (read without importing transformers)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)

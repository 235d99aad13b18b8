"""Routing traces: the experts each token was sent to in each MoE layer, recorded from a
model, saved as ``.npz`` and compared between two runs of the same model.

``RoutingTraceRecorder(model, max_tokens=..., weights=...)`` finds the routers as the
``RouterInspector`` does (``discovery.find_probes``) and hooks the model's own call to read
the token ids, the attention mask and the positions of each call. A recorded call issues no
device op: its hooks keep references to the call's tensors (input ids, mask, position
tensor, each router's selected experts and weights) with their version counters, and each
call takes the next rows of a chunk by a host counter (a call's shape is known there).
Every few calls the held tensors are concatenated on the device, one ``torch.cat`` per
dtype and shape, and from time to time copied off it (from CUDA, a non-blocking copy into
pinned host memory followed by an event); ``trace()`` copies the rest and waits for the
copies: the only wait for the device. Sequence numbers and positions are computed on the
host then, and pad tokens (attention mask 0) dropped. A tensor modified in place after its
call is detected by its version counter and copied at each call from then on. At most
``max_tokens`` token positions of the calls are kept, padding included; a call that does
not fit keeps its first rows.

``RoutingTrace.save(path)`` writes an uncompressed-name ``.npz`` (numpy only) with:

* ``expert_ids`` int32 [T, L, K]: the experts of each token in each layer, -1 padded (a
  layer that did not run for a token is all -1);
* ``weights`` float32 [T, L, K] (only when recorded): the routing weights of those experts;
* ``token_ids`` int64 [T]: the input token ids, -1 where the model got embeddings;
* ``positions`` int64 [T]: the position in the sequence, counted over its non-pad tokens;
* ``sequence`` int64 [T]: which sequence, numbered in call order (a row of a batch is one;
  a call given the KV cache object of the previous call, or an attention mask longer than
  its input, continues the previous call's sequences: a step of ``generate``);
* ``header``: a JSON string with ``format``, ``version``, ``layers`` (the L layer names),
  ``num_experts`` (per layer) and ``metadata``.

``compare_traces(a, b)`` aligns two traces by (sequence, position), checks that the token
ids agree where both are known, and measures per layer how often the expert sets differ.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import warnings
import weakref
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from moe_devkit.diagnostics.findings import Finding
from moe_devkit.inspect.adapters import Scoring, decision_from_router_outputs
from moe_devkit.inspect.discovery import Probe, find_probes
from moe_devkit.inspect.inspector import in_backward_recompute
from moe_devkit.inspect.records import RouterSite, Selection
from moe_devkit.reporting import make_report, report_json_text, write_atomic, write_atomic_set
from moe_devkit.routers.torch_router import RoutingDecision

TRACE_FORMAT = "moe-devkit-routing-trace"
TRACE_VERSION = 1
SECTION = "routing_comparison"
_ARRAYS = ("expert_ids", "token_ids", "positions", "sequence")

Array = npt.NDArray[Any]


# ----------------------------------------------------------------------------- the trace


@dataclass
class RoutingTrace:
    """T recorded tokens of L MoE layers (see the module docstring for the layout)."""

    expert_ids: Array
    token_ids: Array
    positions: Array
    sequence: Array
    layers: list[str]
    num_experts: list[int]
    weights: Array | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tokens = self.expert_ids.shape[0] if self.expert_ids.ndim == 3 else -1
        if self.expert_ids.ndim != 3 or self.expert_ids.shape[1] != len(self.layers):
            raise ValueError(
                f"expert_ids must be [T, L, K] with L={len(self.layers)} layers; "
                f"got shape {self.expert_ids.shape}"
            )
        if len(self.num_experts) != len(self.layers):
            raise ValueError(
                f"num_experts must have one entry per layer ({len(self.layers)}); "
                f"got {len(self.num_experts)}"
            )
        for name in ("token_ids", "positions", "sequence"):
            value = getattr(self, name)
            if value.shape != (tokens,):
                raise ValueError(f"{name} must be [T] with T={tokens}; got shape {value.shape}")
        if self.weights is not None and self.weights.shape != self.expert_ids.shape:
            raise ValueError(
                f"weights must have the shape of expert_ids {self.expert_ids.shape}; "
                f"got {self.weights.shape}"
            )

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    def save(self, path: str | Path) -> Path:
        """Writes the trace as ``.npz`` (atomically: a failure leaves no half-written file)."""
        header = {
            "format": TRACE_FORMAT,
            "version": TRACE_VERSION,
            "layers": self.layers,
            "num_experts": self.num_experts,
            "metadata": self.metadata,
        }
        arrays: dict[str, Array] = {
            "expert_ids": self.expert_ids.astype(np.int32),
            "token_ids": self.token_ids.astype(np.int64),
            "positions": self.positions.astype(np.int64),
            "sequence": self.sequence.astype(np.int64),
            "header": np.array(json.dumps(header)),
        }
        if self.weights is not None:
            arrays["weights"] = self.weights.astype(np.float32)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        return write_atomic(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        """Reads a trace written by ``save``.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not a routing trace (not an .npz, a missing array or
                header, another format or a newer version, inconsistent shapes).
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                if not isinstance(data, np.lib.npyio.NpzFile):
                    raise ValueError("a .npy array, not an .npz archive")
                arrays = {name: data[name] for name in data.files}
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise ValueError(f"{path}: not an .npz routing trace ({exc})") from None
        except ValueError as exc:
            raise ValueError(f"{path}: not an .npz routing trace ({exc})") from None
        missing = [name for name in (*_ARRAYS, "header") if name not in arrays]
        if missing:
            raise ValueError(f"{path}: not a routing trace: no {', '.join(missing)} array")
        try:
            header = json.loads(str(arrays["header"]))
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("format") != TRACE_FORMAT:
            raise ValueError(f"{path}: not a routing trace (expected format {TRACE_FORMAT!r})")
        version = header.get("version")
        if not isinstance(version, int) or version > TRACE_VERSION:
            raise ValueError(
                f"{path}: trace version must be <= {TRACE_VERSION}; got version={version!r}"
            )
        try:
            return cls(
                expert_ids=arrays["expert_ids"].astype(np.int32),
                token_ids=arrays["token_ids"].astype(np.int64),
                positions=arrays["positions"].astype(np.int64),
                sequence=arrays["sequence"].astype(np.int64),
                layers=[str(name) for name in header.get("layers", [])],
                num_experts=[int(e) for e in header.get("num_experts", [])],
                weights=arrays["weights"].astype(np.float32) if "weights" in arrays else None,
                metadata=dict(header.get("metadata") or {}),
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a valid routing trace: {exc}") from None


# ----------------------------------------------------------------------------- recording


def _mask_of(mask: Any, batch: int, length: int) -> bool:
    """Whether ``mask`` is a [batch, >= length] attention mask."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return False
    return mask.shape[0] == batch and mask.shape[1] >= length


def _no_cache() -> Any:
    return None


def _cache_of(kwargs: dict[str, Any]) -> Any:
    """The KV cache object a call gets (None without one)."""
    for name in ("past_key_values", "cache"):
        value = kwargs.get(name)
        if value is not None and not isinstance(value, torch.Tensor | bool):
            return value
    return None


def _reference(value: Any) -> Callable[[], Any]:
    """A weak reference to ``value`` where it allows one (a cache is not kept alive)."""
    try:
        return weakref.ref(value)
    except TypeError:
        return lambda: None


class NumberedCall(NamedTuple):
    """One model call as ``CallNumbering`` reads it."""

    ids: torch.Tensor | None  # int[batch, length], None for a call given embeddings
    batch: int
    length: int
    device: torch.device
    mask: torch.Tensor | None  # the attention mask, None when absent or not [batch, >= length]
    first: int  # the sequence number of the call's first row


class CallNumbering:
    """Numbers the sequences of successive model calls, as traces record them.

    Each row of a call's batch is a new sequence, numbered in call order, unless the call
    continues the previous call's sequences (a step of ``generate``): its attention mask is
    longer than its input, or it gets the KV cache object the previous call got (both read
    on the host: a cache's length may live on the device). ``RoutingTraceRecorder`` and
    ``RoutingReplay`` number calls with it, so a replay finds a recorded token by (sequence,
    position).
    """

    def __init__(self) -> None:
        self._next_sequence = 0
        self._last_rows: tuple[int, int] | None = None  # (first sequence, batch) of last call
        self._last_cache: Callable[[], Any] = _no_cache

    def number(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> NumberedCall | None:
        """The call's shape, mask and first sequence number (None: no token input found)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.dim() in (1, 2):
            ids = ids if ids.dim() == 2 else ids.unsqueeze(0)
            batch, length = ids.shape
            device = ids.device
        else:
            embeds = kwargs.get("inputs_embeds", kwargs.get("hidden_states", ids))
            if not isinstance(embeds, torch.Tensor) or embeds.dim() < 2:
                return None
            ids = None
            shape = embeds.shape[:-1]
            batch = shape[0] if len(shape) == 2 else 1
            length = math.prod(shape) // max(batch, 1)
            device = embeds.device
        mask = kwargs.get("attention_mask")
        if not _mask_of(mask, batch, length):
            mask = None
        cache = _cache_of(kwargs)
        continuation = mask is not None and mask.shape[1] > length
        continuation |= cache is not None and self._last_cache() is cache
        self._last_cache = _reference(cache) if cache is not None else _no_cache
        if continuation and self._last_rows is not None and self._last_rows[1] == batch:
            first = self._last_rows[0]
        else:
            first = self._next_sequence
            self._next_sequence += batch
        self._last_rows = (first, batch)
        return NumberedCall(ids, batch, length, device, mask, first)


class _Held(NamedTuple):
    """A tensor the recorder holds until its next copy: a reference to the model's own tensor
    (``version``: its version counter when it was taken), or the recorder's private copy
    (``version`` -1: nothing else can modify it)."""

    tensor: torch.Tensor
    version: int

    def modified(self) -> bool:
        return self.version >= 0 and self.tensor._version != self.version


@dataclass
class _Call:
    """One recorded model call, held until it is copied: its metadata and its tensors."""

    rows: int  # rows kept (its first ones)
    tokens: int  # tokens of the call (batch x length)
    batch: int
    length: int
    first: int  # the sequence number of its first row
    ids: _Held | None  # int [batch, length]; None for a call given embeddings
    mask: _Held | None  # the attention mask [batch, >= length]; None without one
    positions: _Held | None  # position_ids / cache_position (no mask); None: 0, 1, 2, ...
    copy: bool  # made while compiling or capturing a CUDA graph: its tensors copied at once
    layers: dict[str, tuple[_Held, _Held | None]] = field(default_factory=dict)


# The columns of a flush's call table (one row a call, ints): the call's metadata, then
# where each held tensor went, as (group, start, size) along its group's concatenated
# dimension (group -1: not held), then per layer of the flush the same for its experts and
# weights, its rows held and its K. A mask wider than its call (a step of ``generate``) is
# copied as its last ``length`` columns and its row sums (``_MASK_SUMS``).
_ROWS, _BATCH, _LENGTH, _FIRST, _DROPPED = 0, 1, 2, 3, 4
_IDS, _MASK, _MASK_SUMS, _POSITIONS = 5, 8, 11, 14
_CALL_COLUMNS = 17
_INDICES, _WEIGHTS, _KEPT, _K = 0, 3, 6, 7
_LAYER_COLUMNS = 8


def _host_array(tensor: torch.Tensor) -> Array:
    """``tensor`` (on the host) as a numpy array; bfloat16, which numpy lacks, as float32."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def _token_rows(values: Array, batch: int, length: int, rows: int) -> Array:
    """The first ``rows`` of ``values`` (broadcastable to [batch, length]) in row order."""
    return np.broadcast_to(values, (batch, length)).reshape(-1)[:rows]


class _Staged(NamedTuple):
    """A batch of held calls concatenated on their device, waiting for the copy to the host:
    one tensor a group (``keys``: the dtype, device and shape that make a group; ``dims``:
    the dimension it was concatenated along) and the batch's call table."""

    groups: list[torch.Tensor]
    keys: list[tuple[Any, ...]]
    dims: list[int]
    table: Array
    layers: list[str]
    widths: dict[str, int]


class _Part(NamedTuple):
    """A staged batch within a chunk: its call table and, per group of the batch, the
    chunk's group that holds it and its offset there."""

    table: Array
    layers: list[str]
    widths: dict[str, int]
    remap: list[tuple[int, int]]


class _Chunk:
    """A copy to the host of some staged batches: host tensors, one per group (dtype, shape)
    of them all, the events after which the copies from a CUDA device are complete, and each
    batch's table of ints saying where its calls' tensors are (a few objects a batch,
    whatever its number of calls). ``arrays()`` cuts them back into the calls' rows."""

    def __init__(
        self,
        groups: list[torch.Tensor],
        dims: list[int],
        parts: list[_Part],
        events: list[torch.cuda.Event],
    ) -> None:
        self._groups: list[torch.Tensor] | None = groups
        self._dims = dims
        self._parts = parts
        self._events = events
        self._arrays: dict[str, Array] = {}

    def arrays(self) -> dict[str, Array]:
        """The rows as numpy arrays without the pads (waits for the copies the first time):
        ``token_ids``, ``positions``, ``sequence`` [n] and per layer of the chunk
        ``ids:{layer}`` int32 [n, K] (-1 where the layer did not run) and, with weights,
        ``weights:{layer}`` float32 [n, K]."""
        if self._groups is not None:
            for event in self._events:
                event.synchronize()
            groups = [_host_array(group) for group in self._groups]
            cut = [self._cut(groups, part) for part in self._parts]
            self._arrays = _join_cuts(cut)
            self._groups, self._events, self._parts = None, [], []
        return self._arrays

    def _piece(
        self, groups: list[Array], remap: list[tuple[int, int]], row: list[int], at: int
    ) -> Array | None:
        group, start, size = row[at : at + 3]
        if group < 0:
            return None
        group, offset = remap[group]
        values = groups[group]
        index = [slice(None)] * values.ndim
        index[self._dims[group]] = slice(offset + start, offset + start + size)
        return values[tuple(index)]

    def _cut(self, groups: list[Array], part: _Part) -> dict[str, Array]:
        table: list[list[int]] = part.table.tolist()
        remap = part.remap
        total = sum(row[_ROWS] for row in table)
        valid = np.ones(total, dtype=bool)
        token_ids = np.full(total, -1, dtype=np.int64)
        positions = np.zeros(total, dtype=np.int64)
        sequence = np.zeros(total, dtype=np.int64)
        ids = {name: np.full((total, part.widths[name]), -1, np.int32) for name in part.layers}
        weights: dict[str, Array] = {}
        offset = 0
        for row in table:
            rows, batch, length, first = row[_ROWS], row[_BATCH], row[_LENGTH], row[_FIRST]
            cut = slice(offset, offset + rows)
            offset += rows
            sequence[cut] = np.repeat(np.arange(first, first + batch), length)[:rows]
            if row[_DROPPED]:
                valid[cut] = False
                continue
            values = self._piece(groups, remap, row, _IDS)
            if values is not None:
                token_ids[cut] = _token_rows(values.reshape(batch, length), batch, length, rows)
            mask = self._piece(groups, remap, row, _MASK)
            sums = self._piece(groups, remap, row, _MASK_SUMS)
            source = self._piece(groups, remap, row, _POSITIONS)
            if mask is not None:  # positions counted over the non-pad tokens
                tail = mask[:, mask.shape[1] - length :]
                valid[cut] = _token_rows(tail != 0, batch, length, rows)
                counted = np.cumsum(tail.astype(np.int64), axis=1) - 1
                if sums is not None:  # the mask's columns before its last ones: their sum
                    counted += (sums - tail.astype(np.int64).sum(axis=1))[:, None]
                else:
                    counted += (
                        mask[:, : mask.shape[1] - length].astype(np.int64).sum(axis=1)[:, None]
                    )
                positions[cut] = _token_rows(counted, batch, length, rows)
            elif source is not None:
                counted = source.astype(np.int64).reshape(-1, length)
                positions[cut] = _token_rows(counted, batch, length, rows)
            else:
                positions[cut] = _token_rows(np.arange(length), batch, length, rows)
            for j, name in enumerate(part.layers):
                base = _CALL_COLUMNS + j * _LAYER_COLUMNS
                selected = self._piece(groups, remap, row, base + _INDICES)
                if selected is None:
                    continue
                kept, k, width = row[base + _KEPT], row[base + _K], part.widths[name]
                selected = selected.reshape(kept, k)[:rows, :width]
                ids[name][cut, : selected.shape[1]] = selected
                scores = self._piece(groups, remap, row, base + _WEIGHTS)
                if scores is not None:
                    if name not in weights:
                        weights[name] = np.zeros((total, width), np.float32)
                    scores = scores.reshape(kept, k)[:rows, :width]
                    weights[name][cut, : scores.shape[1]] = scores
        arrays: dict[str, Array] = {
            "token_ids": token_ids[valid],
            "positions": positions[valid],
            "sequence": sequence[valid],
        }
        arrays.update({f"ids:{name}": values[valid] for name, values in ids.items()})
        arrays.update({f"weights:{name}": values[valid] for name, values in weights.items()})
        return arrays


def _join_cuts(cuts: list[dict[str, Array]]) -> dict[str, Array]:
    """The rows of several batches, one after the other (a layer missing from a batch: -1
    experts and 0 weights in its rows)."""
    if len(cuts) == 1:
        return cuts[0]
    names = list(dict.fromkeys(name for cut in cuts for name in cut))
    joined: dict[str, Array] = {}
    for name in names:
        parts = []
        for cut in cuts:
            part = cut.get(name)
            if part is None:
                n = len(cut["token_ids"])
                width = next(c[name].shape[1] for c in cuts if name in c)
                fill, dtype = (-1, np.int32) if name.startswith("ids:") else (0.0, np.float32)
                part = np.full((n, width), fill, dtype=dtype)
            parts.append(part)
        joined[name] = np.concatenate(parts)
    return joined


class RoutingTraceRecorder:
    """Records a ``RoutingTrace`` of every forward of ``model`` while attached.

    ``with RoutingTraceRecorder(model, max_tokens=4096, weights=True) as rec: model(...)``,
    then ``rec.trace()``. It finds the same routers as ``RouterInspector`` and can be
    attached beside one.

    A recorded call issues no aten op (weights that require grad are detached: one op a
    layer): its hooks keep references to the call's input ids, attention mask and position
    tensor and to each router's selected experts (and weights). Every ``batch_calls`` calls
    the held tensors are concatenated on their device, one ``torch.cat`` per dtype and shape
    of all the calls and layers, which releases the model's tensors; once the recorder holds
    ``max_held_bytes`` (references and those copies), at a full chunk, a full budget,
    ``trace()`` and ``detach()``, they are copied to the host, joined again by dtype and
    shape (from CUDA without waiting: into pinned memory, followed by an event; ``trace()``
    is the only wait). Sequence numbers, and positions without a mask or a position tensor,
    follow from each call's shape: they are computed on the host by ``trace()``.

    A held tensor modified in place before its copy would record what the model did not
    route, so each tensor's version counter is read when it is held and compared before it
    is copied. The first call of each layer (and the first call's inputs) is copied at once
    and its tensors are checked at the next call: a layer whose outputs were modified in
    place (or inputs that were) is copied at each call from then on, with a warning. A
    change found only when a batch is copied cannot be undone: the layer's rows of that
    call stay -1 (inputs: the call is left out), counted in ``modified``, with a warning.
    Tensors with no version counter (made under ``torch.inference_mode``), and calls made
    while compiling or capturing a CUDA graph, are copied at once.

    Args:
        model: the model; its own forward is hooked to read ``input_ids`` (or
            ``inputs_embeds``), ``attention_mask`` and ``position_ids``.
        max_tokens: the token budget: at most this many token positions are kept, padding
            included (pads take a row until the trace is read). The first call that finds
            the budget full removes the hooks on the routers.
        weights: also record the routing weights (detached: they join no autograd graph).
        chunk_tokens: the rows of a chunk (default: ``max_tokens``): a call that does not
            fit in the current chunk starts the next one, after what the recorder holds is
            copied to the host.
            A call of more tokens than a chunk keeps its first ``chunk_tokens``.
        metadata: JSON-serialisable values stored in the trace (a model name, a revision).
        every: record one model call in ``every`` (the first, then every ``every``-th; the
            sequence numbers count the calls left out too, so two traces taken with the same
            ``every`` on the same inputs align).
        batch_calls: the most recorded calls held by reference before they are copied on
            their device (the model's input and router output tensors stay alive until
            then).
        max_held_bytes: the device memory the recorder keeps before copying to the host
            (references and device copies; ``device_bytes`` is the most it kept).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_tokens: int = 65536,
        weights: bool = False,
        chunk_tokens: int | None = None,
        every: int = 1,
        metadata: Mapping[str, Any] | None = None,
        batch_calls: int = 16,
        max_held_bytes: int = 64 * 2**20,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1; got max_tokens={max_tokens!r}")
        chunk = max_tokens if chunk_tokens is None else chunk_tokens
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk_tokens must be an int >= 1; got chunk_tokens={chunk!r}")
        for name, value in (("batch_calls", batch_calls), ("max_held_bytes", max_held_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {name}={value!r}")
        self.model = model
        self.max_tokens = max_tokens
        self.chunk_tokens = min(chunk, max_tokens)
        self.record_weights = weights
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1; got every={every!r}")
        self.metadata = dict(metadata or {})
        self.every = every
        self.batch_calls = batch_calls
        self.max_held_bytes = max_held_bytes
        self.calls = 0  # model calls seen while attached (recorded or not)
        self.probes: list[Probe] = []
        self.skipped: dict[str, int] = {}  # decisions whose token count was not the call's
        self.modified: dict[str, int] = {}  # calls whose held tensors changed before a copy
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._router_handles: list[torch.utils.hooks.RemovableHandle] = []  # of the probes
        self._order: dict[str, int] = {}
        self._num_experts: dict[str, int] = {}
        self._widths: dict[str, int] = {}  # K of each layer's first call
        self._pending: list[_Call] = []  # recorded calls held until the next flush
        self._held_bytes = 0
        self._staged: list[_Staged] = []  # batches concatenated on the device, not yet copied
        self._staged_bytes = 0
        self._peak_bytes = 0
        self._copied: set[str] = set()  # layers ("" for the inputs) copied at each call
        # per layer ("" for the inputs) seen: its first call's tensors and their versions,
        # until they are checked at its next call
        self._watched: dict[str, list[tuple[torch.Tensor, int]]] = {}
        self._warned: set[str] = set()
        self._chunks: list[_Chunk] = []
        self._cursor = 0  # rows of the current chunk taken
        self._flushed = 0  # rows of earlier chunks (the budget counts both)
        self._call: _Call | None = None
        self._numbering = CallNumbering()

    # ------------------------------------------------------------------ attach / detach

    def attach(self) -> RoutingTraceRecorder:
        """Hooks the model and every router found in it; returns self.

        Raises:
            ValueError: no router found, or already attached.
        """
        if self._handles:
            raise ValueError("the recorder is already attached; call detach() first")
        probes = find_probes(self.model)
        if not probes:
            raise ValueError(f"found no MoE router in {type(self.model).__name__}")
        self.probes = probes
        for i, probe in enumerate(probes):
            self._order.setdefault(probe.site.layer, i)
            self._router_handles += probe.install(self._emit, self._emit_raw)
        self._handles += self._router_handles
        self._handles.append(
            self.model.register_forward_pre_hook(self._begin_call, with_kwargs=True)
        )
        self._handles.append(self.model.register_forward_hook(self._end_call, always_call=True))
        return self

    def detach(self) -> None:
        """Removes the hooks and copies the held calls (releasing the model's tensors); what
        was recorded is kept."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._router_handles.clear()
        self._call = None
        self._watched.clear()  # a later attach watches its first calls again
        self._materialise()
        self._offload()

    def __enter__(self) -> RoutingTraceRecorder:
        return self.attach()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.detach()

    @property
    def rows_used(self) -> int:
        """Token positions taken from the budget so far (padding included)."""
        return self._flushed + self._cursor

    @property
    def device_bytes(self) -> int:
        """The most bytes of device tensors the recorder has kept alive at once before their
        copy to the host: the model's tensors it references and its own copies of them on
        the device; bounded by about ``max_held_bytes`` (a single call may hold more)."""
        return self._peak_bytes

    # ------------------------------------------------------------------ hooks

    def _begin_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if in_backward_recompute():
            return
        self._call = None
        numbered = self._numbering.number(args, kwargs)
        if numbered is None:
            return
        ids, batch, length, device, mask, first = numbered
        tokens = batch * length
        self.calls += 1
        if (self.calls - 1) % self.every:
            return

        if self._cursor and self._cursor + tokens > self.chunk_tokens:
            self._flush()
        rows = min(tokens, self.chunk_tokens - self._cursor, self.max_tokens - self.rows_used)
        if rows <= 0:
            if self.rows_used >= self.max_tokens:
                # Nothing more will be recorded: the routers' hooks, which build each
                # layer's decision, are let go (the model's own hooks still count calls).
                for handle in self._router_handles:
                    handle.remove()
                self._router_handles.clear()
            return
        positions = self._position_source(kwargs, batch, length) if mask is None else None
        inputs = [t for t in (ids, mask, positions) if t is not None]
        unsafe = torch.compiler.is_compiling() or (
            device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        )
        copy = self._must_copy("", inputs, unsafe)
        call = _Call(
            rows,
            tokens,
            batch,
            length,
            first,
            None if ids is None else self._hold(ids, copy),
            None if mask is None else self._hold(mask, copy),
            None if positions is None else self._hold(positions, copy),
            unsafe,
        )
        self._pending.append(call)
        self._cursor += rows
        self._call = call

    @staticmethod
    def _positions(
        kwargs: dict[str, Any],
        mask: torch.Tensor | None,
        batch: int,
        length: int,
        device: torch.device,
    ) -> torch.Tensor:
        """The call's positions, [batch x length] (also read by ``replay``)."""
        rows = RoutingTraceRecorder._position_rows(kwargs, mask, batch, length, device)
        return rows.expand(batch, length).reshape(-1)

    @staticmethod
    def _position_rows(
        kwargs: dict[str, Any],
        mask: torch.Tensor | None,
        batch: int,
        length: int,
        device: torch.device,
    ) -> torch.Tensor:
        """The call's positions, broadcastable to [batch, length] (computed on the device;
        the recorder computes the same on the host from what it holds)."""
        if mask is not None:  # counted over the non-pad tokens: left padding moves nothing
            counted = mask.to(device=device, dtype=torch.int64).cumsum(1) - 1
            return counted[:, mask.shape[1] - length :]
        source = RoutingTraceRecorder._position_source(kwargs, batch, length)
        if source is not None:
            return source.to(device=device, dtype=torch.int64).reshape(-1, length)
        return torch.arange(length, device=device)

    @staticmethod
    def _position_source(kwargs: dict[str, Any], batch: int, length: int) -> torch.Tensor | None:
        """The tensor a call without a mask takes its positions from: ``position_ids`` ([batch
        x length] or [length] values) or ``cache_position`` ([length]); None: 0, 1, 2, ..."""
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, torch.Tensor) and position_ids.numel() in (
            length,
            batch * length,
        ):
            return position_ids
        cache_position = kwargs.get("cache_position")
        if isinstance(cache_position, torch.Tensor) and cache_position.numel() == length:
            return cache_position
        return None

    def _end_call(self, module: nn.Module, args: Any, output: Any) -> None:
        self._call = None
        if not self._pending:
            return
        if self.rows_used >= self.max_tokens or (
            self._held_bytes + self._staged_bytes >= self.max_held_bytes
        ):  # nothing more to record, or the memory bound: to the host
            self._materialise()
            self._offload()
        elif len(self._pending) >= self.batch_calls:
            self._materialise()

    def _emit(
        self, site: RouterSite, decision: RoutingDecision, selection: Selection | None = None
    ) -> None:
        call = self._call
        if call is None or in_backward_recompute():
            return
        if decision.num_tokens != call.tokens:
            self.skipped[site.layer] = self.skipped.get(site.layer, 0) + 1
            return
        weights = decision.expert_weights if self.record_weights else None
        self._write_layer(site.layer, call, decision.expert_indices, weights, decision.num_experts)

    def _emit_raw(
        self,
        site: RouterSite,
        logits: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor | None,
        scoring: Scoring,
    ) -> None:
        """A router's own outputs (a transformers top-k router): its experts and weights are
        held as they are, with no decision built (the weights of -1 slots are zeroed on the
        host, as a decision's are)."""
        call = self._call
        if call is None or in_backward_recompute():
            return
        num_experts = logits.shape[-1]
        if self.record_weights and weights is None:  # the weights follow from the logits
            decision = decision_from_router_outputs(logits, indices, scoring=scoring)
            self._emit(site, decision)
            return
        tokens = logits.numel() // max(num_experts, 1)
        if tokens != call.tokens or indices.numel() % max(tokens, 1):
            self.skipped[site.layer] = self.skipped.get(site.layer, 0) + 1
            return
        self._write_layer(site.layer, call, indices, weights, num_experts)

    def _write_layer(
        self,
        layer: str,
        call: _Call,
        indices: torch.Tensor,
        weights: torch.Tensor | None,
        num_experts: int,
    ) -> None:
        """Holds the call's ``indices`` (``tokens x K`` values in token order) and
        ``weights``, when recorded, until the next flush."""
        if layer not in self._num_experts:
            self._num_experts[layer] = num_experts
            self._widths[layer] = indices.numel() // max(call.tokens, 1)
        if not self.record_weights:
            weights = None
        elif weights is not None and weights.requires_grad:  # joins no autograd graph
            weights = weights.detach()
        tensors = [indices] if weights is None else [indices, weights]
        copy = self._must_copy(layer, tensors, call.copy)
        held = None if weights is None else self._hold(weights, copy)
        call.layers[layer] = (self._hold(indices, copy), held)

    # ------------------------------------------------------------------ held tensors

    def _must_copy(self, key: str, tensors: list[torch.Tensor], unsafe: bool) -> bool:
        """Whether the tensors of ``key`` (a layer; "" for the inputs) are copied now rather
        than held by reference: at its first call (its tensors are then watched until its
        next call), once they were seen modified in place, for tensors no version counter
        tracks, and while ``unsafe`` (compiling, capturing a CUDA graph)."""
        if key in self._copied:
            return True
        for tensor in tensors:
            if tensor.is_inference():
                return True
        watched = self._watched.get(key)
        if watched is None:
            self._watched[key] = [(t, t._version) for t in tensors]
            return True
        if watched:
            self._watched[key] = []
            if any(t._version != version for t, version in watched):
                self._refuse(key, lost=False)
                return True
        return unsafe

    def _hold(self, tensor: torch.Tensor, copy: bool) -> _Held:
        if tensor.dim() == 0:
            tensor = tensor.reshape(1)
        held = _Held(tensor.clone(), -1) if copy else _Held(tensor, tensor._version)
        self._held_bytes += tensor.numel() * tensor.element_size()
        if self._held_bytes + self._staged_bytes > self._peak_bytes:
            self._peak_bytes = self._held_bytes + self._staged_bytes
        return held

    def _refuse(self, key: str, *, lost: bool) -> None:
        """``key``'s tensors were modified in place after the call: copied at each call from
        now on (``lost``: a held call's were, so they could not be recorded)."""
        self._copied.add(key)
        self._watched.pop(key, None)
        name = key or "inputs"
        if lost:
            self.modified[name] = self.modified.get(name, 0) + 1
        if key in self._warned:
            return
        self._warned.add(key)
        what = f"layer {key!r}: the router's outputs" if key else "the model's inputs"
        warnings.warn(
            f"RoutingTraceRecorder: {what} were modified in place after the call that "
            "produced them; "
            + (
                "a call held before its copy could not be recorded ("
                + ("its rows are -1 in this layer" if key else "it is left out of the trace")
                + ", counted in recorder.modified); "
                if lost
                else ""
            )
            + "they are copied at each call from now on",
            RuntimeWarning,
            stacklevel=3,
        )

    def _materialise(self) -> None:
        """Copies the held calls on their device, releasing the model's tensors: they are
        concatenated by kind (one ``torch.cat`` per dtype and shape of all calls and layers)
        and staged until ``_offload``. A call's rows beyond the ones it keeps are left out,
        and a mask wider than its call (a step of ``generate``) is cut to its last columns
        and its row sums (two ops); a held tensor modified in place since its call is
        refused."""
        pending, self._pending = self._pending, []
        self._held_bytes = 0
        if not pending:
            return
        tensors: list[list[torch.Tensor]] = []
        dims: list[int] = []
        sizes: list[int] = []
        groups: dict[tuple[Any, ...], int] = {}

        def place(row: list[int], at: int, tensor: torch.Tensor, dim: int) -> None:
            """Adds ``tensor`` to its group (concatenated along ``dim``, 0 or -1) and writes
            where it went into ``row[at : at + 3]``."""
            shape = tensor.shape
            axis = 0 if dim == 0 else len(shape) - 1
            key = (axis, tensor.device, tensor.dtype, shape[1:] if axis == 0 else shape[:-1])
            group = groups.get(key)
            if group is None:
                group = groups[key] = len(tensors)
                tensors.append([])
                dims.append(axis)
                sizes.append(0)
            row[at], row[at + 1], row[at + 2] = group, sizes[group], shape[axis]
            sizes[group] += shape[axis]
            tensors[group].append(tensor)

        layers: dict[str, int] = {}
        for call in pending:
            for layer in call.layers:
                layers.setdefault(layer, len(layers))
        table: list[list[int]] = []
        for call in pending:
            row = [-1] * (_CALL_COLUMNS + _LAYER_COLUMNS * len(layers))
            inputs = (call.ids, call.mask, call.positions)
            dropped = any(held is not None and held.modified() for held in inputs)
            row[_ROWS : _DROPPED + 1] = call.rows, call.batch, call.length, call.first, dropped
            table.append(row)
            if dropped:
                self._refuse("", lost=True)
                continue
            if call.ids is not None:
                place(row, _IDS, call.ids.tensor, -1)
            if call.positions is not None:
                place(row, _POSITIONS, call.positions.tensor, -1)
            if call.mask is not None:
                mask, width = call.mask.tensor, call.mask.tensor.shape[1]
                if width > call.length:  # its last columns, and the row sums of all
                    place(row, _MASK_SUMS, mask.sum(1, dtype=torch.int64), -1)
                    mask = mask.narrow(1, width - call.length, call.length)
                place(row, _MASK, mask, -1)
            for layer, (indices, weights) in call.layers.items():
                if indices.modified() or (weights is not None and weights.modified()):
                    self._refuse(layer, lost=True)
                    continue
                base = _CALL_COLUMNS + layers[layer] * _LAYER_COLUMNS
                kept, k = call.tokens, indices.tensor.numel() // max(call.tokens, 1)
                parts = [indices.tensor] if weights is None else [indices.tensor, weights.tensor]
                if call.rows < call.tokens:  # only its first rows are copied
                    kept = call.rows
                    parts = [t.reshape(call.tokens, k).narrow(0, 0, kept) for t in parts]
                for part, at in zip(parts, (_INDICES, _WEIGHTS), strict=False):
                    place(row, base + at, part, 0)
                row[base + _KEPT], row[base + _K] = kept, k
        joined = [torch.cat(group, dim=dim) for group, dim in zip(tensors, dims, strict=True)]
        staged = _Staged(
            joined,
            list(groups),
            dims,
            np.array(table, dtype=np.int64),
            list(layers),
            {name: self._widths[name] for name in layers},
        )
        self._staged.append(staged)
        self._staged_bytes += sum(t.numel() * t.element_size() for t in joined)
        self._peak_bytes = max(self._peak_bytes, self._staged_bytes)

    def _offload(self) -> None:
        """Copies the staged batches to the host: one tensor per group (dtype, shape) of them
        all, concatenated where several batches have one (from CUDA, a non-blocking copy into
        pinned host memory followed by an event on the stream: nothing waits for the device
        until ``trace()``)."""
        staged, self._staged = self._staged, []
        self._staged_bytes = 0
        if not staged:
            return
        merged: dict[tuple[Any, ...], int] = {}
        tensors: list[list[torch.Tensor]] = []
        dims: list[int] = []
        sizes: list[int] = []
        parts: list[_Part] = []
        for batch in staged:
            remap = []
            for tensor, key, dim in zip(batch.groups, batch.keys, batch.dims, strict=True):
                group = merged.get(key)
                if group is None:
                    group = merged[key] = len(tensors)
                    tensors.append([])
                    dims.append(dim)
                    sizes.append(0)
                remap.append((group, sizes[group]))
                sizes[group] += tensor.shape[dim]
                tensors[group].append(tensor)
            parts.append(_Part(batch.table, batch.layers, batch.widths, remap))
        host: list[torch.Tensor] = []
        events: dict[torch.device, torch.cuda.Event] = {}
        for members, dim in zip(tensors, dims, strict=True):
            joined = members[0] if len(members) == 1 else torch.cat(members, dim=dim)
            if joined.is_cuda:
                copy = torch.empty(joined.shape, dtype=joined.dtype, pin_memory=True)
                copy.copy_(joined, non_blocking=True)
                if joined.device not in events:
                    events[joined.device] = torch.cuda.Event()  # type: ignore[no-untyped-call]
                host.append(copy)
            else:  # the recorder's own copy already (on the CPU)
                host.append(joined if joined.device.type == "cpu" else joined.to("cpu"))
        for device, event in events.items():
            event.record(torch.cuda.current_stream(device))
        self._chunks.append(_Chunk(host, dims, parts, list(events.values())))

    def _flush(self) -> None:
        """Ends the chunk: copies the held calls to the host (``_materialise``, ``_offload``)
        and starts the next chunk at row 0."""
        self._materialise()
        self._offload()
        self._flushed += self._cursor
        self._cursor = 0

    def trace(self) -> RoutingTrace:
        """What was recorded so far: copies the held calls off the device, then waits for
        the copies of every flush (the only wait for the device)."""
        self._flush()
        chunks = [chunk.arrays() for chunk in self._chunks]
        layers = sorted(self._num_experts, key=lambda name: self._order.get(name, len(self._order)))
        width = max((self._widths[name] for name in layers), default=1)
        tokens = sum(len(c["token_ids"]) for c in chunks)
        expert_ids = np.full((tokens, len(layers), width), -1, dtype=np.int32)
        weights = np.zeros(expert_ids.shape, np.float32) if self.record_weights else None
        offset = 0
        for chunk in chunks:
            n = len(chunk["token_ids"])
            for j, layer in enumerate(layers):
                part = chunk.get(f"ids:{layer}")
                if part is not None:
                    expert_ids[offset : offset + n, j, : part.shape[1]] = part
                values = chunk.get(f"weights:{layer}")
                if weights is not None and values is not None:
                    weights[offset : offset + n, j, : values.shape[1]] = values
            offset += n
        if weights is not None:
            weights[expert_ids < 0] = 0.0  # an empty slot weighs nothing

        def joined(name: str) -> Array:
            parts = [c[name] for c in chunks]
            return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

        return RoutingTrace(
            expert_ids=expert_ids,
            token_ids=joined("token_ids"),
            positions=joined("positions"),
            sequence=joined("sequence"),
            layers=layers,
            num_experts=[self._num_experts[name] for name in layers],
            weights=weights,
            metadata=dict(self.metadata),
        )


# ----------------------------------------------------------------------------- comparison


@dataclass
class LayerComparison:
    """How one layer's routing differs between two traces, over the aligned tokens.

    Attributes:
        set_differs: fraction of tokens whose expert set differs.
        jaccard: mean Jaccard index of the two expert sets (1 where both are empty).
        top1_flip: fraction whose top-1 expert differs (the highest-weight expert when a
            trace has weights, else its first listed expert).
        k_abs_diff: mean |k_a - k_b|; k_differs: fraction with different k.
        weight_abs_error: mean |w_a - w_b| over the (token, expert) pairs both selected
            (None without weights in both traces, or without a shared pair).
    """

    layer: str
    num_experts: int
    set_differs: float
    jaccard: float
    top1_flip: float
    k_abs_diff: float
    k_differs: float
    weight_abs_error: float | None


@dataclass
class TraceComparison:
    """``compare_traces``' result.

    ``differs`` is bool [N, L]: the expert set of aligned token n differs in layer l;
    ``positions`` [N] the tokens' positions (for the heatmap).
    """

    tokens_compared: int
    tokens_only_a: int
    tokens_only_b: int
    layers: list[LayerComparison]
    any_layer_differs: float
    layers_only_a: list[str]
    layers_only_b: list[str]
    differs: Array
    positions: Array

    @property
    def identical(self) -> bool:
        return self.any_layer_differs == 0.0 and all(
            layer.weight_abs_error in (None, 0.0) for layer in self.layers
        )

    def layers_over(self, tolerance: float = 0.0) -> list[LayerComparison]:
        """The shared layers whose expert set differs for more than ``tolerance`` (a
        fraction of the aligned tokens, 0 to 1) of the tokens."""
        _check_tolerance(tolerance)
        return [layer for layer in self.layers if layer.set_differs > tolerance]

    def findings(self, tolerance: float = 0.0) -> list[Finding]:
        """One ``routing-differs`` error per layer of ``layers_over(tolerance)``."""
        return [
            Finding(
                code="routing-differs",
                severity="error",
                message=(
                    f"{layer.layer}: the expert set differs for {layer.set_differs:.2%} of "
                    f"{self.tokens_compared} aligned tokens (tolerance {tolerance:.2%}; "
                    f"top-1 flips {layer.top1_flip:.2%})"
                ),
                location=layer.layer,
                details={
                    "set_differs": layer.set_differs,
                    "top1_flip": layer.top1_flip,
                    "jaccard": layer.jaccard,
                    "tolerance": tolerance,
                    "tokens_compared": self.tokens_compared,
                },
            )
            for layer in self.layers_over(tolerance)
        ]

    def to_section(self) -> dict[str, Any]:
        """The JSON section ``routing_comparison``."""
        return {
            "tokens_compared": self.tokens_compared,
            "tokens_only_a": self.tokens_only_a,
            "tokens_only_b": self.tokens_only_b,
            "any_layer_differs": self.any_layer_differs,
            "identical": self.identical,
            "layers_only_a": self.layers_only_a,
            "layers_only_b": self.layers_only_b,
            "layers": [vars(layer).copy() for layer in self.layers],
        }


def _check_tolerance(tolerance: float) -> None:
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, int | float)
        or not 0.0 <= tolerance <= 1.0
    ):
        raise ValueError(f"tolerance must be a fraction in [0, 1]; got tolerance={tolerance!r}")


def _keys(trace: RoutingTrace, name: str) -> Array:
    keys = np.stack([trace.sequence, trace.positions], axis=1)
    unique, counts = np.unique(keys, axis=0, return_counts=True)
    if keys.shape[0] and counts.max() > 1:
        s, p = unique[int(np.argmax(counts))]
        raise ValueError(f"trace {name} holds position {p} of sequence {s} more than once")
    return keys


def _one_hot(ids: Array, num_experts: int) -> Array:
    rows = np.arange(ids.shape[0])[:, None]
    cols = np.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    hot = np.zeros((ids.shape[0], num_experts + 1), dtype=bool)
    hot[rows, cols] = True
    return hot[:, :num_experts]


def _dense(ids: Array, weights: Array, num_experts: int) -> Array:
    dense = np.zeros((ids.shape[0], num_experts + 1), dtype=np.float64)
    cols = np.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    np.add.at(dense, (np.arange(ids.shape[0])[:, None], cols), weights)
    return dense[:, :num_experts]


def _top1(ids: Array, weights: Array | None) -> Array:
    if ids.shape[1] == 0:
        return np.full(ids.shape[0], -1)
    if weights is None:
        return ids[:, 0]
    scored = np.where(ids >= 0, weights, -np.inf)
    return np.take_along_axis(ids, np.argmax(scored, axis=1)[:, None], axis=1)[:, 0]


def compare_traces(a: RoutingTrace, b: RoutingTrace) -> TraceComparison:
    """Compares the routing of two traces token by token, layer by layer.

    Tokens are aligned by (sequence, position); layers by name.

    Raises:
        ValueError: the traces share no layer or no token, a shared layer has a different
            number of experts, a trace holds a position twice, or the token ids differ
            where both are known (the traces were not recorded on the same inputs).
    """
    shared = [name for name in a.layers if name in b.layers]
    if not shared:
        raise ValueError(f"the traces share no layer: A has {a.layers}, B has {b.layers}")
    keys_a, keys_b = _keys(a, "A"), _keys(b, "B")
    width = max(int(keys_a[:, 1].max(initial=0)), int(keys_b[:, 1].max(initial=0))) + 1
    flat_a = keys_a[:, 0] * width + keys_a[:, 1]
    flat_b = keys_b[:, 0] * width + keys_b[:, 1]
    _, ia, ib = np.intersect1d(flat_a, flat_b, assume_unique=True, return_indices=True)
    if ia.size == 0:
        raise ValueError(
            f"the traces share no (sequence, position): A has {a.num_tokens} tokens, "
            f"B has {b.num_tokens}"
        )
    tok_a, tok_b = a.token_ids[ia], b.token_ids[ib]
    wrong = np.nonzero((tok_a >= 0) & (tok_b >= 0) & (tok_a != tok_b))[0]
    if wrong.size:
        s, p = keys_a[ia[wrong[0]]]
        raise ValueError(
            f"the traces are not of the same inputs: {wrong.size} aligned tokens have "
            f"different token ids, the first at sequence {s}, position {p} "
            f"({tok_a[wrong[0]]} in A, {tok_b[wrong[0]]} in B)"
        )
    results: list[LayerComparison] = []
    differs = np.zeros((ia.size, len(shared)), dtype=bool)
    for j, name in enumerate(shared):
        la, lb = a.layers.index(name), b.layers.index(name)
        experts_a, experts_b = a.num_experts[la], b.num_experts[lb]
        if experts_a != experts_b:
            raise ValueError(f"layer {name!r} has {experts_a} experts in A and {experts_b} in B")
        ids_a, ids_b = a.expert_ids[ia, la], b.expert_ids[ib, lb]
        w_a = a.weights[ia, la] if a.weights is not None else None
        w_b = b.weights[ib, lb] if b.weights is not None else None
        hot_a, hot_b = _one_hot(ids_a, experts_a), _one_hot(ids_b, experts_b)
        differs[:, j] = (hot_a != hot_b).any(axis=1)
        inter = (hot_a & hot_b).sum(axis=1)
        union = (hot_a | hot_b).sum(axis=1)
        jaccard = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        k_a, k_b = hot_a.sum(axis=1), hot_b.sum(axis=1)
        error: float | None = None
        if w_a is not None and w_b is not None:
            both = hot_a & hot_b
            if both.any():
                gap = np.abs(_dense(ids_a, w_a, experts_a) - _dense(ids_b, w_b, experts_b))
                error = float(gap[both].mean())
        results.append(
            LayerComparison(
                layer=name,
                num_experts=experts_a,
                set_differs=float(differs[:, j].mean()),
                jaccard=float(jaccard.mean()),
                top1_flip=float((_top1(ids_a, w_a) != _top1(ids_b, w_b)).mean()),
                k_abs_diff=float(np.abs(k_a - k_b).mean()),
                k_differs=float((k_a != k_b).mean()),
                weight_abs_error=error,
            )
        )
    return TraceComparison(
        tokens_compared=int(ia.size),
        tokens_only_a=int(a.num_tokens - ia.size),
        tokens_only_b=int(b.num_tokens - ib.size),
        layers=results,
        any_layer_differs=float(differs.any(axis=1).mean()),
        layers_only_a=[name for name in a.layers if name not in b.layers],
        layers_only_b=[name for name in b.layers if name not in a.layers],
        differs=differs,
        positions=keys_a[ia, 1],
    )


# ----------------------------------------------------------------------------- report


def disagreement_by_position(comparison: TraceComparison, max_columns: int = 256) -> Array:
    """float [L, C]: the fraction of tokens whose expert set differs, per layer and
    position (positions binned into at most ``max_columns`` columns); NaN where no token."""
    positions = comparison.positions
    columns = int(positions.max(initial=0)) + 1
    bins = min(columns, max_columns)
    column = (positions * bins) // max(columns, 1)
    totals = np.bincount(column, minlength=bins).astype(np.float64)
    layers = comparison.differs.shape[1]
    grid = np.full((layers, bins), np.nan)
    for j in range(layers):
        hits = np.bincount(column, weights=comparison.differs[:, j], minlength=bins)
        grid[j] = np.where(totals > 0, hits / np.maximum(totals, 1), np.nan)
    return grid


def heatmap_png(comparison: TraceComparison, dpi: int = 110) -> bytes:
    """The layer x position heatmap of disagreement, as PNG bytes (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    grid = disagreement_by_position(comparison)
    fig = Figure(figsize=(10, 1.5 + 0.35 * max(grid.shape[0], 1)), dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(
        grid, aspect="auto", vmin=0.0, vmax=1.0, cmap="magma", interpolation="nearest"
    )
    ax.set_yticks(range(grid.shape[0]), [layer.layer for layer in comparison.layers])
    binned = int(comparison.positions.max(initial=0)) + 1 > grid.shape[1]
    ax.set_xlabel("position (binned)" if binned else "position")
    ax.set_title("fraction of tokens whose expert set differs")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


_COLUMNS = (
    ("layer", "layer"),
    ("set differs", "set_differs"),
    ("mean Jaccard", "jaccard"),
    ("top-1 flips", "top1_flip"),
    ("mean |Δk|", "k_abs_diff"),
    ("k differs", "k_differs"),
    ("weight |Δ| (shared)", "weight_abs_error"),
)


def render_html(report: Mapping[str, Any], png: bytes) -> str:
    """A self-contained page: the summary, the per-layer table and the heatmap."""
    from moe_devkit.inspect.html import _CSP, _CSS, _findings_html, _fmt

    section = report["sections"][SECTION]
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in _COLUMNS)
    rows = "".join(
        "<tr>"
        + "".join(
            f'<td class="name">{html.escape(str(layer[key]))}</td>'
            if key == "layer"
            else f"<td>{'n/a' if layer[key] is None else _fmt(layer[key], 4)}</td>"
            for _, key in _COLUMNS
        )
        + "</tr>"
        for layer in section["layers"]
    )
    image = base64.b64encode(png).decode("ascii")
    only = "".join(
        f"<p>Layers only in {side}: {html.escape(', '.join(section[key]))}</p>"
        for side, key in (("A", "layers_only_a"), ("B", "layers_only_b"))
        if section[key]
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<title>moe-devkit routing comparison</title><style>{_CSS}</style></head>
<body><h1>Routing comparison</h1>
<p>{section["tokens_compared"]} tokens compared ({section["tokens_only_a"]} only in A,
{section["tokens_only_b"]} only in B); tokens that differ in at least one layer:
{_fmt(section["any_layer_differs"], 4)}.</p>{only}
{_findings_html(report.get("findings", []))}
<table><tr>{head}</tr>{rows}</table>
<h2>Disagreement by layer and position</h2>
<img alt="layer x position disagreement" src="data:image/png;base64,{image}">
</body></html>
"""


def write_comparison(
    comparison: TraceComparison,
    out_dir: str | Path,
    sources: Sequence[str] = (),
    tolerance: float = 0.0,
) -> tuple[Path, Path]:
    """Writes ``routing_comparison.json`` (the report envelope, with the ``routing-differs``
    findings of ``comparison.findings(tolerance)``) and ``routing_comparison.html``; both
    are rendered before either is written."""
    section = comparison.to_section()
    if sources:
        section["traces"] = list(sources)
    section["tolerance"] = tolerance
    report = make_report({SECTION: section}, comparison.findings(tolerance))
    text = report_json_text(report)
    page = render_html(json.loads(text), heatmap_png(comparison))
    out = Path(out_dir)
    json_path, html_path = write_atomic_set(
        {out / "routing_comparison.json": text, out / "routing_comparison.html": page}
    )
    return json_path, html_path

"""Readers for the routing records that serving and training stacks write, into a
``RoutingTrace`` (per-token expert ids) or an ``ExpertCounts`` (per-layer expert counts).

* ``read_vllm(path, num_experts)``: vLLM's routed experts (``--enable-return-routed-experts``):
  an integer array [tokens, layers, k] per request (``prompt_routed_experts`` for the
  prompt, ``routed_experts`` for the generated tokens), saved by the user as ``.npy``,
  ``.npz`` or ``.pt``.
* ``read_megatron(path, num_experts)``: Megatron-LM router records (its ``RouterReplay``
  keeps one [tokens, k] top-k index tensor per MoE layer) written as JSON lines, one
  object per layer and step, in the layout docs/traces.md gives.
* ``read_sglang(path)``: sglang's expert-distribution dump (``torch.save`` of the
  recorder's output): ``logical_count`` [steps, layers, experts] in ``stat`` mode, or the
  ``per_token`` mode's ``records``; both read into per-layer counts, which compare against
  a trace's counts (``ExpertCounts.from_trace``, ``compare_counts``), not token by token.
* ``read_trace(path, format="auto")``: one of the per-token formats, or this package's own
  ``.npz``; ``detect_format(path)`` says which a file is.

Padding sentinels: an id outside 0..E-1 that is -1, E or (when E < 255) 255 is padding and
becomes -1; any other id outside the range is an error naming the file, the token and the
layer. A row that is padding in every layer of a [sequences, tokens, layers, k] array is a
pad token and is dropped.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_devkit.diagnostics.findings import Finding
from moe_devkit.inspect.trace import TRACE_FORMAT, Array, RoutingTrace
from moe_devkit.reporting import make_report, report_json_text, write_atomic

FORMATS = ("moe-devkit", "vllm", "megatron", "sglang")
TRACE_FORMATS = ("moe-devkit", "vllm", "megatron")  # per-token; sglang is counts

_VLLM_KEYS = ("prompt_routed_experts", "routed_experts")
_SGLANG_KEYS = ("logical_count", "records")


def default_layer_names(count: int) -> list[str]:
    """``layers.0``, ``layers.1``, ...: the names of layers a format gives by index only."""
    return [f"layers.{i}" for i in range(count)]


def _per_layer(num_experts: int | Sequence[int], layers: int, where: str) -> list[int]:
    if isinstance(num_experts, bool):
        raise ValueError(f"{where}: num_experts must be an int >= 1; got {num_experts!r}")
    values = [num_experts] * layers if isinstance(num_experts, int) else list(num_experts)
    if len(values) != layers or any(
        isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in values
    ):
        raise ValueError(
            f"{where}: num_experts must be an int >= 1 or one per layer ({layers}); "
            f"got {num_experts!r}"
        )
    return values


def sentinels(num_experts: int) -> tuple[int, ...]:
    """The padding sentinels of a layer of ``num_experts`` experts: -1, E and, when E < 255,
    255 (an 8-bit padding value; from 256 experts on, 255 is an expert)."""
    return (-1, num_experts, 255) if num_experts < 255 else (-1, num_experts)


def map_sentinels(ids: Array, num_experts: Sequence[int], where: str) -> Array:
    """int32 [T, L, K]: ``ids`` with every padding sentinel as -1.

    Raises:
        ValueError: ``ids`` is not an integer [T, L, K] array with L = len(num_experts), or
            holds an id that is neither an expert nor a sentinel.
    """
    if ids.ndim != 3 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"{where}: expected an integer array [tokens, layers, k]; got {ids.dtype} "
            f"shape {ids.shape}"
        )
    if ids.shape[1] != len(num_experts):
        raise ValueError(
            f"{where}: expected {len(num_experts)} layers (num_experts has one entry per "
            f"layer); got shape {ids.shape}"
        )
    values = ids.astype(np.int64)
    out = np.full(values.shape, -1, dtype=np.int32)
    for layer, experts in enumerate(num_experts):
        column = values[:, layer]
        valid = (column >= 0) & (column < experts)
        bad = ~valid & ~np.isin(column, sentinels(experts))
        if bad.any():
            token, slot = (int(i[0]) for i in np.nonzero(bad))
            raise ValueError(
                f"{where}: expert id {int(column[token, slot])} at token {token}, layer "
                f"{layer} is neither an expert 0..{experts - 1} nor a padding sentinel "
                f"{sentinels(experts)}"
            )
        out[:, layer] = np.where(valid, column, -1)
    return out


def _trace(
    ids: Array,
    sequence: Array,
    positions: Array,
    token_ids: Array | None,
    num_experts: int | Sequence[int],
    layers: Sequence[str] | None,
    where: str,
    source: str,
) -> RoutingTrace:
    count = ids.shape[1] if ids.ndim == 3 else 0
    experts = _per_layer(num_experts, count, where)
    names = list(layers) if layers is not None else default_layer_names(count)
    if len(names) != count:
        raise ValueError(f"{where}: layers must name the {count} layers; got {len(names)} names")
    return RoutingTrace(
        expert_ids=map_sentinels(ids, experts, where),
        token_ids=(np.full(ids.shape[0], -1, np.int64) if token_ids is None else token_ids).astype(
            np.int64
        ),
        positions=positions.astype(np.int64),
        sequence=sequence.astype(np.int64),
        layers=names,
        num_experts=experts,
        metadata={"source": source, "path": where},
    )


# ----------------------------------------------------------------------------- files


def _load_pt(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises many kinds for a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a readable .pt file ({first})") from None


def _array(value: Any, where: str) -> Array:
    if isinstance(value, np.ndarray):
        return value
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, list | tuple):
        try:
            return np.asarray(value)
        except ValueError:
            pass
    raise ValueError(f"{where}: expected an array; got {type(value).__name__}")


def _load_arrays(path: Path) -> Any:
    """The content of a .npy, .npz or .pt file: an array, a dict or a list."""
    suffix = path.suffix.lower()
    if suffix == ".pt" or suffix == ".pth":
        return _load_pt(path)
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                return {name: data[name] for name in data.files}
        return np.asarray(data)
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        reason = "neither a numpy array nor an archive" if "pickle" in str(exc) else str(exc)
        raise ValueError(f"{path}: not a readable .npy/.npz file ({reason})") from None


def detect_format(path: str | Path) -> str:
    """Which of ``FORMATS`` the file is, from its name and content.

    Raises:
        FileNotFoundError: no such file.
        ValueError: none of them.
    """
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(f"{target}: no such file")
    if target.suffix.lower() in (".jsonl", ".json"):
        return "megatron"
    content = _load_arrays(target)
    if isinstance(content, dict):
        keys = set(content)
        if "header" in keys and "expert_ids" in keys:
            return "moe-devkit"
        if keys & set(_VLLM_KEYS):
            return "vllm"
        if keys & set(_SGLANG_KEYS):
            return "sglang"
        if keys == {"arr_0"}:
            return "vllm"
        raise ValueError(
            f"{target}: not a routing record: expected the arrays of a moe-devkit trace "
            f"(expert_ids, header), vLLM's {' or '.join(_VLLM_KEYS)}, or sglang's "
            f"{' or '.join(_SGLANG_KEYS)}; got {sorted(keys)}"
        )
    return "vllm"


# ----------------------------------------------------------------------------- vLLM


def read_vllm(
    path: str | Path,
    num_experts: int | Sequence[int],
    *,
    layers: Sequence[str] | None = None,
) -> RoutingTrace:
    """Reads vLLM's routed experts into a trace.

    The file holds one of:

    * an array [T, L, K] (``.npy``, an ``.npz`` of one array, or a ``.pt`` tensor): one
      request, token t at position t of sequence 0;
    * an array [S, T, L, K]: S requests padded to T tokens (padding rows dropped);
    * a ``.pt`` list of [T_i, L, K] arrays: request i is sequence i;
    * an ``.npz`` (or ``.pt`` dict) with ``prompt_routed_experts`` [P, L, K] and/or
      ``routed_experts`` [G, L, K] of one request (the prompt's tokens, then the generated
      ones: positions 0..P+G-1), and optionally ``prompt_token_ids`` [P] and ``token_ids``
      (the generated ids; vLLM routes a generated token when it is fed back, so the last one
      may have no row: ids beyond the rows are dropped).

    Args:
        num_experts: the experts of each MoE layer (one int for all, or one per layer):
            vLLM's arrays do not say it, and it tells the sentinel E from an expert.
        layers: the layer names (default ``layers.0``, ...; give a recorded trace's
            ``layers`` to compare with it).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds none of the above, or an id that is neither an expert
            nor a sentinel.
    """
    target = Path(path)
    where = str(target)
    content = _load_arrays(target)
    if isinstance(content, dict) and set(content) == {"arr_0"}:
        content = content["arr_0"]
    if isinstance(content, dict):
        parts = [name for name in _VLLM_KEYS if name in content]
        if not parts:
            raise ValueError(
                f"{where}: expected {' and/or '.join(_VLLM_KEYS)}; got {sorted(content)}"
            )
        arrays = [_array(content[name], f"{where}: {name}") for name in parts]
        for name, value in zip(parts, arrays, strict=True):
            if value.ndim != 3:
                raise ValueError(
                    f"{where}: {name} must be [tokens, layers, k]; got shape {value.shape}"
                )
        if len(arrays) == 2 and arrays[0].shape[1:] != arrays[1].shape[1:]:
            raise ValueError(
                f"{where}: prompt_routed_experts {arrays[0].shape} and routed_experts "
                f"{arrays[1].shape} must have the same [layers, k]"
            )
        ids = np.concatenate(arrays) if len(arrays) == 2 else arrays[0]
        rows = ids.shape[0]
        token_ids = np.full(rows, -1, np.int64)
        offset = 0
        for name, value in zip(parts, arrays, strict=True):
            ids_name = "prompt_token_ids" if name == "prompt_routed_experts" else "token_ids"
            if ids_name in content:
                known = _array(content[ids_name], f"{where}: {ids_name}").reshape(-1)
                if not np.issubdtype(known.dtype, np.integer):
                    raise ValueError(f"{where}: {ids_name} must be integers; got {known.dtype}")
                known = known[: value.shape[0]]
                token_ids[offset : offset + known.size] = known
            offset += value.shape[0]
        return _trace(
            ids,
            np.zeros(rows, np.int64),
            np.arange(rows),
            token_ids,
            num_experts,
            layers,
            where,
            "vllm",
        )
    if isinstance(content, list | tuple) and content and not isinstance(content[0], int):
        arrays = [_array(part, f"{where}: item {i}") for i, part in enumerate(content)]
        for i, part in enumerate(arrays):
            if part.ndim != 3 or part.shape[1:] != arrays[0].shape[1:]:
                raise ValueError(
                    f"{where}: item {i} must be [tokens, layers, k] like item 0 "
                    f"{arrays[0].shape}; got shape {part.shape}"
                )
        ids = np.concatenate(arrays)
        sequence = np.concatenate([np.full(len(p), i) for i, p in enumerate(arrays)])
        positions = np.concatenate([np.arange(len(p)) for p in arrays])
        return _trace(ids, sequence, positions, None, num_experts, layers, where, "vllm")
    ids = _array(content, where)
    if ids.ndim == 3:
        rows = ids.shape[0]
        return _trace(
            ids, np.zeros(rows), np.arange(rows), None, num_experts, layers, where, "vllm"
        )
    if ids.ndim == 4:
        batch, length = ids.shape[:2]
        flat = ids.reshape(batch * length, *ids.shape[2:])
        experts = _per_layer(num_experts, ids.shape[2], where)
        mapped = map_sentinels(flat, experts, where)  # checks the ids before dropping
        keep = (mapped >= 0).any(axis=(1, 2))
        sequence = np.repeat(np.arange(batch), length)[keep]
        positions = np.tile(np.arange(length), batch)[keep]
        return _trace(flat[keep], sequence, positions, None, num_experts, layers, where, "vllm")
    raise ValueError(
        f"{where}: expected routed experts [tokens, layers, k] or [sequences, tokens, "
        f"layers, k]; got shape {ids.shape}"
    )


# ----------------------------------------------------------------------------- Megatron


def _field(record: Mapping[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = record.get(name)
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: {name!r} must be {names}; got {value!r}"[:300])
    return value


def read_megatron(
    path: str | Path,
    num_experts: int | Sequence[int] | None = None,
    *,
    layers: Sequence[str] | None = None,
) -> RoutingTrace:
    """Reads Megatron-LM router records written as JSON lines into a trace.

    One JSON object per line, one per MoE layer and step (the layout docs/traces.md
    describes): ``layer`` (int, the MoE layer's index), ``topk_indices`` ([N][k] ints:
    the router's top-k expert indices of the N tokens), and optionally ``step`` (int,
    default 0), ``micro_batch_size`` (b: the rows are Megatron's sequence-major [s, b]
    order, row r being position r // b of the step's sequence r % b; default 1),
    ``num_experts`` (int) and ``token_ids`` ([N]). Every layer of one step has the same N.

    Args:
        num_experts: the experts per layer, when the records do not say it.
        layers: the layer names (default ``layers.<index>``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not such an object (its line number and field named),
            layers that disagree on N, k or num_experts, or no record.
    """
    target = Path(path)
    where = str(target)
    steps: dict[int, dict[int, Array]] = {}
    micro: dict[int, int] = {}
    tokens: dict[int, Array] = {}
    experts_of: dict[int, int] = {}
    with target.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            at = f"{where}: line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{at}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{at}: expected a JSON object; got {type(record).__name__}")
            layer = _field(record, "layer", int, at)
            step = _field(record, "step", int, at) if "step" in record else 0
            rows = record.get("topk_indices")
            try:
                raw: Array = np.asarray(rows)
            except (TypeError, ValueError):
                raw = np.zeros(0)
            integers = np.issubdtype(raw.dtype, np.integer)
            if raw.ndim != 2 or not isinstance(rows, list) or not integers:
                raise ValueError(
                    f"{at}: 'topk_indices' must be a list of N lists of k ints; got "
                    f"{json.dumps(rows)[:80]}"
                )
            ids = raw.astype(np.int64)
            if layer < 0:
                raise ValueError(f"{at}: 'layer' must be >= 0; got {layer}")
            step_layers = steps.setdefault(step, {})
            if layer in step_layers:
                raise ValueError(f"{at}: layer {layer} of step {step} appears twice")
            step_layers[layer] = ids
            b = _field(record, "micro_batch_size", int, at) if "micro_batch_size" in record else 1
            if b < 1 or ids.shape[0] % b:
                raise ValueError(
                    f"{at}: 'micro_batch_size' must be >= 1 and divide the {ids.shape[0]} "
                    f"rows; got {b}"
                )
            if micro.setdefault(step, b) != b:
                raise ValueError(f"{at}: step {step} has micro_batch_size {micro[step]} and {b}")
            if "num_experts" in record:
                e = _field(record, "num_experts", int, at)
                if experts_of.setdefault(layer, e) != e:
                    raise ValueError(
                        f"{at}: layer {layer} has num_experts {experts_of[layer]} and {e}"
                    )
            if "token_ids" in record:
                ids_of = np.asarray(record["token_ids"])
                if ids_of.shape != (ids.shape[0],) or not np.issubdtype(ids_of.dtype, np.integer):
                    raise ValueError(f"{at}: 'token_ids' must be {ids.shape[0]} ints")
                tokens[step] = ids_of.astype(np.int64)
    if not steps:
        raise ValueError(f"{where}: no router record (expected one JSON object per line)")
    indices = sorted({layer for by_layer in steps.values() for layer in by_layer})
    k = max(ids.shape[1] for by_layer in steps.values() for ids in by_layer.values())
    parts: list[Array] = []
    sequence: list[Array] = []
    positions: list[Array] = []
    token_parts: list[Array] = []
    first = 0
    for step in sorted(steps):
        by_layer = steps[step]
        counts = {ids.shape[0] for ids in by_layer.values()}
        if len(counts) != 1:
            raise ValueError(
                f"{where}: the layers of step {step} have different token counts {sorted(counts)}"
            )
        n = counts.pop()
        block = np.full((n, len(indices), k), -1, np.int64)
        for j, layer in enumerate(indices):
            if layer in by_layer:
                block[:, j, : by_layer[layer].shape[1]] = by_layer[layer]
        b = micro[step]
        rows = np.arange(n)
        parts.append(block)
        sequence.append(first + rows % b)
        positions.append(rows // b)
        token_parts.append(tokens.get(step, np.full(n, -1, np.int64)))
        first += b
    if num_experts is None:
        missing = [layer for layer in indices if layer not in experts_of]
        if missing:
            raise ValueError(
                f"{where}: num_experts is not in the records of layers {missing}: pass num_experts"
            )
        num_experts = [experts_of[layer] for layer in indices]
    names = list(layers) if layers is not None else [f"layers.{i}" for i in indices]
    return _trace(
        np.concatenate(parts),
        np.concatenate(sequence),
        np.concatenate(positions),
        np.concatenate(token_parts),
        num_experts,
        names,
        where,
        "megatron",
    )


# ----------------------------------------------------------------------------- any trace


def read_trace(
    path: str | Path,
    format: str = "auto",
    *,
    num_experts: int | Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
) -> RoutingTrace:
    """A per-token trace from any of ``TRACE_FORMATS`` (``auto``: ``detect_format``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown format, an sglang dump (counts: ``read_sglang``), a vLLM
            file without ``num_experts``, or the reader's own errors.
    """
    if format not in ("auto", *FORMATS):
        raise ValueError(f"format must be one of auto, {', '.join(FORMATS)}; got {format!r}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    kind = detect_format(path) if format == "auto" else format
    if kind == "moe-devkit":
        trace = RoutingTrace.load(path)
        if layers is not None:
            trace.layers = list(layers)
        return trace
    if kind == "vllm":
        if num_experts is None:
            raise ValueError(f"{path}: a vLLM routed-experts file needs num_experts")
        return read_vllm(path, num_experts, layers=layers)
    if kind == "megatron":
        return read_megatron(path, num_experts, layers=layers)
    raise ValueError(
        f"{path}: an sglang expert-distribution dump holds per-layer counts, not "
        f"per-token experts: read it with read_sglang and compare counts"
    )


# ----------------------------------------------------------------------------- counts


@dataclass
class ExpertCounts:
    """Per-layer expert counts: ``counts`` int64 [L, E] (E the widest layer's; a narrower
    layer's extra columns are 0), the (token, expert) pairs each expert got."""

    counts: Array
    layers: list[str]
    num_experts: list[int]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.counts.ndim != 2 or self.counts.shape[0] != len(self.layers):
            raise ValueError(
                f"counts must be [L, E] with L={len(self.layers)} layers; got shape "
                f"{self.counts.shape}"
            )
        if len(self.num_experts) != len(self.layers):
            raise ValueError("num_experts must have one entry per layer")

    @classmethod
    def from_trace(cls, trace: RoutingTrace) -> ExpertCounts:
        """The counts of a trace's (token, expert) pairs, per layer."""
        width = max(trace.num_experts, default=0)
        counts = np.zeros((len(trace.layers), width), np.int64)
        for j, experts in enumerate(trace.num_experts):
            ids = trace.expert_ids[:, j].reshape(-1)
            counts[j, :experts] = np.bincount(ids[ids >= 0], minlength=experts)[:experts]
        return cls(counts, list(trace.layers), list(trace.num_experts), dict(trace.metadata))


def _sglang_layers(count: int, layers: Sequence[str] | None, where: str) -> list[str]:
    names = list(layers) if layers is not None else default_layer_names(count)
    if len(names) != count:
        raise ValueError(f"{where}: layers must name the {count} layers; got {len(names)} names")
    return names


def read_sglang(path: str | Path, *, layers: Sequence[str] | None = None) -> ExpertCounts:
    """Reads sglang's expert-distribution dump (``/dump_expert_distribution_record``: a
    ``torch.save`` of a dict) into per-layer logical expert counts.

    * ``stat`` mode: ``logical_count`` [steps, L, E] (or [L, E]): summed over the steps.
    * ``per_token`` mode: ``records`` (one per forward pass, each with ``topk_ids_of_layer``
      [L, tokens, k] of physical expert ids, -1 padded) and ``last_physical_to_logical_map``
      [L, physical experts]: the ids are mapped to logical experts and counted.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not such a dict, or a physical id outside the map.
    """
    target = Path(path)
    where = str(target)
    content = _load_pt(target) if target.suffix.lower() in (".pt", ".pth") else _load_arrays(target)
    if not isinstance(content, dict) or not set(content) & set(_SGLANG_KEYS):
        got = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ValueError(
            f"{where}: not an sglang expert-distribution dump: expected a dict with "
            f"'logical_count' (stat mode) or 'records' (per_token mode); got {got}"
        )
    if "logical_count" in content:
        counts = _array(content["logical_count"], f"{where}: logical_count")
        if counts.ndim == 3:
            counts = counts.sum(axis=0)
        if counts.ndim != 2 or not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
            raise ValueError(
                f"{where}: logical_count must be non-negative integers [steps, layers, "
                f"experts]; got {counts.dtype} shape {counts.shape}"
            )
        layers_count, experts = counts.shape
        return ExpertCounts(
            counts.astype(np.int64),
            _sglang_layers(layers_count, layers, where),
            [experts] * layers_count,
            {"source": "sglang", "mode": "stat", "path": where},
        )
    records = content["records"]
    if "last_physical_to_logical_map" not in content:
        raise ValueError(f"{where}: per_token records need 'last_physical_to_logical_map'")
    mapping = _array(content["last_physical_to_logical_map"], f"{where}: physical map")
    if mapping.ndim != 2:
        raise ValueError(
            f"{where}: last_physical_to_logical_map must be [layers, physical experts]; "
            f"got shape {mapping.shape}"
        )
    layers_count, physical = mapping.shape
    experts = int(mapping.max(initial=-1)) + 1
    totals = np.zeros((layers_count, max(experts, 1)), np.int64)
    if not isinstance(records, list):
        raise ValueError(f"{where}: 'records' must be a list; got {type(records).__name__}")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "topk_ids_of_layer" not in record:
            raise ValueError(f"{where}: record {i} has no 'topk_ids_of_layer'")
        ids = _array(record["topk_ids_of_layer"], f"{where}: record {i}").astype(np.int64)
        if ids.ndim != 3 or ids.shape[0] != layers_count:
            raise ValueError(
                f"{where}: record {i}: topk_ids_of_layer must be [{layers_count}, tokens, "
                f"k]; got shape {ids.shape}"
            )
        if (ids >= physical).any() or (ids < -1).any():
            raise ValueError(
                f"{where}: record {i}: a physical expert id outside -1..{physical - 1}"
            )
        for layer in range(layers_count):
            chosen = ids[layer][ids[layer] >= 0]
            logical = mapping[layer][chosen]
            totals[layer] += np.bincount(logical, minlength=totals.shape[1])
    return ExpertCounts(
        totals,
        _sglang_layers(layers_count, layers, where),
        [experts] * layers_count,
        {"source": "sglang", "mode": "per_token", "path": where},
    )


@dataclass
class LayerCounts:
    """One layer's expert loads in A and B: ``pairs_*`` the (token, expert) pairs,
    ``total_variation`` half the L1 distance of the two load shares (0 same shares, 1
    disjoint), ``max_share_diff`` the largest |share_a - share_b| of one expert."""

    layer: str
    num_experts: int
    pairs_a: int
    pairs_b: int
    total_variation: float
    max_share_diff: float


@dataclass
class CountComparison:
    """``compare_counts``' result."""

    layers: list[LayerCounts]
    layers_only_a: list[str]
    layers_only_b: list[str]

    def layers_over(self, tolerance: float = 0.0) -> list[LayerCounts]:
        """The shared layers whose load shares differ by more than ``tolerance`` in total
        variation."""
        if not 0.0 <= tolerance <= 1.0:
            raise ValueError(f"tolerance must be a fraction in [0, 1]; got {tolerance!r}")
        return [layer for layer in self.layers if layer.total_variation > tolerance]

    def findings(self, tolerance: float = 0.0) -> list[Finding]:
        """One ``routing-load-differs`` error per layer of ``layers_over(tolerance)``."""
        return [
            Finding(
                code="routing-load-differs",
                severity="error",
                message=(
                    f"{layer.layer}: the expert load shares differ by {layer.total_variation:.2%} "
                    f"in total variation (tolerance {tolerance:.2%}; largest expert "
                    f"difference {layer.max_share_diff:.2%})"
                ),
                location=layer.layer,
                details={**vars(layer), "tolerance": tolerance},
            )
            for layer in self.layers_over(tolerance)
        ]

    def to_section(self) -> dict[str, Any]:
        return {
            "layers": [vars(layer).copy() for layer in self.layers],
            "layers_only_a": self.layers_only_a,
            "layers_only_b": self.layers_only_b,
        }


def compare_counts(a: ExpertCounts, b: ExpertCounts) -> CountComparison:
    """Compares two per-layer expert loads, layers aligned by name.

    Raises:
        ValueError: no shared layer, or a shared layer with different numbers of experts.
    """
    shared = [name for name in a.layers if name in b.layers]
    if not shared:
        raise ValueError(f"the counts share no layer: A has {a.layers}, B has {b.layers}")
    results: list[LayerCounts] = []
    for name in shared:
        la, lb = a.layers.index(name), b.layers.index(name)
        experts = a.num_experts[la]
        if experts != b.num_experts[lb]:
            raise ValueError(
                f"layer {name!r} has {experts} experts in A and {b.num_experts[lb]} in B"
            )
        ca = a.counts[la, :experts].astype(np.float64)
        cb = b.counts[lb, :experts].astype(np.float64)
        share_a = ca / ca.sum() if ca.sum() else ca
        share_b = cb / cb.sum() if cb.sum() else cb
        gap = np.abs(share_a - share_b)
        results.append(
            LayerCounts(
                layer=name,
                num_experts=experts,
                pairs_a=int(ca.sum()),
                pairs_b=int(cb.sum()),
                total_variation=float(0.5 * gap.sum()),
                max_share_diff=float(gap.max(initial=0.0)),
            )
        )
    return CountComparison(
        layers=results,
        layers_only_a=[name for name in a.layers if name not in b.layers],
        layers_only_b=[name for name in b.layers if name not in a.layers],
    )


__all__ = [
    "COUNT_SECTION",
    "FORMATS",
    "TRACE_FORMAT",
    "TRACE_FORMATS",
    "CountComparison",
    "ExpertCounts",
    "LayerCounts",
    "compare_counts",
    "default_layer_names",
    "detect_format",
    "map_sentinels",
    "read_megatron",
    "read_sglang",
    "read_trace",
    "read_vllm",
    "sentinels",
    "write_count_comparison",
]


COUNT_SECTION = "routing_count_comparison"


def write_count_comparison(
    comparison: CountComparison,
    out_dir: str | Path,
    sources: Sequence[str] = (),
    tolerance: float = 0.0,
) -> Path:
    """Writes ``routing_count_comparison.json`` (the report envelope, one section of the
    per-layer loads and the ``routing-load-differs`` findings over ``tolerance``)."""
    section = comparison.to_section()
    section["traces"] = list(sources)
    section["tolerance"] = tolerance
    report = make_report({COUNT_SECTION: section}, comparison.findings(tolerance))
    return write_atomic(Path(out_dir) / f"{COUNT_SECTION}.json", report_json_text(report))

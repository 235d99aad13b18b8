"""CUDA-graph capture and replay of the inspector's in-place statistics updates.

An update is a function of a few input tensors that changes a layer's state tensors in place
(``state.RunningStats``). ``UpdateGraphs`` captures it into a CUDA graph and replays the
graph: one launch instead of about fifty small kernels per step.

* A steady training loop hands the hooks their decision tensors at the same addresses step
  after step (the caching allocator reuses them), so an update seen twice on the same
  tensors is captured reading them in place and replayed as is.
* Other inputs are copied into the buffers of a graph captured per input shape.
* Inputs built from parts (several deferred steps, concatenated) are written straight into
  the buffers of a graph captured per layout.

Capturing synchronises the device once, so nothing is captured while CUDA sync-debug mode is
on, nor beyond ``MAX_GRAPHS`` graphs of each kind: the update then runs eagerly. Warm-up and
capture run the update for real, so the state tensors are saved before and restored after.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Protocol

import torch

MAX_GRAPHS = 8  # captured updates per layer, of each kind

Inputs = Sequence[torch.Tensor]


class CapturedState(Protocol):
    """The tensors an update changes in place, by name."""

    def tensors(self) -> Mapping[str, torch.Tensor]: ...


def capturing_allowed() -> bool:
    """False while CUDA sync-debug mode is on (a capture synchronises the device once)."""
    return torch.cuda.get_sync_debug_mode() == 0


class UpdateGraphs:
    """The captured updates of one layer.

    Args:
        state: the tensors the updates change (saved and restored around each capture).
        device: the CUDA device of the state and the inputs.
    """

    def __init__(self, state: CapturedState, device: torch.device) -> None:
        self._state, self._device = state, device
        self._by_shape: dict[Hashable, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
        self._in_place: dict[Hashable, torch.cuda.CUDAGraph] = {}  # graphs reading inputs
        self._seen: dict[Hashable, int] = {}  # input addresses seen, for _in_place
        self._built: dict[Hashable, tuple[torch.cuda.CUDAGraph, Inputs]] = {}

    def run(self, inputs: Inputs, flags: Hashable, update: Callable[[Inputs], None]) -> None:
        """Runs ``update(inputs)``, from a captured graph where one fits.

        ``flags`` tells apart updates that do different work on inputs of the same shapes.
        """
        where = (tuple((t.data_ptr(), t.shape, t.stride(), t.dtype) for t in inputs), flags)
        in_place = self._in_place.get(where)
        if in_place is not None:
            in_place.replay()
            return
        allowed = capturing_allowed()
        seen = self._seen.get(where, 0) + 1
        if allowed and seen >= 2 and len(self._in_place) < MAX_GRAPHS:
            self._in_place[where] = self._capture(lambda: update(inputs))
            self._in_place[where].replay()
            return
        if len(self._seen) < 4 * MAX_GRAPHS:
            self._seen[where] = seen
        key = (tuple(t.shape for t in inputs), flags)
        entry = self._by_shape.get(key)
        if entry is None:
            if not allowed or len(self._by_shape) >= MAX_GRAPHS:
                update(inputs)
                return
            buffers = tuple(t.clone() for t in inputs)
            entry = self._by_shape[key] = (self._capture(lambda: update(buffers)), buffers)
        graph, buffers = entry
        torch._foreach_copy_(list(buffers), list(inputs))  # one call for all the copies
        graph.replay()

    def run_built(
        self,
        layout: Hashable,
        build: Callable[[], Inputs],
        fill: Callable[[Inputs], None],
        update: Callable[[Inputs], None],
    ) -> None:
        """Runs ``update`` on inputs built from parts, from a graph captured per ``layout``.

        The first call for a layout builds the inputs (``build``), which become the graph's
        input buffers; later calls write the parts into those buffers (``fill``) and replay.
        """
        entry = self._built.get(layout)
        if entry is None:
            inputs = build()
            if not (capturing_allowed() and len(self._built) < MAX_GRAPHS):
                update(inputs)
                return
            entry = self._built[layout] = (self._capture(lambda: update(inputs)), inputs)
        graph, buffers = entry
        fill(buffers)
        graph.replay()

    def _capture(self, fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """Captures ``fn`` (state updates) into a CUDA graph.

        It runs once on a side stream first: lazy initialisation (cuBLAS handles, the
        allocator) and Triton's compilation for these shapes must not happen inside the
        capture. Warm-up and capture run the update for real, so the state is restored.
        """
        tensors = self._state.tensors()
        saved = {name: t.clone() for name, t in tensors.items()}
        warm = torch.cuda.Stream(device=self._device)  # type: ignore[no-untyped-call]
        warm.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(warm):
            fn()
        torch.cuda.current_stream(self._device).wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        for name, value in saved.items():
            tensors[name].copy_(value)
        return graph

"""Counting the aten ops a RoutingTraceRecorder's hooks issue (CPU and CUDA tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

from moe_devkit.inspect.trace import RoutingTraceRecorder


class HookOps(TorchDispatchMode):
    """Counts the aten ops issued inside the recorder's hooks (and while ``counting`` is set),
    not the model's: each hook is wrapped to count while it runs."""

    def __init__(self, recorder: RoutingTraceRecorder) -> None:
        super().__init__()
        self.ops = 0
        self.counting = False
        for handle in recorder._handles:
            hooks = handle.hooks_dict_ref()
            assert hooks is not None
            hooks[handle.id] = self.counted(hooks[handle.id])

    def counted(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            outer, self.counting = self.counting, True
            try:
                return hook(*args, **kwargs)
            finally:
                self.counting = outer

        return wrapped

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += self.counting
        return func(*args, **(kwargs or {}))

"""moe-devkit: find and prove fixed the failures of dynamic-k Mixture-of-Experts routers.

Public names are imported lazily (PEP 562), so ``import moe_devkit`` (and the torch-free
``moe_devkit.lint``) loads neither torch, JAX, numpy, rich nor matplotlib until a name needs
them; not even ``typing``, so that the check-debug hook starts fast.
"""

from __future__ import annotations

TYPE_CHECKING = False

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "RouterConfig": "moe_devkit.config",
    "RoutingDecision": "moe_devkit.routers.torch_router",
    "DynamicMoERouter": "moe_devkit.routers.torch_router",
    "StaticTopKRouter": "moe_devkit.routers.torch_router",
    "MoELayer": "moe_devkit.routers.torch_router",
    "MoEOutput": "moe_devkit.routers.torch_router",
    "MoEModel": "moe_devkit.routers.torch_router",
    "MoEModelOutput": "moe_devkit.routers.torch_router",
    "UtilizationStats": "moe_devkit.diagnostics.utilization",
    "debug_expert_selection": "moe_devkit.diagnostics.utilization",
}

__all__ = [
    "DynamicMoERouter",
    "MoELayer",
    "MoEModel",
    "MoEModelOutput",
    "MoEOutput",
    "RouterConfig",
    "RoutingDecision",
    "StaticTopKRouter",
    "UtilizationStats",
    "__version__",
    "debug_expert_selection",
]

if TYPE_CHECKING:
    from typing import Any

    from moe_devkit.config import RouterConfig
    from moe_devkit.diagnostics.utilization import UtilizationStats, debug_expert_selection
    from moe_devkit.routers.torch_router import (
        DynamicMoERouter,
        MoELayer,
        MoEModel,
        MoEModelOutput,
        MoEOutput,
        RoutingDecision,
        StaticTopKRouter,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moe_devkit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext moe_devkit``: registers the notebook magics (imports IPython only now)."""
    from moe_devkit.integrations.notebook import load_ipython_extension as load

    load(ipython)


def __dir__() -> list[str]:
    return sorted(__all__)

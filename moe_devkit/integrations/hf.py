"""Router adapters for transformers MoE models: ``RouterInspector.attach`` records their routers.

transformers 5.x runs each MoE layer's experts as one batched module, so nothing per expert
can be hooked; the router (gate) module can. An adapter is a function
``(module, args, output) -> RoutingDecision | None`` that turns one router module's forward
into a ``RoutingDecision``; the registry maps router class names to adapters, and ``attach``
puts a forward hook on every module whose class (or a base class) has one. Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS, DeepSeek-V3 and Switch Transformers are built in
(docs/integrations.md lists them).

This module is the documented home of the registry and the decision builders; they are
defined in ``moe_devkit.inspect.adapters``, which the inspector reads. Importing either loads
no transformers. ``RouterInspectorCallback`` (for ``transformers.Trainer``,
``moe_devkit.integrations.hf_trainer``) is loaded, with transformers, at its first use.

Register an adapter for another architecture::

    from moe_devkit.integrations.hf import decision_from_router_outputs, register_adapter

    def my_router(module, args, output):
        logits, weights, indices = output  # whatever the module returns
        return decision_from_router_outputs(logits, indices, weights)

    register_adapter("MyMoeTopKRouter", my_router)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moe_devkit.inspect.adapters import (
    RouterAdapter,
    Scoring,
    adapter_for,
    decision_from_dense_scores,
    decision_from_router_outputs,
    register_adapter,
    registered_adapters,
    switch_top1_adapter,
    topk_tuple_adapter,
    unregister_adapter,
)

if TYPE_CHECKING:  # at run time, __getattr__ imports it (and transformers) when first used;
    # it is left out of __all__, so that `import *` loads no transformers
    from moe_devkit.integrations.hf_trainer import RouterInspectorCallback  # noqa: F401

__all__ = [
    "RouterAdapter",
    "Scoring",
    "adapter_for",
    "decision_from_dense_scores",
    "decision_from_router_outputs",
    "register_adapter",
    "registered_adapters",
    "switch_top1_adapter",
    "topk_tuple_adapter",
    "unregister_adapter",
]


def __getattr__(name: str) -> Any:
    """``RouterInspectorCallback``, imported (with transformers) only when asked for."""
    if name == "RouterInspectorCallback":
        from moe_devkit.integrations.hf_trainer import RouterInspectorCallback

        return RouterInspectorCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

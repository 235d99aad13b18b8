"""RouterInspector (hooks, streaming statistics) and its reports (JSON, PNG, HTML).

Modules: ``inspector`` (the hooks), ``config`` (``InspectorConfig``), ``adapters`` (router
adapters and decision builders), ``state`` (per-layer records and ``LayerState``), ``update``
(the in-place tensor work), ``capture`` (CUDA graphs), ``summary`` (metrics and alarms),
``report`` (the files), ``html`` and ``plots`` (their rendering), ``jax_inspector`` (JAX).
"""

from moe_devkit.inspect.config import InspectorConfig
from moe_devkit.inspect.inspector import RouterInspector

__all__ = ["InspectorConfig", "RouterInspector"]

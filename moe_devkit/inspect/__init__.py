"""RouterInspector (hooks, streaming statistics) and its reports (JSON, PNG, HTML).

Modules: ``inspector`` (the hooks), ``discovery`` (which modules are routers, found by the
model's structure), ``adapters`` (the adapter registry and decision builders), ``layouts``
(routers with unusual outputs), ``padding`` (pad tokens of an attention mask), ``config``
(``InspectorConfig``), ``records`` and ``state`` (per-layer records and ``LayerState``),
``update`` (the in-place tensor work), ``capture`` (CUDA graphs), ``signals`` (the model's aux
loss and selection biases), ``live`` (``metrics()`` and live alarms while training),
``summary`` (metrics and alarms), ``report`` (the files), ``html`` and ``plots`` (their
rendering), ``jax_inspector`` (JAX).
"""

from moe_devkit.inspect.config import InspectorConfig
from moe_devkit.inspect.inspector import RouterInspector
from moe_devkit.inspect.live import METRIC_KEYS, RoutingAlarm, RoutingAlarmError

__all__ = ["METRIC_KEYS", "InspectorConfig", "RouterInspector", "RoutingAlarm", "RoutingAlarmError"]

"""RouterInspector (hooks, streaming statistics) and its reports (JSON, PNG, HTML)."""

from moe_devkit.inspect.inspector import InspectorConfig, RouterInspector

__all__ = ["InspectorConfig", "RouterInspector"]

"""How the gates and the baseline store name a bad value in their error messages.

Imports nothing from moe_devkit: the gates load it inside a worker process that runs an
older revision of the package.
"""

from __future__ import annotations


def describe_value(value: object) -> str:
    """A JSON-minded description of ``value`` for error messages: ``'x' (a string)``."""
    kinds = {bool: "true/false", str: "a string", int: "an integer", float: "a number",
             list: "an array", dict: "an object", type(None): "null"}  # fmt: skip
    kind = kinds.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{text[:40]}... ({kind})" if len(text) > 40 else f"{text} ({kind})"

"""InspectorConfig: step counts are checked."""

from __future__ import annotations

import pytest

from moe_devkit.inspect import InspectorConfig


@pytest.mark.parametrize("name", ["reservoir_every", "defer_steps"])
@pytest.mark.parametrize("value", [0, True, 1.5])
def test_config_rejects_bad_step_counts(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be an int >= 1; got {name}={value!r}"):
        InspectorConfig(**{name: value})  # type: ignore[arg-type]

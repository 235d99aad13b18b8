"""Argument checks shared by the package: errors that name the argument, what it must be and
what it got (``TypeError`` for the wrong kind of value, ``ValueError`` for one out of range)."""

from __future__ import annotations

import math


def require_int(name: str, value: object, minimum: int) -> None:
    """``value`` must be an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {name}={value}")


def require_float(
    name: str,
    value: object,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` must be a finite real number (not a bool) in the interval (closed unless
    said open); returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a float; got {value!r} ({type(value).__name__})")
    fvalue = float(value)
    above = fvalue > low if low_open else fvalue >= low
    below = fvalue < high if high_open else fvalue <= high
    if not (math.isfinite(fvalue) and above and below):
        left = "(" if low_open or math.isinf(low) else "["
        right = ")" if high_open or math.isinf(high) else "]"
        interval = f"{left}{low}, {high}{right}"
        raise ValueError(f"{name} must be in {interval}; got {name}={value}")
    return fvalue

"""Diagnostics: pure functions and small recorders over routing, numerics, memory and time."""

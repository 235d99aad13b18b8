"""Localise the first non-finite value in a JAX router or layer, reported as a ``Finding``.

``locate_nonfinite(fn, *args)`` works in two passes, so the common case costs one compiled
call and the slow one runs only when something is wrong:

1. Detect: ``checkify.checkify(fn, errors=checkify.float_checks)`` runs ``fn`` compiled and
   says whether any primitive produced a NaN (or divided by zero), and which primitive; the
   outputs are also checked for NaN/Inf (overflow produces Inf, which checkify does not flag).
2. Localise: ``fn`` is re-run op by op (``jax.disable_jit``) under ``jax.debug_nans`` and
   ``jax.debug_infs``, which raise ``FloatingPointError`` at the first primitive whose output
   is not finite; the innermost source frame outside JAX names the line.

Non-finite inputs (hidden states or parameters) are named by their pytree path first: the
first primitive to touch them then merely propagates the NaN.

The finding has the format of ``NumericsGuard``'s (code ``nonfinite-output``, phase, tensor,
``also_nonfinite``), with ``primitive`` and ``source`` added to its details.
"""

from __future__ import annotations

import functools
import os
import re
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from moe_devkit.diagnostics.findings import Finding

_JAX_DIRS = tuple(os.path.dirname(m.__file__ or "") for m in (jax, np))


def nonfinite_leaves(tree: Any, prefix: str = "args") -> list[str]:
    """Pytree paths of the floating-point leaves of ``tree`` that hold NaN or Inf."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = jnp.asarray(leaf)
        if jnp.issubdtype(array.dtype, jnp.inexact) and not bool(jnp.isfinite(array).all()):
            bad.append(prefix + jax.tree_util.keystr(path))
    return bad


def locate_nonfinite(
    fn: Callable[..., Any], *args: Any, location: str | None = None, step: int | None = None
) -> Finding | None:
    """Runs ``fn(*args)`` and returns where its first non-finite value came from, or None.

    Args:
        fn: a JAX function, e.g. ``layer`` (called as ``layer(params, hidden_states)``).
        args: its arguments (parameter pytrees and arrays).
        location: what ``fn`` is, for the finding (default: its name).
        step: the training step, for the finding.

    Returns:
        None when no primitive produced a NaN/Inf and every output is finite; otherwise an
        error ``Finding`` naming the first non-finite input, or the first primitive and
        source line that produced one.
    """
    name = location or getattr(fn, "__name__", type(fn).__name__)
    err, out = _checked(fn)(*args)
    checkify_message = err.get()
    bad_inputs = nonfinite_leaves(args)
    bad_outputs = nonfinite_leaves(out, prefix="output")
    if checkify_message is None and not bad_outputs and not bad_inputs:
        return None
    primitive, source = _first_bad_primitive(fn, args)
    if primitive is None and checkify_message:
        primitive = _primitive_from_checkify(checkify_message)
    at = f" at step {step}" if step is not None else ""
    used = f"{primitive or 'an operation'}" + (f" at {source}" if source else "")
    if bad_inputs:
        tensor = f"input {bad_inputs[0]}"
        message = f"non-finite input{at}: module {name!r}, {tensor} (first used by {used})"
    else:
        tensor = f"output of {primitive or 'an operation'}"
        message = f"first non-finite output{at}: module {name!r}, {used}"
    details = {
        "phase": "forward",
        "tensor": tensor,
        "primitive": primitive,
        "source": source,
        "checkify": checkify_message,
        "also_nonfinite": (bad_inputs[1:] + bad_outputs)[:10],
    }
    return Finding("nonfinite-output", "error", message, location=name, step=step, details=details)


@functools.lru_cache(maxsize=32)
def _checked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` checkified and jitted, cached so repeated checks compile once per shape."""
    return jax.jit(checkify.checkify(fn, errors=checkify.float_checks))


def _first_bad_primitive(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, Any]:
    """(primitive, "file:line (function)") of the first non-finite primitive output."""
    try:
        # Scoped on purpose: the op-by-op re-run that names the primitive.
        with jax.disable_jit(), jax.debug_nans(True), jax.debug_infs(True):  # noqa: DBG204
            jax.block_until_ready(fn(*args))  # type: ignore[no-untyped-call]
    except FloatingPointError as exc:
        return _primitive_from_message(str(exc)), _user_frame(exc)
    return None, None


def _primitive_from_message(message: str) -> str | None:
    match = re.search(r"in (\w+)", message)
    return match.group(1) if match else None


def _primitive_from_checkify(message: str) -> str | None:
    match = re.search(r"primitive: (\w+)", message)
    return match.group(1) if match else None


def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame outside JAX and NumPy, as "file:line (function)"."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if not frame.filename.startswith(_JAX_DIRS) and "contextlib" not in frame.filename:
            return f"{os.path.relpath(frame.filename)}:{frame.lineno} ({frame.name})"
    return None

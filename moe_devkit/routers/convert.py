"""Weight and decision conversion between the PyTorch and JAX reference routers.

The JAX parameter pytree mirrors the PyTorch ``state_dict``: the key ``"layers.0.moe.router.
router_network.weight"`` is ``params["layers"][0]["moe"]["router"]["router_network"]
["weight"]``, with the same shape and layout. Conversion is therefore a copy of each array:

* ``torch_to_jax(module)``: any reference module (router, experts, layer, block, model) to
  its JAX parameters;
* ``jax_to_torch(params, module)``: loads JAX parameters into the PyTorch module in place
  (``load_state_dict(strict=True)``: a missing or extra key is an error);
* ``decision_to_torch`` / ``decision_to_jax``: a ``RoutingDecision`` across frameworks, so
  every torch diagnostic (utilization, RouterInspector.record) reads JAX routing.

Arrays go through NumPy on the host (exact; bfloat16 via float32, which holds it exactly).
This module imports both torch and jax; ``import moe_devkit`` imports neither.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.utils.dlpack
from torch import nn

from moe_devkit.routers import jax_router, torch_router

if TYPE_CHECKING:
    from moe_devkit.routers.jax_router import Params


def tensor_to_jax(tensor: torch.Tensor, dtype: Any = None) -> jax.Array:
    """A torch tensor as a jax.Array with the same values (and dtype, unless given)."""
    source = tensor.detach().cpu()
    target = dtype if dtype is not None else _JAX_DTYPES.get(source.dtype)
    if target is None:
        raise TypeError(f"tensor dtype {source.dtype} has no JAX equivalent here")
    if source.dtype == torch.bfloat16:
        source = source.float()  # numpy has no bfloat16; float32 holds it exactly
    return jnp.asarray(source.numpy(), dtype=target)


def array_to_torch(array: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A jax.Array or numpy array as a torch tensor with the same values and dtype.

    A jax.Array goes through DLPack (no copy; a GPU array stays on its GPU); where DLPack
    cannot carry it, and for numpy arrays, through host memory.
    """
    tensor: torch.Tensor | None = None
    if isinstance(array, jax.Array):
        try:
            tensor = torch.utils.dlpack.from_dlpack(array)
        except (BufferError, RuntimeError, TypeError):
            tensor = None
    if tensor is None:
        host = np.asarray(array)
        if host.dtype == jnp.bfloat16:
            host = host.astype(np.float32)  # numpy-side bfloat16 is unknown to torch
            tensor = torch.from_numpy(host).to(torch.bfloat16)
        else:
            tensor = torch.from_numpy(np.array(host, copy=not host.flags.writeable))
    return tensor if dtype is None else tensor.to(dtype)


_JAX_DTYPES: dict[torch.dtype, Any] = {
    torch.float32: jnp.float32,
    torch.float64: jnp.float64,
    torch.bfloat16: jnp.bfloat16,
    torch.float16: jnp.float16,
    torch.int64: jnp.int32,  # JAX's default integer without x64
    torch.int32: jnp.int32,
    torch.bool: jnp.bool_,
}


def state_dict_to_params(state: Mapping[str, torch.Tensor], dtype: Any = None) -> Params:
    """Nests a flat ``state_dict`` into the JAX parameter pytree ("layers.0" -> a list)."""
    tree: dict[str, Any] = {}
    for key, tensor in state.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = tensor_to_jax(tensor, dtype)
    params: Params = _lists_from_digit_keys(tree)
    return params


def _lists_from_digit_keys(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    children = {k: _lists_from_digit_keys(v) for k, v in node.items()}
    if children and all(k.isdigit() for k in children):
        return [children[str(i)] for i in range(len(children))]
    return children


def params_to_state_dict(params: Params) -> dict[str, torch.Tensor]:
    """Flattens a JAX parameter pytree into ``state_dict`` keys and CPU tensors."""
    out: dict[str, torch.Tensor] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        out[key] = array_to_torch(leaf)
    return out


def torch_to_jax(module: nn.Module, dtype: Any = None) -> Params:
    """The JAX parameters of a reference PyTorch module (router, experts, layer or model).

    Args:
        module: a module of ``moe_devkit.routers.torch_router``.
        dtype: cast every parameter to this JAX dtype (default: keep each dtype).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    return state_dict_to_params(module.state_dict(), dtype)


def jax_to_torch(params: Params, module: nn.Module) -> nn.Module:
    """Loads JAX parameters into ``module`` in place (strict) and returns it.

    Each tensor keeps the module's dtype and device.

    Raises:
        RuntimeError: a key is missing or unexpected, or a shape differs.
    """
    state = module.state_dict()
    incoming = params_to_state_dict(params)
    for key, tensor in incoming.items():
        if key in state:
            incoming[key] = tensor.to(dtype=state[key].dtype, device=state[key].device)
    module.load_state_dict(incoming, strict=True)
    return module


def decision_to_torch(decision: jax_router.RoutingDecision) -> torch_router.RoutingDecision:
    """A JAX RoutingDecision as a torch one on the CPU (integers widened to int64)."""
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(torch_router.RoutingDecision):
        value = getattr(decision, field.name)
        if field.name == "batch_shape":
            fields[field.name] = tuple(value)
            continue
        tensor = array_to_torch(value)
        if not tensor.is_floating_point() and tensor.dtype != torch.bool:
            tensor = tensor.to(torch.int64)
        fields[field.name] = tensor
    return torch_router.RoutingDecision(**fields)


def decision_to_jax(decision: torch_router.RoutingDecision) -> jax_router.RoutingDecision:
    """A torch RoutingDecision as a JAX one (integers as int32)."""
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(jax_router.RoutingDecision):
        value = getattr(decision, field.name)
        fields[field.name] = tuple(value) if field.name == "batch_shape" else tensor_to_jax(value)
    return jax_router.RoutingDecision(**fields)

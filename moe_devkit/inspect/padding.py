"""Padding: which tokens of a routing decision are padding, from the model's attention mask.

When a model is called with an ``attention_mask`` (``model(input_ids, attention_mask=...)``,
``generate``, a Trainer's padded batches), pad tokens still pass through the routers, but they
are not tokens of the data: transformers' own load-balancing loss leaves them out, and so do
the inspector's counts, k histogram, complexity statistics and losses.

``TokenMasks`` hooks the model-level modules above the routers (those whose forward takes
``attention_mask`` together with ``input_ids`` or ``inputs_embeds``: the top-level model, and
the encoder and decoder stacks of an encoder-decoder model) and keeps the 2-D [batch, length]
mask of each call in progress. A router of N tokens under a call with a [B, T] mask gets the
mask's last N / B columns (with a KV cache the router sees only the new tokens), flattened.
A call without a mask (or with a mask of another layout) masks nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moe_devkit.inspect.discovery import parent_modules
from moe_devkit.inspect.records import RouterSite

Handle = torch.utils.hooks.RemovableHandle


def _takes_attention_mask(module: nn.Module) -> int | None:
    """The position of ``attention_mask`` in a model-level forward (None: not one)."""
    try:
        params = [p for p in inspect.signature(type(module).forward).parameters if p != "self"]
    except (TypeError, ValueError):
        return None
    if "attention_mask" not in params or not {"input_ids", "inputs_embeds"} & set(params):
        return None
    return params.index("attention_mask")


class TokenMasks:
    """The attention masks of the model calls in progress, per router site."""

    def __init__(self) -> None:
        self._running: dict[int, torch.Tensor | None] = {}
        self._chains: dict[int, list[int]] = {}  # id(block) -> ids of its model-level ancestors

    def attach(self, model: nn.Module, sites: Sequence[RouterSite]) -> list[Handle]:
        """Hooks the model-level ancestors of the sites' blocks; returns the handles."""
        parents = parent_modules(model)
        entries: dict[int, tuple[nn.Module, int]] = {}
        for site in sites:
            chain, node = [], parents.get(id(site.block))
            while node is not None:
                position = _takes_attention_mask(node)
                if position is not None:
                    chain.append(id(node))
                    entries[id(node)] = (node, position)
                node = parents.get(id(node))
            self._chains[id(site.block)] = chain
        handles: list[Handle] = []
        for key, (module, position) in entries.items():
            handles.append(
                module.register_forward_pre_hook(self._enter(key, position), with_kwargs=True)
            )
            handles.append(module.register_forward_hook(self._leave(key), always_call=True))
        return handles

    def _enter(self, key: int, position: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            mask = kwargs.get("attention_mask")
            if mask is None and len(args) > position:
                mask = args[position]
            usable = isinstance(mask, torch.Tensor) and mask.dim() == 2
            self._running[key] = mask if usable else None

        return hook

    def _leave(self, key: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._running.pop(key, None)

        return hook

    def valid_tokens(self, site: RouterSite, num_tokens: int) -> torch.Tensor | None:
        """bool[num_tokens]: the tokens that are not padding (None: no mask applies)."""
        for key in self._chains.get(id(site.block), ()):
            if key not in self._running:
                continue
            mask = self._running[key]
            if mask is None:
                return None
            batch, length = mask.shape
            if batch == 0 or num_tokens % batch or num_tokens // batch > length:
                return None
            return (mask[:, length - num_tokens // batch :] != 0).reshape(-1)
        return None

"""The router's work after the gating matmul in two Triton kernels, for the no-autograd path.

``DynamicMoERouter`` and ``StaticTopKRouter`` turn router logits into a decision with about
70 small PyTorch kernels (softmax, top-k, entropy, k, masks, weights, non-finite handling,
three losses): launches, not arithmetic, bound them on a GPU. Here one kernel routes blocks
of tokens (softmax, entropy, top-K by K rounds of arg-max, k, indices, weights) and writes
one row of partial loss sums per block; a second, one-program kernel adds those rows in a
fixed order (deterministic, no atomics) and writes the losses. No host synchronisation.

Results: probabilities, weights, entropy and losses equal the PyTorch ops' up to float32
rounding (the losses are summed in float64); indices and k are equal unless two
probabilities, or a top-p mass and the threshold, are within a rounding of each other. On
exact ties the lower expert index wins.

No backward: the routers use this where autograd is off, with no capacity limit and
non-finite tokens masked. Triton is imported at first use; with ``TRITON_INTERPRET=1`` set
before that, the kernels run in Triton's interpreter on CPU tensors (the tests use this).
"""

from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import Literal, NamedTuple

import torch

from moe_devkit.config import RouterConfig
from moe_devkit.routers import triton_grouped

__all__ = ["MAX_EXPERTS", "FusedRouting", "KRule", "is_available", "route", "supports"]

MAX_EXPERTS = 256
"""Most experts the kernels take: a block holds whole rows of E (padded to a power of two)."""

KRule = Literal["static", "top_p", "complexity"]
"""How k is chosen: k = K for every token, top-p mass, or from a complexity score."""

_RULES: dict[str, int] = {"static": 0, "top_p": 1, "complexity": 2}
# Tokens per program = _BLOCK_ELEMENTS / E_PAD within [16, 64], and 4 warps per 1024 logits
# (8 at most): 8 to 16 logits per thread. The routing kernel keeps several [tokens, E] tiles
# live through the top-K loop; for sm_90 that compiled to 90-140 registers a thread and no
# spills for E = 64 to 256 (ptxas resource usage; the block sizes are not tuned by timing).
_BLOCK_ELEMENTS = 1024
# The losses kernel adds one partial row per 16 tokens at E = 64 (512 rows at 8192 tokens):
# 256 rows per step and 8 warps took 19-21 us on an H100 where 64 rows and 4 warps took 42.
_BLOCK_PARTIALS = 256  # partial rows per step of the losses kernel
_LOSSES_WARPS = 8


class FusedRouting(NamedTuple):
    """What ``route`` computes; shapes and dtypes as in ``RoutingDecision``."""

    router_probs: torch.Tensor  # float32[N, E]
    expert_indices: torch.Tensor  # int64[N, K], -1 padded
    expert_weights: torch.Tensor  # float32[N, K]
    k_per_token: torch.Tensor  # int64[N]
    complexity: torch.Tensor  # float32[N]
    nonfinite: torch.Tensor  # bool[N]
    dropped: torch.Tensor  # bool[N, K], all False
    load_balancing_loss: torch.Tensor  # float32[]
    z_loss: torch.Tensor  # float32[]
    compute_loss: torch.Tensor  # float32[]
    aux_loss: torch.Tensor  # float32[]


INTERPRET_ON_CPU = False
"""Whether the routers take this path for CPU tensors under Triton's interpreter.

Off by default: ``TRITON_INTERPRET=1`` (set to debug some other kernel, or by a test module
at collection) must not move every no-grad CPU routing into the interpreter. The tests of
this module switch it on."""


def is_available(device: torch.device) -> bool:
    """Whether the routers take this path on ``device``: CUDA with Triton, or, with
    ``INTERPRET_ON_CPU`` set, any device under Triton's interpreter."""
    device = torch.device(device)
    if device.type != "cuda" and not INTERPRET_ON_CPU:
        return False
    return triton_grouped.is_available(device)


def supports(num_experts: int) -> bool:
    """Whether the kernels take ``num_experts`` experts (1 to ``MAX_EXPERTS``)."""
    return 1 <= num_experts <= MAX_EXPERTS


@functools.cache
def _kernels() -> ModuleType:
    from moe_devkit.routers import _triton_router_kernels

    return _triton_router_kernels


def _pow2(n: int) -> int:
    """The smallest power of two >= max(n, 2)."""
    return max(2, triton_grouped._next_power_of_2(n))


def _check(
    router_logits: torch.Tensor, rule: str, max_k: int, complexity: torch.Tensor | None
) -> None:
    """Raises TypeError/ValueError unless the arguments fit ``route``."""
    if router_logits.dim() != 2 or router_logits.dtype != torch.float32:
        raise TypeError(
            "router_logits must be float32[N, E]; got "
            f"{router_logits.dtype}{list(router_logits.shape)}"
        )
    num_tokens, num_experts = router_logits.shape
    if not supports(num_experts):
        raise ValueError(
            f"route takes 1 to {MAX_EXPERTS} experts; got {num_experts} (use the PyTorch path)"
        )
    if rule not in _RULES:
        raise ValueError(f"rule must be one of {tuple(_RULES)}; got rule={rule!r}")
    if not 1 <= max_k <= num_experts:
        raise ValueError(f"max_k must be in [1, num_experts={num_experts}]; got max_k={max_k}")
    if (rule == "complexity") != (complexity is not None):
        raise ValueError(
            f"complexity must be given for rule 'complexity' and only then; got rule={rule!r}, "
            f"complexity={'a tensor' if complexity is not None else None}"
        )
    if complexity is not None and complexity.shape != (num_tokens,):
        raise ValueError(
            f"complexity must have shape [N]=[{num_tokens}]; got {list(complexity.shape)}"
        )


def route(
    router_logits: torch.Tensor,
    config: RouterConfig,
    *,
    rule: KRule,
    max_k: int,
    complexity: torch.Tensor | None = None,
) -> FusedRouting:
    """Routes N tokens from their logits in two kernel launches; no host synchronisation.

    Follows ``_RouterBase._decide`` with ``capacity_factor=None`` and non-finite tokens
    masked: softmax, top-K (lowest index on exact ties), k per ``rule`` (``min_k``,
    ``top_p`` and ``k_temperature`` from ``config``), k = 0 and zero weights on non-finite
    tokens, and the three losses over the finite tokens, weighted by the config's
    coefficients into ``aux_loss``.

    Args:
        router_logits: float32[N, E], 1 <= E <= MAX_EXPERTS, on a device the kernels run on.
        config: the router configuration.
        rule: "static" (k = max_k for every token), "top_p" or "complexity".
        max_k: K, the number of slots (the static router's k).
        complexity: float32[N], the complexity scores; rule "complexity" only. Otherwise the
            normalised entropy of the router distribution is returned as the complexity.

    Returns:
        The routing tensors and the losses (float32[] views of one buffer).

    Raises:
        TypeError: logits not float32[N, E].
        ValueError: E or max_k out of range, or complexity missing, extra or misshapen.
    """
    _check(router_logits, rule, max_k, complexity)
    logits = router_logits.contiguous()
    (num_tokens, num_experts), device = logits.shape, logits.device
    e_pad = _pow2(num_experts)  # >= 2, as are the slots: no size-1 block dimension
    block = min(64, max(16, _BLOCK_ELEMENTS // e_pad))
    num_warps = min(8, max(4, block * e_pad // 256))
    programs = max(1, -(-num_tokens // block))
    probs = torch.empty_like(logits)
    indices = torch.empty(num_tokens, max_k, dtype=torch.int64, device=device)
    weights = torch.empty(num_tokens, max_k, dtype=torch.float32, device=device)
    k_per_token = torch.empty(num_tokens, dtype=torch.int64, device=device)
    nonfinite = torch.empty(num_tokens, dtype=torch.bool, device=device)
    dropped = torch.empty(num_tokens, max_k, dtype=torch.bool, device=device)
    scores = (
        torch.empty(num_tokens, dtype=torch.float32, device=device)
        if complexity is None
        else complexity.to(torch.float32).contiguous()
    )
    partials = torch.empty(programs, 2 * e_pad + 4, dtype=torch.float64, device=device)
    losses = torch.empty(4, dtype=torch.float32, device=device)
    kernels = _kernels()
    if num_tokens:
        kernels.route_kernel[(programs,)](
            logits, scores, probs, scores, indices, weights, k_per_token, nonfinite, dropped,
            partials,
            num_tokens, logits.stride(0), float(config.top_p), float(config.k_temperature),
            math.log(num_experts) if num_experts > 1 else 1.0,
            E=num_experts, E_PAD=e_pad, K=max_k, K_PAD=_pow2(max_k),
            MIN_K=1 if rule == "static" else config.min_k,
            RULE=_RULES[rule], BLOCK_T=block,
            num_warps=num_warps,
            enable_fp_fusion=False,  # no fused multiply-adds: float32 rounded as torch rounds
        )  # fmt: skip
    else:
        partials.zero_()
    kernels.losses_kernel[(1,)](
        partials, losses, programs,
        float(config.load_balance_coef), float(config.z_loss_coef),
        float(config.compute_cost_coef),
        E=num_experts, E_PAD=e_pad, K=max_k, BLOCK_P=_BLOCK_PARTIALS,
        num_warps=_LOSSES_WARPS, enable_fp_fusion=False,
    )  # fmt: skip
    lb_loss, z_loss, compute_loss, aux_loss = losses.unbind()
    return FusedRouting(
        router_probs=probs,
        expert_indices=indices,
        expert_weights=weights,
        k_per_token=k_per_token,
        complexity=scores,
        nonfinite=nonfinite,
        dropped=dropped,
        load_balancing_loss=lb_loss,
        z_loss=z_loss,
        compute_loss=compute_loss,
        aux_loss=aux_loss,
    )

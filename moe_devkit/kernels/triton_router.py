"""The router's work after the gating matmul in two Triton kernels, for the no-autograd path.

``DynamicMoERouter`` and ``StaticTopKRouter`` turn router logits into a decision with about
70 small PyTorch kernels (softmax, top-k, entropy, k, masks, weights, non-finite handling,
three losses): launches, not arithmetic, bound them on a GPU. Here one kernel routes blocks
of tokens (softmax, entropy, top-K by K rounds of arg-max, k, indices, weights) and writes
one row of partial loss sums per block; a second, one-program kernel adds those rows in a
fixed order (deterministic, no atomics) and writes the losses. No host synchronisation.
``route_hidden`` starts one step earlier, from 16-bit hidden states and the gate weight: its
first kernel computes each block's logits with ``tl.dot`` and routes them in registers, in
place of a cuBLAS matmul launch and a write and re-read of the logits.

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
from collections.abc import Callable
from types import ModuleType
from typing import Literal, NamedTuple

import torch

from moe_devkit.config import RouterConfig
from moe_devkit.kernels import triton_grouped

__all__ = [
    "MAX_EXPERTS",
    "FusedRouting",
    "KRule",
    "is_available",
    "route",
    "route_hidden",
    "supports",
    "supports_hidden",
]

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
_BLOCK_PARTIALS = 256  # most partial rows per step of the losses kernel
_LOSSES_WARPS = 8  # 4 where a step holds <= 128 rows: for 128 partial rows (route_hidden's
# 64-token blocks at 8192 tokens), 128 rows x 4 warps took 4.3 us on an H100, 256 x 8 5.4 us,
# 64 x 4 8.3 us
# route_hidden_kernel: one [BLOCK_T, E_PAD] float32 logits block per program, from
# [BLOCK_T, BLOCK_D] x [BLOCK_D, E_PAD] tl.dot tiles over a pipelined D loop. Timed on an H100
# (8192 tokens x 2048, 64 experts, bfloat16, top_p, in a CUDA graph, with the losses kernel):
# cuBLAS matmul + route 29.9 us; fused, 64 tokens: D steps of 128, 4 stages, 8 warps 22.9 us
# (4 warps 23.2), D steps of 64 25.1-28.4 us; 32 tokens 27.6-31.9 us.
_HIDDEN_DTYPES = (torch.bfloat16, torch.float16)
_HIDDEN_BLOCK_T = 64  # tokens per program, fewer where E_PAD > 64 (see the next line)
_HIDDEN_BLOCK_ELEMENTS = 4096  # most logits per program: BLOCK_T * E_PAD
_HIDDEN_BLOCK_D = 128  # hidden features per step of the D loop
_HIDDEN_STAGES = 4  # pipeline depth of the D loop
_HIDDEN_WARPS = 8


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
    from moe_devkit.kernels import _triton_router_kernels

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
    _check_rule(num_tokens, num_experts, rule, max_k, complexity)


def _check_rule(
    num_tokens: int, num_experts: int, rule: str, max_k: int, complexity: torch.Tensor | None
) -> None:
    """Raises ValueError unless rule, max_k and complexity fit N tokens and E experts."""
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
    e_pad = _pow2(logits.shape[1])  # >= 2, as are the slots: no size-1 block dimension
    block = min(64, max(16, _BLOCK_ELEMENTS // e_pad))

    def launch(grid: tuple[int], *args: object, **meta: object) -> None:
        _kernels().route_kernel[grid](
            logits, logits.stride(0), *args, **meta,
            num_warps=min(8, max(4, block * e_pad // 256)),
        )  # fmt: skip

    return _route_blocks(
        launch, logits.shape, logits.device, config, rule=rule, max_k=max_k,
        complexity=complexity, e_pad=e_pad, block=block,
    )  # fmt: skip


def supports_hidden(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``route_hidden`` takes these operands (it raises where this is False).

    Args:
        hidden: the hidden states, [N, D].
        weight: the gate weight, [E, D] (``nn.Linear``'s layout).
    """
    return (
        hidden.dtype in _HIDDEN_DTYPES
        and weight.dtype == hidden.dtype
        and (hidden.is_cuda or hidden.dtype != torch.bfloat16)  # see _check_hidden
        and weight.device == hidden.device
        and hidden.dim() == 2
        and weight.dim() == 2
        and hidden.stride(1) == 1
        and weight.stride(1) == 1
        and hidden.shape[1] % 16 == 0
        and weight.shape[1] == hidden.shape[1]
        and supports(weight.shape[0])
    )


def route_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    config: RouterConfig,
    *,
    rule: KRule,
    max_k: int,
    complexity: torch.Tensor | None = None,
) -> tuple[torch.Tensor, FusedRouting]:
    """``route(hidden @ weight.T in float32, ...)`` with the matmul in the routing kernel.

    Each program computes the float32 logits of its block of tokens with ``tl.dot`` (16-bit
    products, float32 accumulation, as ``torch.mm(..., out_dtype=torch.float32)``), writes
    them out and routes them from registers: one launch fewer than the cuBLAS matmul and
    ``route``, and no re-read of the logits. The routing is ``route``'s on those logits.

    Args:
        hidden: 16-bit float[N, D] hidden states, unit column stride, D a multiple of 16;
            float16 only off CUDA (in Triton's interpreter).
        weight: the gate weight, [E, D] of hidden's dtype and device, unit column stride,
            1 <= E <= MAX_EXPERTS.
        config, rule, max_k, complexity: as in ``route``.

    Returns:
        router_logits float32[N, E] and the routing, as ``route`` returns it.

    Raises:
        TypeError: hidden or weight not 16-bit float, of different dtypes or devices, or
            bfloat16 off CUDA.
        ValueError: a shape or stride ``supports_hidden`` refuses, or an argument ``route``
            refuses.
    """
    _check_hidden(hidden, weight)
    (num_tokens, hidden_size), num_experts = hidden.shape, weight.shape[0]
    _check_rule(num_tokens, num_experts, rule, max_k, complexity)
    router_logits = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=hidden.device)
    e_pad = max(16, _pow2(num_experts))  # tl.dot takes no dimension below 16
    block = min(_HIDDEN_BLOCK_T, _HIDDEN_BLOCK_ELEMENTS // e_pad)  # >= 16 for E <= 256

    def launch(grid: tuple[int], *args: object, **meta: object) -> None:
        _kernels().route_hidden_kernel[grid](
            hidden, hidden.stride(0), weight, weight.stride(0), router_logits, *args,
            hidden_size, **meta,
            BLOCK_D=_HIDDEN_BLOCK_D, STAGES=_HIDDEN_STAGES, num_warps=_HIDDEN_WARPS,
        )  # fmt: skip

    routing = _route_blocks(
        launch, router_logits.shape, hidden.device, config, rule=rule, max_k=max_k,
        complexity=complexity, e_pad=e_pad, block=block,
    )  # fmt: skip
    return router_logits, routing


def _check_hidden(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """Raises TypeError/ValueError unless ``supports_hidden(hidden, weight)``."""
    if hidden.dtype not in _HIDDEN_DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(
            "hidden and weight must both be bfloat16 or both float16; got "
            f"hidden={hidden.dtype}, weight={weight.dtype} (use route for other dtypes)"
        )
    if hidden.dtype == torch.bfloat16 and not hidden.is_cuda:
        # Triton 3.9's interpreter keeps bfloat16 as uint16 arrays and its tl.dot multiplies
        # those bit patterns as integers: logits of 1e10 instead of 1.
        raise TypeError(
            "hidden must be float16 off CUDA (Triton's interpreter multiplies bfloat16 "
            f"wrongly); got {hidden.dtype} on {hidden.device}"
        )
    if weight.device != hidden.device:
        raise TypeError(
            f"weight must be on hidden's device {hidden.device}; got weight on {weight.device}"
        )
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            "hidden must be [N, D] and weight [E, D] with the same D; got "
            f"hidden {list(hidden.shape)}, weight {list(weight.shape)}"
        )
    if hidden.shape[1] % 16:
        raise ValueError(
            f"hidden's D must be a multiple of 16; got D={hidden.shape[1]} (use route)"
        )
    if not supports(weight.shape[0]):
        raise ValueError(
            f"weight must have 1 to {MAX_EXPERTS} rows (experts); got {weight.shape[0]} "
            "(use the PyTorch path)"
        )
    if hidden.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(
            "hidden and weight must have unit column stride (rows contiguous); got strides "
            f"hidden {hidden.stride()}, weight {weight.stride()} (call .contiguous())"
        )


def _route_blocks(
    launch: Callable[..., None],
    shape: torch.Size,
    device: torch.device,
    config: RouterConfig,
    *,
    rule: KRule,
    max_k: int,
    complexity: torch.Tensor | None,
    e_pad: int,
    block: int,
) -> FusedRouting:
    """Allocates the outputs, runs ``launch`` (the first pass) and the losses kernel.

    ``launch(grid, *args, **meta)`` launches route_kernel or route_hidden_kernel with its own
    inputs followed by ``args`` (the complexity, the outputs and N) and ``meta``.
    """
    num_tokens, num_experts = shape
    programs = max(1, triton_grouped._cdiv(num_tokens, block))
    probs = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=device)
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
    if num_tokens:
        launch(
            (programs,),
            scores, probs, scores, indices, weights, k_per_token, nonfinite, dropped, partials,
            num_tokens, float(config.top_p), float(config.k_temperature),
            math.log(num_experts) if num_experts > 1 else 1.0,
            E=num_experts, E_PAD=e_pad, K=max_k, K_PAD=_pow2(max_k),
            MIN_K=1 if rule == "static" else config.min_k,
            RULE=_RULES[rule], BLOCK_T=block,
            enable_fp_fusion=False,  # no fused multiply-adds: float32 rounded as torch rounds
        )  # fmt: skip
    else:
        partials.zero_()
    block_p = min(_BLOCK_PARTIALS, max(16, _pow2(programs)))
    _kernels().losses_kernel[(1,)](
        partials, losses, programs,
        float(config.load_balance_coef), float(config.z_loss_coef),
        float(config.compute_cost_coef),
        E=num_experts, E_PAD=e_pad, K=max_k, BLOCK_P=block_p,
        num_warps=_LOSSES_WARPS if block_p > 128 else 4, enable_fp_fusion=False,
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

"""The reference MoE layer's fast path: which kernels a forward takes, and the calls into them.

``moe_devkit.routers.torch_router`` is the reference in PyTorch ops. Its routers, experts and
layer take ``implementation="auto" | "reference" | "triton"`` and ask this module, at each
stage, whether a kernel takes over and which one:

* "reference": PyTorch ops only (what "auto" does where Triton is not installed).
* "auto": the Triton kernels where they run and give the reference's results: on CUDA with
  Triton installed (the routers also under Triton's interpreter with
  ``triton_router.INTERPRET_ON_CPU`` set), and for the routing and the layer's no-grad
  forward only where nothing needs what they skip (see ``routes_in_triton`` and
  ``layer_matmul``). With autograd on, the layer trains on the active-pair kernels with
  their own backward (``layer_train_matmul``, ``train_dispatch``, ``train_experts``,
  ``train_combine``; ``triton_train``).
* "triton": the Triton kernels wherever a step has one, on every device they run on (CUDA,
  or Triton's interpreter with ``TRITON_INTERPRET=1``); steps without a kernel (the routers
  with autograd on, a capacity limit or policy "raise") stay PyTorch ops. A forward raises
  where Triton cannot run on the input's device.

Everything here takes plain tensors: the kernels below the routers know nothing of
``RoutingDecision``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from moe_devkit.config import RouterConfig
from moe_devkit.kernels import (
    triton_dispatch,
    triton_experts,
    triton_grouped,
    triton_router,
    triton_train,
)
from moe_devkit.kernels.triton_router import FusedRouting, KRule

__all__ = [
    "IMPLEMENTATIONS",
    "ActivePairs",
    "FusedRouting",
    "GroupedMatmul",
    "KRule",
    "PairPlan",
    "check_implementation",
    "combine",
    "dispatch",
    "expert_matmul",
    "fuses_gating",
    "grouped_matmul",
    "layer_matmul",
    "layer_train_matmul",
    "plan_pairs",
    "require_triton",
    "route",
    "routes_in_triton",
    "swiglu_experts",
    "train_combine",
    "train_dispatch",
    "train_experts",
]

IMPLEMENTATIONS: tuple[str, ...] = ("auto", "reference", "triton")
"""The values of the routers', experts' and layer's ``implementation`` argument."""

GroupedMatmul = Callable[..., torch.Tensor]
"""``(a: float[M, K], b: float[G, K, N], offs=int32[G]) -> float[M, N]``."""


def check_implementation(implementation: object) -> str:
    """Returns ``implementation`` if it is one of ``IMPLEMENTATIONS``; raises ValueError if not."""
    if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
        raise ValueError(
            "implementation must be 'auto', 'reference' or 'triton'; "
            f"got implementation={implementation!r}"
        )
    return implementation


def require_triton(device: torch.device) -> None:
    """Raises RuntimeError where the Triton kernels cannot run on ``device``."""
    if not triton_grouped.is_available(device):
        raise RuntimeError(
            "implementation='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1); "
            f"got device={device}, triton installed={triton_grouped._triton_installed()} "
            "(use implementation='auto' or 'reference')"
        )


# ----------------------------------------------------------------------------- routers


def routes_in_triton(config: RouterConfig, device: torch.device, implementation: str) -> bool:
    """Whether a router routes with ``triton_router``'s two kernels instead of ~70 torch ops.

    Only where they give the same decision and nothing needs what they skip: autograd off
    (no backward), no capacity limit, non-finite tokens masked (policy "raise" reads the
    device), E within the kernels' limit; under "auto" also CUDA with Triton (or Triton's
    interpreter with ``triton_router.INTERPRET_ON_CPU`` set). Under "triton" raises where
    Triton cannot run on ``device``.
    """
    if implementation == "reference":
        return False
    if implementation == "triton":
        require_triton(device)
    takes = (
        not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()  # inductor fuses the torch ops itself
        and config.capacity_factor is None
        and config.nonfinite_policy == "mask"
        and triton_router.supports(config.num_experts)
    )
    if implementation == "triton":
        return takes
    return takes and triton_router.is_available(device)


def fuses_gating(flat: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``route`` computes the gating matmul inside its first kernel.

    For 16-bit inputs that ``triton_router.supports_hidden`` takes, the matmul runs in that
    kernel (``route_hidden``) instead of cuBLAS; other inputs (float32 among them) bring
    their logits to ``route``.
    """
    return triton_router.supports_hidden(flat, weight)


def route(
    flat: torch.Tensor,
    weight: torch.Tensor,
    router_logits: torch.Tensor | None,
    config: RouterConfig,
    *,
    rule: KRule,
    max_k: int,
    complexity: torch.Tensor | None = None,
) -> tuple[torch.Tensor, FusedRouting]:
    """Softmax, top-k, k, masks, weights and losses in two Triton kernels (no host sync).

    Args:
        flat: float[N, D], the hidden states.
        weight: float[E, D], the gate weight.
        router_logits: float32[N, E], or None where ``fuses_gating(flat, weight)``: the
            first kernel then computes them.
        config, rule, max_k, complexity: as ``triton_router.route``.

    Returns:
        The router logits float32[N, E] and the rest of the decision.
    """
    if router_logits is None:
        return triton_router.route_hidden(
            flat, weight, config, rule=rule, max_k=max_k, complexity=complexity
        )
    fused = triton_router.route(
        router_logits, config, rule=rule, max_k=max_k, complexity=complexity
    )
    return router_logits, fused


# ----------------------------------------------------------------------------- experts


def grouped_matmul(x: torch.Tensor, implementation: str) -> GroupedMatmul | None:
    """The grouped matmul that runs x's device and dtype without a host sync, or None.

    "auto" and "reference", on CUDA: ``torch._grouped_mm`` where it has a CUTLASS kernel
    (bfloat16 on sm90/sm100; for other dtypes and devices it copies the offsets to the
    host), else under "auto" the Triton kernel where Triton is installed. None leaves the
    choice to the experts (``torch._grouped_mm`` on the CPU, or the loop over experts).
    "triton": the Triton kernel on every device it runs on; raises elsewhere.
    """
    if implementation == "triton":
        require_triton(x.device)
        return triton_grouped.grouped_mm
    if x.device.type != "cuda":
        return None
    major = torch.cuda.get_device_capability(x.device)[0]
    if (
        x.dtype == torch.bfloat16
        and major in (9, 10)
        and torch.version.hip is None
        and hasattr(torch, "_grouped_mm")
    ):
        return torch._grouped_mm
    if implementation == "auto" and triton_grouped.is_available(x.device):
        return triton_grouped.grouped_mm
    return None


def expert_matmul(
    a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, fallback: GroupedMatmul
) -> torch.Tensor:
    """The no-autograd grouped matmul: ``triton_experts`` where it fits, else ``fallback``."""
    if triton_experts.is_available(a.device) and triton_experts.supports(a, b):
        return triton_experts.grouped_mm(a, b, offsets)
    return fallback(a, b, offs=offsets)


def swiglu_experts(
    x_sorted: torch.Tensor,
    offsets: torch.Tensor,
    row_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    matmul: GroupedMatmul,
) -> torch.Tensor:
    """``SwiGLUExperts.forward`` without autograd, its SwiGLU run on rows < offsets[-1] only.

    Each projection runs ``triton_experts.grouped_mm`` where it fits (Hopper, 16-bit,
    tile-aligned sizes: 128-row tiles instead of CUTLASS's 256-row clusters, so a group's
    padding is halved), else ``matmul``. Rows past offsets[-1] of the result are undefined.

    Args:
        x_sorted: float[M, D], rows grouped by expert.
        offsets: int32[E], end row of each expert's group.
        row_weights: float32[M], the routing weight of each row.
        w_gate_up: float[E, 2F, D]; w_down: float[E, D, F] (``SwiGLUExperts``' weights).
        matmul: the grouped matmul where ``triton_experts`` does not fit.
    """
    gate_up = expert_matmul(x_sorted, w_gate_up.transpose(-2, -1), offsets, matmul)
    hidden = triton_dispatch.swiglu_rows(gate_up, row_weights, offsets[-1:])
    return expert_matmul(hidden, w_down.transpose(-2, -1), offsets, matmul)


# ----------------------------------------------------------------------------- layer


def layer_matmul(flat: torch.Tensor, implementation: str) -> GroupedMatmul | None:
    """The grouped matmul of the layer's Triton forward, or None for the reference forward.

    The Triton forward (``dispatch``, ``swiglu_experts``, ``combine``) runs without autograd
    only; under "auto" on CUDA with Triton, under "triton" wherever Triton runs (it raises
    elsewhere).
    """
    if implementation == "reference" or torch.is_grad_enabled():
        return None
    if implementation == "triton":
        require_triton(flat.device)
    elif flat.device.type != "cuda" or not triton_dispatch.is_available(flat.device):
        return None
    return grouped_matmul(flat, implementation)


class ActivePairs(NamedTuple):
    """The executed token-expert pairs in expert order, as ``dispatch`` gathers them."""

    x_sorted: torch.Tensor
    """float[N*K, D]: the token of each executed pair; rows past offsets[-1] undefined."""
    row_weights: torch.Tensor
    """float32[N*K]: the routing weight of each sorted row."""
    offsets: torch.Tensor
    """int32[E]: end row of each expert's group; the last is the number of executed pairs."""
    pos: torch.Tensor
    """int64[N, K]: the sorted row of each (token, slot), -1 where the pair is not executed."""


class PairPlan(NamedTuple):
    """Where each executed token-expert pair goes in the expert-sorted rows."""

    src: torch.Tensor
    """int64[N*K]: the token of each sorted row; rows past offsets[-1] undefined."""
    row_weights: torch.Tensor
    """float32[N*K]: the routing weight of each sorted row."""
    offsets: torch.Tensor
    """int32[E]: end row of each expert's group; the last is the number of executed pairs."""
    pos: torch.Tensor
    """int64[N, K]: the sorted row of each (token, slot), -1 where the pair is not executed."""


def plan_pairs(
    expert_indices: torch.Tensor,
    dropped: torch.Tensor,
    expert_weights: torch.Tensor,
    num_experts: int,
) -> PairPlan:
    """The executed pairs grouped by expert, in the reference's row order (a stable sort by
    expert): ``triton_dispatch.plan``'s counting sort up to
    ``triton_dispatch.PLAN_MAX_EXPERTS`` experts, ``torch.sort`` beyond. No host sync.

    Args:
        expert_indices: int64[N, K], -1 padded; dropped: bool[N, K]; expert_weights:
            float32[N, K] (a ``RoutingDecision``'s fields).
        num_experts: E.
    """
    num_tokens, max_k = expert_indices.shape
    if num_experts <= triton_dispatch.PLAN_MAX_EXPERTS:
        return PairPlan(*triton_dispatch.plan(expert_indices, dropped, expert_weights, num_experts))
    active = ((expert_indices >= 0) & ~dropped).reshape(-1)
    key = torch.where(active, expert_indices.reshape(-1), num_experts)
    if num_experts < 256:  # uint8 keys: one 8-bit radix pass instead of eight
        key = key.to(torch.uint8)
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.arange(1, num_experts + 1, device=key.device, dtype=key.dtype)
    offsets = torch.searchsorted(sorted_key, bounds).to(torch.int32)
    src, row_weights = order // max_k, expert_weights.reshape(-1)[order]
    rows = torch.arange(order.shape[0], device=order.device)
    pos = (
        torch.empty_like(order)
        .index_copy_(0, order, torch.where(sorted_key < num_experts, rows, -1))
        .view(num_tokens, max_k)
    )  # sorted row of each (token, slot); -1 if inactive
    return PairPlan(src, row_weights, offsets, pos)


def dispatch(
    flat: torch.Tensor,
    expert_indices: torch.Tensor,
    dropped: torch.Tensor,
    expert_weights: torch.Tensor,
    num_experts: int,
) -> ActivePairs:
    """The executed pairs grouped by expert (``plan_pairs``), gathered in a Triton kernel
    that skips the others: rows past the active count are not gathered (undefined).

    Args:
        flat: float[N, D], the hidden states.
        expert_indices, dropped, expert_weights, num_experts: as ``plan_pairs``.
    """
    plan = plan_pairs(expert_indices, dropped, expert_weights, num_experts)
    x_sorted = triton_dispatch.gather_rows(flat.contiguous(), plan.src, plan.offsets[-1:])
    return ActivePairs(x_sorted, plan.row_weights, plan.offsets, plan.pos)


def combine(y_sorted: torch.Tensor, pos: torch.Tensor, nonfinite: torch.Tensor) -> torch.Tensor:
    """float[N, D]: each token's K weighted expert outputs summed (``triton_dispatch.combine``);
    NaN on the non-finite tokens."""
    return triton_dispatch.combine(y_sorted, pos, nonfinite)


# ----------------------------------------------------------------------------- training


def layer_train_matmul(flat: torch.Tensor, implementation: str) -> GroupedMatmul | None:
    """The differentiable grouped matmul of the layer's active-pair training path, or None
    for the padded PyTorch path.

    With autograd on, outside torch.compile (inductor fuses the padded path's ops itself):
    under "auto" on CUDA with Triton (``torch._grouped_mm`` for bfloat16 on sm90/sm100, the
    Triton grouped matmul otherwise), under "triton" wherever Triton runs (it raises
    elsewhere).
    """
    if implementation == "reference" or not torch.is_grad_enabled():
        return None
    if torch.compiler.is_compiling():
        return None
    if implementation == "triton":
        require_triton(flat.device)
    elif flat.device.type != "cuda" or not triton_dispatch.is_available(flat.device):
        return None
    return grouped_matmul(flat, implementation)


def train_dispatch(
    flat: torch.Tensor,
    expert_indices: torch.Tensor,
    dropped: torch.Tensor,
    expert_weights: torch.Tensor,
    num_experts: int,
) -> tuple[PairPlan, torch.Tensor, torch.Tensor]:
    """The training path's dispatch (``triton_train.Dispatch``): the plan, the active
    pairs' rows float[N*K, D] and their weights float32[N*K], both differentiable (towards
    ``flat`` and ``expert_weights``); rows past the active count are undefined.

    Args: as ``dispatch``.
    """
    plan = plan_pairs(expert_indices, dropped, expert_weights.detach(), num_experts)
    x_sorted, row_weights = triton_train.Dispatch.apply(  # type: ignore[no-untyped-call]
        flat, expert_weights, plan.src, plan.row_weights, plan.pos, plan.offsets[-1:]
    )
    return plan, x_sorted, row_weights


def train_experts(
    x_sorted: torch.Tensor,
    row_weights: torch.Tensor,
    plan: PairPlan,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    matmul: GroupedMatmul,
) -> torch.Tensor:
    """``SwiGLUExperts.forward`` on the active rows, differentiable: ``matmul`` (from
    ``layer_train_matmul``) for both projections, ``triton_train.SwiGLU`` between them.
    Rows past the active count of the result are undefined (nothing reads them).

    Args:
        x_sorted: float[M, D] and row_weights: float32[M], from ``train_dispatch``.
        plan: its plan.
        w_gate_up: float[E, 2F, D]; w_down: float[E, D, F] (``SwiGLUExperts``' weights).
        matmul: a differentiable grouped matmul.
    """
    gate_up = matmul(x_sorted, w_gate_up.transpose(-2, -1), offs=plan.offsets)  # [M, 2F]
    active = plan.offsets[-1:]
    hidden = triton_train.SwiGLU.apply(gate_up, row_weights, active)  # type: ignore[no-untyped-call]
    out: torch.Tensor = matmul(hidden, w_down.transpose(-2, -1), offs=plan.offsets)  # [M, D]
    return out


def train_combine(y_sorted: torch.Tensor, plan: PairPlan, nonfinite: torch.Tensor) -> torch.Tensor:
    """float[N, D]: each token's active rows summed (float32, one rounding), NaN on the
    non-finite tokens, differentiable (``triton_train.Combine``)."""
    out: torch.Tensor = triton_train.Combine.apply(  # type: ignore[no-untyped-call]
        y_sorted, plan.pos, nonfinite, plan.src, plan.offsets[-1:]
    )
    return out

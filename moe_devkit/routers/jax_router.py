"""Reference dynamic-k Mixture-of-Experts router and layer in JAX.

The same names, in the same order and with the same semantics as ``torch_router.py``, so the
two files can be read side by side: the routing decision record, small helpers (input checks,
k selection, capacity, auxiliary losses), the complexity estimator, the routers (dynamic and
static), the experts, the MoE layer and a small stack of MoE layers.

Shape letters: N tokens, E experts, K = max_k slots, D hidden, F expert hidden.

Design notes (differences from the PyTorch file, and why):
* Pure functions over an explicit parameter pytree. Each "module" is a small stateless class
  holding only static configuration, with ``init(key) -> params`` and
  ``__call__(params, hidden_states)``; ``jax.jit(layer)(params, x)`` compiles it. The
  parameter pytree mirrors the PyTorch ``state_dict`` key for key (nested dicts, a list for
  ``layers``) and keeps nn.Linear's [out, in] layout, so conversion is a rename-free copy
  (``moe_devkit.routers.convert``).
* Static shapes everywhere: k varies per token but the K = max_k slots are always there,
  padded with -1; capacity, counts and offsets are traced values, never Python ints.
* Dispatch is the PyTorch file's sort-based grouping: a stable argsort of the pairs by expert,
  then ``jax.lax.ragged_dot`` (a grouped matmul over expert-contiguous rows, static output
  shape [N*K, D]). On GPU/TPU XLA lowers it to a grouped GEMM; on CPU it is emulated at about
  the cost of running every expert on every row. Where ``ragged_dot`` is missing (old JAX)
  the experts fall back to a masked loop over experts (a static loop of E, not over tokens).
* The router runs in float32 whatever the model dtype, as in PyTorch (ST-MoE's selective
  precision). All matmuls use ``Precision.HIGHEST``: float32 is not rounded to TF32 on GPUs,
  as PyTorch does not by default.
* Gradient to the complexity estimator: the same straight-through soft slot mask
  ``hard + soft - stop_gradient(soft)``.
* ``nonfinite_policy="raise"`` raises ValueError when called eagerly; under ``jax.jit`` the
  check is a ``checkify.check``, so wrap the jitted function in ``checkify.checkify``
  (a traced value cannot raise a Python exception).
* Profiler spans are ``jax.named_scope("moe." + stage)`` (they name the HLO ops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from moe_devkit.config import RouterConfig

Params = dict[str, Any]
"""A parameter pytree: nested dicts of arrays (and a list of blocks in MoEModel)."""

STAGES: tuple[str, ...] = ("complexity", "gating", "select_k", "dispatch", "experts", "combine")
"""Routing stages, each wrapped in a ``jax.named_scope`` named ``"moe." + stage``."""


def span_name(stage: str) -> str:
    """Returns the profiler span name of a routing stage."""
    return f"moe.{stage}"


@dataclass(frozen=True)
class RoutingDecision:
    """What a router decided for N tokens (flattened over batch and sequence).

    A pytree (``batch_shape`` is static metadata), so it can leave a jitted function.

    Attributes:
        expert_indices: int32[N, K], selected experts in decreasing probability, -1 padded.
        expert_weights: float32[N, K], renormalised over the selected experts; 0 on padding
            and on pairs dropped by the capacity limit.
        k_per_token: int32[N], number of experts selected (0 for non-finite tokens).
        complexity: float32[N], the complexity score in [0, 1].
        router_logits: float32[N, E].
        router_probs: float32[N, E], softmax of router_logits.
        dropped: bool[N, K], selected pairs dropped by the capacity limit.
        nonfinite: bool[N], tokens whose input or logits were NaN/Inf (routed nowhere).
        load_balancing_loss: float32[], Switch loss E * sum_e f_e * P_e with variable k.
        z_loss: float32[], ST-MoE router z-loss mean(logsumexp(logits)^2).
        compute_loss: float32[], expected k / max_k (differentiable in "complexity" mode).
        aux_loss: float32[], the three losses weighted by the config's coefficients.
        batch_shape: leading shape of the input (e.g. (batch, seq)).

    Integers are int32 (JAX's default without x64); PyTorch's are int64.
    """

    expert_indices: jax.Array
    expert_weights: jax.Array
    k_per_token: jax.Array
    complexity: jax.Array
    router_logits: jax.Array
    router_probs: jax.Array
    dropped: jax.Array
    nonfinite: jax.Array
    load_balancing_loss: jax.Array
    z_loss: jax.Array
    compute_loss: jax.Array
    aux_loss: jax.Array
    batch_shape: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.expert_indices.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.router_logits.shape[-1])

    @property
    def max_k(self) -> int:
        return int(self.expert_indices.shape[-1])

    @property
    def active(self) -> jax.Array:
        """bool[N, K]: pairs that are selected and executed (not padding, not dropped)."""
        return (self.expert_indices >= 0) & ~self.dropped


_DATA_FIELDS = [
    "expert_indices", "expert_weights", "k_per_token", "complexity", "router_logits",
    "router_probs", "dropped", "nonfinite", "load_balancing_loss", "z_loss", "compute_loss",
    "aux_loss",
]  # fmt: skip
jax.tree_util.register_dataclass(
    RoutingDecision, data_fields=_DATA_FIELDS, meta_fields=["batch_shape"]
)


# ----------------------------------------------------------------------------- helpers


def flatten_tokens(hidden_states: object, hidden_size: int) -> tuple[jax.Array, tuple[int, ...]]:
    """Checks ``hidden_states`` and flattens it to [N, D].

    Args:
        hidden_states: float[batch, seq, D] or float[N, D] (a jax.Array or numpy array).
        hidden_size: the expected D.

    Returns:
        The [N, D] array and the leading batch shape.

    Raises:
        TypeError: not a floating-point array.
        ValueError: wrong rank, wrong hidden size or no tokens.
    """
    if isinstance(hidden_states, np.ndarray):
        hidden_states = jnp.asarray(hidden_states)
    if not isinstance(hidden_states, jax.Array):
        raise TypeError(f"hidden_states must be a jax.Array; got {type(hidden_states).__name__}")
    if not jnp.issubdtype(hidden_states.dtype, jnp.floating):
        raise TypeError(
            "hidden_states must be a floating-point array (float32, bfloat16 or float16); "
            f"got dtype={hidden_states.dtype}"
        )
    shape = tuple(hidden_states.shape)
    if len(shape) not in (2, 3):
        raise ValueError(
            "hidden_states must have shape [batch, seq, hidden] or [tokens, hidden]; "
            f"got shape {shape}"
        )
    if shape[-1] != hidden_size:
        raise ValueError(
            f"hidden_states last dimension must be hidden_size={hidden_size}; got shape {shape}"
        )
    if math.prod(shape) == 0:
        raise ValueError(f"hidden_states must hold at least one token; got shape {shape}")
    return hidden_states.reshape(-1, hidden_size), shape[:-1]  # [N, D]


def _find_nonfinite(router_logits: jax.Array, policy: str) -> jax.Array:
    """bool[N]: tokens whose input or logits hold NaN/Inf; raises under policy "raise".

    Only the logits are scanned ([N, E], not [N, D]): every logit sums over every input
    feature, and NaN * w and Inf * 0 are NaN, so a non-finite input always gives a non-finite
    logit row.
    """
    nonfinite = ~jnp.isfinite(router_logits).all(axis=-1)
    if policy != "raise":
        return nonfinite
    message = (
        "hidden_states must be finite; got {count} token(s) with NaN/Inf, first at "
        "flattened token index {first} (set nonfinite_policy='mask' to route them nowhere)"
    )
    count, first = nonfinite.sum(), jnp.argmax(nonfinite)
    try:
        bad = bool(nonfinite.any())
    except jax.errors.ConcretizationTypeError:  # traced: functionalised by checkify
        checkify.check(~nonfinite.any(), message, count=count, first=first)
        return nonfinite
    if bad:
        raise ValueError(message.format(count=int(count), first=int(first)))
    return nonfinite


def normalized_entropy(router_probs: jax.Array) -> jax.Array:
    """float32[N]: entropy of each row of router_probs divided by log(E), in [0, 1]."""
    num_experts = router_probs.shape[-1]
    if num_experts == 1:
        return jnp.zeros_like(router_probs[:, 0])
    entropy = -(router_probs * jnp.log(jnp.maximum(router_probs, 1e-30))).sum(axis=-1)
    return entropy / math.log(num_experts)


def slot_positions(max_k: int) -> jax.Array:
    """int32[1, K]: the slot number j of each of the K selection slots."""
    return jnp.arange(max_k)[None, :]


def k_from_complexity(complexity: jax.Array, min_k: int, max_k: int) -> jax.Array:
    """int32[N]: k = min_k + floor(c * (max_k - min_k + 1)), clamped to [min_k, max_k].

    Equal-width bins of the score: c in [0, 1/(R+1)) gives min_k, the top bin gives max_k.
    """
    span = max_k - min_k + 1
    steps = jnp.floor(jnp.nan_to_num(complexity, nan=0.0) * span).astype(jnp.int32)
    return jnp.clip(min_k + steps, min_k, max_k)


def soft_slot_mask(complexity: jax.Array, min_k: int, max_k: int, temperature: float) -> jax.Array:
    """float32[N, K]: differentiable relaxation of ``j < k_from_complexity(c)``."""
    slots = slot_positions(max_k)  # [1, K]
    span = max_k - min_k + 1
    margin = complexity[:, None] * span - (slots - min_k + 1)  # [N, K]
    soft = jax.nn.sigmoid(margin / temperature)
    return jnp.where(slots < min_k, jnp.ones_like(soft), soft)


def k_from_top_p(sorted_probs: jax.Array, top_p: float, min_k: int) -> jax.Array:
    """int32[N]: smallest k whose top-k probability mass reaches top_p, within [min_k, K].

    Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models".

    Args:
        sorted_probs: float32[N, K], the K = max_k largest probabilities, decreasing.
    """
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # [N, K] exclusive
    k = (mass_before < top_p).sum(axis=-1, dtype=jnp.int32)
    return jnp.clip(k, min_k, sorted_probs.shape[-1])


def count_values(values: jax.Array, num_bins: int) -> jax.Array:
    """int32[num_bins]: occurrences of each integer value in [0, num_bins); others ignored.

    A scatter-add (XLA's segment sum); values outside the range go to a dropped bin (JAX
    would otherwise wrap negative indices). PyTorch uses ``histc`` for its GPU contention.
    """
    flat = values.reshape(-1)
    bins = jnp.where((flat >= 0) & (flat < num_bins), flat, num_bins)
    return jnp.zeros(num_bins, jnp.int32).at[bins].add(1, mode="drop")


def group_offsets(sorted_keys: jax.Array, num_groups: int) -> jax.Array:
    """int32[G]: end position of each group g in keys sorted ascending (binary search)."""
    bounds = jnp.arange(1, num_groups + 1, dtype=sorted_keys.dtype)
    return jnp.searchsorted(sorted_keys, bounds).astype(jnp.int32)


def capacity_dropped(
    expert_indices: jax.Array, num_experts: int, capacity_factor: float
) -> jax.Array:
    """bool[N, K]: selected pairs beyond each expert's capacity.

    Capacity = ceil(capacity_factor * (number of selected pairs) / E), a traced value.
    Priority: all first choices before any second choice, then token order (Switch).
    """
    num_tokens, max_k = expert_indices.shape
    selected = expert_indices >= 0
    key = jnp.where(selected, expert_indices, num_experts).T.reshape(-1)  # [K*N] slot-major
    order = jnp.argsort(key, stable=True)
    sorted_key = key[order]
    ends = group_offsets(sorted_key, num_experts + 1)  # [E+1]
    starts = jnp.concatenate([jnp.zeros(1, ends.dtype), ends[:-1]])
    rank_sorted = jnp.arange(key.shape[0]) - starts[sorted_key]
    rank = jnp.zeros_like(rank_sorted).at[order].set(rank_sorted)  # [K*N]
    rank = rank.reshape(max_k, num_tokens).T  # [N, K]
    capacity = jnp.ceil(capacity_factor * selected.sum().astype(jnp.float32) / num_experts)
    return selected & (rank >= capacity)


def expert_counts(expert_indices: jax.Array, num_experts: int) -> jax.Array:
    """int32[E]: how often each expert was selected; -1 padding is ignored."""
    return count_values(expert_indices, num_experts)


def load_balancing_loss(
    router_probs: jax.Array, expert_indices: jax.Array, token_mask: jax.Array | None = None
) -> jax.Array:
    """float32[]: Switch load-balancing loss E * sum_e f_e * P_e (Fedus et al. 2021).

    f_e = (selections of e) / N counts every selected slot, so a token with larger k weighs
    more; see the PyTorch file for the static top-k equivalence.

    Args:
        router_probs: float32[N, E].
        expert_indices: int[N, K], -1 padded.
        token_mask: bool[N], tokens to count (default all).
    """
    num_experts = router_probs.shape[-1]
    if token_mask is None:
        token_mask = jnp.ones(router_probs.shape[0], dtype=bool)
    num_valid = jnp.maximum(token_mask.sum(), 1).astype(router_probs.dtype)
    indices = jnp.where(token_mask[:, None], expert_indices, -1)
    fraction = expert_counts(indices, num_experts).astype(router_probs.dtype) / num_valid
    probs = jnp.where(token_mask[:, None], router_probs, 0.0)
    mean_prob = probs.sum(axis=0) / num_valid
    return num_experts * jnp.sum(fraction * mean_prob)


def router_z_loss(router_logits: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """float32[]: ST-MoE router z-loss, mean over tokens of logsumexp(logits)^2."""
    if token_mask is None:
        return jnp.square(jax.nn.logsumexp(router_logits, axis=-1)).mean()
    logits = jnp.where(token_mask[:, None], router_logits, 0.0)
    z = jnp.square(jax.nn.logsumexp(logits, axis=-1))
    return jnp.where(token_mask, z, 0.0).sum() / jnp.maximum(token_mask.sum(), 1)


_FULL = jax.lax.Precision.HIGHEST
"""Every matmul here: float32 stays float32 on GPUs (XLA's default rounds float32 inputs to
TF32 there; PyTorch does not unless asked), so the two implementations agree to float32
rounding; 16-bit inputs are unaffected."""


def _linear(params: Params, x: jax.Array) -> jax.Array:
    """nn.Linear: x @ weight.T + bias, weight in [out, in] layout (full float32 precision)."""
    out: jax.Array = jnp.matmul(x, params["weight"].T, precision=_FULL)
    return out + params["bias"] if "bias" in params else out


def _init_linear(key: jax.Array, out_size: int, in_size: int, *, bias: bool) -> Params:
    """nn.Linear's default initialisation: U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(in_size)
    wkey, bkey = jax.random.split(key)
    params = {"weight": jax.random.uniform(wkey, (out_size, in_size), minval=-bound, maxval=bound)}
    if bias:
        params["bias"] = jax.random.uniform(bkey, (out_size,), minval=-bound, maxval=bound)
    return params


# ----------------------------------------------------------------------------- routers


class ComplexityEstimator:
    """Small MLP giving each token a complexity score in [0, 1]."""

    def __init__(self, hidden_size: int, inner_size: int) -> None:
        self.hidden_size, self.inner_size = hidden_size, inner_size

    def init(self, key: jax.Array) -> Params:
        """{"fc1": {"weight": [F_c, D], "bias"}, "fc2": {"weight": [1, F_c], "bias"}}."""
        k1, k2 = jax.random.split(key)
        return {
            "fc1": _init_linear(k1, self.inner_size, self.hidden_size, bias=True),
            "fc2": _init_linear(k2, 1, self.inner_size, bias=True),
        }

    def __call__(self, params: Params, hidden_states: jax.Array) -> jax.Array:
        """float[N, D] -> float32[N]."""
        x = hidden_states.astype(params["fc1"]["weight"].dtype)
        hidden = jax.nn.gelu(_linear(params["fc1"], x), approximate=False)  # torch's exact GELU
        return jax.nn.sigmoid(_linear(params["fc2"], hidden).astype(jnp.float32))[:, 0]


class _RouterBase:
    """Router network and the decision assembly shared by the dynamic and static routers."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config

    def init(self, key: jax.Array) -> Params:
        """{"router_network": {"weight": float32[E, D]}}."""
        cfg = self.config
        return {"router_network": _init_linear(key, cfg.num_experts, cfg.hidden_size, bias=False)}

    def __call__(self, params: Params, hidden_states: jax.Array) -> RoutingDecision:
        raise NotImplementedError  # DynamicMoERouter and StaticTopKRouter define it

    def _gate(self, params: Params, flat: jax.Array) -> tuple[jax.Array, jax.Array]:
        """float[N, D] -> float32 router_logits[N, E] and router_probs[N, E]."""
        weight = params["router_network"]["weight"].astype(jnp.float32)
        # HIGHEST: on a GPU, XLA's default float32 matmul rounds its inputs to TF32 (about
        # 1e-4 relative error in the logits, enough to flip near-tied experts).
        router_logits = jnp.matmul(flat.astype(jnp.float32), weight.T, precision=_FULL)
        return router_logits, jax.nn.softmax(router_logits, axis=-1)

    def _decide(
        self,
        *,
        flat: jax.Array,
        batch_shape: tuple[int, ...],
        router_logits: jax.Array,
        router_probs: jax.Array,
        top_probs: jax.Array,
        top_indices: jax.Array,
        k_per_token: jax.Array,
        slot_gate: jax.Array,
        complexity: jax.Array,
    ) -> RoutingDecision:
        """Masks, weights, capacity and losses from the chosen k (all traced)."""
        cfg = self.config
        nonfinite = _find_nonfinite(router_logits, cfg.nonfinite_policy)
        finite = ~nonfinite
        k_per_token = jnp.where(nonfinite, 0, k_per_token)
        max_k = top_indices.shape[-1]
        hard = slot_positions(max_k) < k_per_token[:, None]  # [N, K]
        expert_indices = jnp.where(hard, top_indices, -1)
        gate = jnp.where(hard, slot_gate, 0.0)  # hard is all False on non-finite tokens
        masked = jnp.where(finite[:, None], top_probs, 0.0) * gate  # [N, K]
        expert_weights = masked / jnp.maximum(masked.sum(axis=-1, keepdims=True), 1e-20)
        if cfg.capacity_factor is None:
            dropped = jnp.zeros_like(hard)
        else:
            dropped = capacity_dropped(expert_indices, cfg.num_experts, cfg.capacity_factor)
            expert_weights = jnp.where(dropped, 0.0, expert_weights)
        lb_loss = load_balancing_loss(router_probs, expert_indices, finite)
        z_loss = router_z_loss(router_logits, finite)
        expected_k = jnp.where(finite, gate.sum(axis=-1), 0.0)
        compute_loss = expected_k.sum() / jnp.maximum(finite.sum(), 1) / max_k
        aux_loss = (
            cfg.load_balance_coef * lb_loss
            + cfg.z_loss_coef * z_loss
            + cfg.compute_cost_coef * compute_loss
        )
        return RoutingDecision(
            expert_indices=expert_indices,
            expert_weights=expert_weights,
            k_per_token=k_per_token,
            complexity=complexity,
            router_logits=router_logits,
            router_probs=router_probs,
            dropped=dropped,
            nonfinite=nonfinite,
            load_balancing_loss=lb_loss,
            z_loss=z_loss,
            compute_loss=compute_loss,
            aux_loss=aux_loss,
            batch_shape=batch_shape,
        )


class DynamicMoERouter(_RouterBase):
    """Routes each token to a data-dependent number of experts k in [min_k, max_k].

    Mode "complexity": a learned complexity estimator scores each token and ``compute_k``
    maps the score to k. Mode "top_p": k is the smallest number of experts whose softmax
    mass reaches ``top_p`` (capped at max_k); the complexity reported is the normalised
    entropy of the router distribution, and no estimator is built.
    """

    def __init__(self, config: RouterConfig) -> None:
        super().__init__(config)
        self.complexity_estimator: ComplexityEstimator | None = (
            ComplexityEstimator(config.hidden_size, config.complexity_hidden_size)
            if config.mode == "complexity"
            else None
        )

    def init(self, key: jax.Array) -> Params:
        """The router network, plus "complexity_estimator" in "complexity" mode."""
        gate_key, estimator_key = jax.random.split(key)
        params = super().init(gate_key)
        if self.complexity_estimator is not None:
            params["complexity_estimator"] = self.complexity_estimator.init(estimator_key)
        return params

    def compute_k(self, complexity: jax.Array) -> jax.Array:
        """Maps complexity float32[N] in [0, 1] to int32[N] k in [min_k, max_k]."""
        return k_from_complexity(complexity, self.config.min_k, self.config.max_k)

    def __call__(self, params: Params, hidden_states: jax.Array) -> RoutingDecision:
        """Routes float[..., D] hidden states; see RoutingDecision for the outputs."""
        cfg = self.config
        flat, batch_shape = flatten_tokens(hidden_states, cfg.hidden_size)
        with jax.named_scope(span_name("complexity")):
            estimated = (
                self.complexity_estimator(params["complexity_estimator"], flat)
                if self.complexity_estimator is not None
                else None
            )
        with jax.named_scope(span_name("gating")):
            router_logits, router_probs = self._gate(params, flat)
            top_probs, top_indices = jax.lax.top_k(router_probs, cfg.max_k)  # [N, K] sorted
        with jax.named_scope(span_name("select_k")):
            if estimated is not None:
                complexity = estimated
                k_per_token = self.compute_k(complexity)
                soft = soft_slot_mask(complexity, cfg.min_k, cfg.max_k, cfg.k_temperature)
                hard = slot_positions(cfg.max_k) < k_per_token[:, None]
                slot_gate = hard.astype(jnp.float32) + soft - jax.lax.stop_gradient(soft)
            else:
                complexity = normalized_entropy(router_probs)
                k_per_token = k_from_top_p(top_probs, cfg.top_p, cfg.min_k)
                slot_gate = jnp.ones_like(top_probs)
            return self._decide(
                flat=flat,
                batch_shape=batch_shape,
                router_logits=router_logits,
                router_probs=router_probs,
                top_probs=top_probs,
                top_indices=top_indices,
                k_per_token=k_per_token,
                slot_gate=slot_gate,
                complexity=complexity,
            )


class StaticTopKRouter(_RouterBase):
    """Fixed top-k router (k = config.max_k unless given): the baseline for dynamic routing.

    Its ``complexity`` is the normalised entropy of the router distribution.
    """

    def __init__(self, config: RouterConfig, k: int | None = None) -> None:
        super().__init__(config)
        k = config.max_k if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= config.num_experts:
            raise ValueError(
                f"k must be an int in [1, num_experts={config.num_experts}]; got k={k!r}"
            )
        self.k = k

    def __call__(self, params: Params, hidden_states: jax.Array) -> RoutingDecision:
        """Routes float[..., D] hidden states to exactly k experts each."""
        flat, batch_shape = flatten_tokens(hidden_states, self.config.hidden_size)
        with jax.named_scope(span_name("gating")):
            router_logits, router_probs = self._gate(params, flat)
            top_probs, top_indices = jax.lax.top_k(router_probs, self.k)  # [N, k] sorted
        with jax.named_scope(span_name("select_k")):
            k_per_token = jnp.full_like(top_indices[:, 0], self.k)
            return self._decide(
                flat=flat,
                batch_shape=batch_shape,
                router_logits=router_logits,
                router_probs=router_probs,
                top_probs=top_probs,
                top_indices=top_indices,
                k_per_token=k_per_token,
                slot_gate=jnp.ones_like(top_probs),
                complexity=normalized_entropy(router_probs),
            )


# ----------------------------------------------------------------------------- experts

HAS_RAGGED_DOT: bool = hasattr(jax.lax, "ragged_dot")
"""Whether this JAX has ``jax.lax.ragged_dot`` (the grouped matmul the experts use)."""


class SwiGLUExperts:
    """E SwiGLU feed-forward experts, run as grouped matmuls over expert-sorted rows.

    Weights follow nn.Linear's [out, in] layout per expert (as in PyTorch);
    ``ragged_dot`` reads them transposed to [E, in, out].

    Args:
        implementation: "ragged_dot" (default where available) or "dense" (a masked loop
            over the E experts, each run on all rows: E times the FLOPs, for old JAX).
    """

    def __init__(
        self, num_experts: int, hidden_size: int, inner_size: int, implementation: str = "auto"
    ) -> None:
        if implementation not in ("auto", "ragged_dot", "dense"):
            raise ValueError(
                "implementation must be 'auto', 'ragged_dot' or 'dense'; "
                f"got implementation={implementation!r}"
            )
        self.num_experts, self.hidden_size, self.inner_size = num_experts, hidden_size, inner_size
        auto = "ragged_dot" if HAS_RAGGED_DOT else "dense"
        self.implementation = auto if implementation == "auto" else implementation

    def init(self, key: jax.Array) -> Params:
        """{"w_gate_up": float32[E, 2F, D], "w_down": float32[E, D, F]}, normal init."""
        e, d, f = self.num_experts, self.hidden_size, self.inner_size
        k1, k2 = jax.random.split(key)
        return {
            "w_gate_up": jax.random.normal(k1, (e, 2 * f, d)) * d**-0.5,
            "w_down": jax.random.normal(k2, (e, d, f)) * f**-0.5,
        }

    def __call__(
        self, params: Params, x_sorted: jax.Array, offsets: jax.Array, row_weights: jax.Array
    ) -> jax.Array:
        """Runs expert e on rows [offsets[e-1], offsets[e]) of x_sorted, scaled per row.

        Args:
            x_sorted: float[M, D], rows grouped by expert; rows past offsets[-1] are ignored
                (their outputs are undefined).
            offsets: int32[E], end row of each expert's group (cumulative counts).
            row_weights: float32[M], the routing weight of each row's token-expert pair,
                applied to the F-wide activation before the down projection.

        Returns:
            float[M, D]: ``weight * expert(x)`` per row.
        """
        if self.implementation == "ragged_dot":
            return self._grouped(params, x_sorted, offsets, row_weights)
        return self._dense(params, x_sorted, offsets, row_weights)

    def _grouped(
        self, params: Params, x_sorted: jax.Array, offsets: jax.Array, row_weights: jax.Array
    ) -> jax.Array:
        group_sizes = jnp.diff(offsets, prepend=0).astype(jnp.int32)  # [E]
        w_gate_up = jnp.swapaxes(params["w_gate_up"], -2, -1)  # [E, D, 2F]
        gate_up = jax.lax.ragged_dot(x_sorted, w_gate_up, group_sizes, precision=_FULL)  # [M, 2F]
        gate, up = jnp.split(gate_up, 2, axis=-1)  # [M, F] each
        hidden = jax.nn.silu(gate) * up * row_weights[:, None].astype(up.dtype)
        w_down = jnp.swapaxes(params["w_down"], -2, -1)  # [E, F, D]
        return jax.lax.ragged_dot(hidden, w_down, group_sizes, precision=_FULL)  # [M, D]

    def _dense(
        self, params: Params, x_sorted: jax.Array, offsets: jax.Array, row_weights: jax.Array
    ) -> jax.Array:
        rows = jnp.arange(x_sorted.shape[0])
        out = jnp.zeros_like(x_sorted)
        start = jnp.zeros((), offsets.dtype)
        for expert in range(self.num_experts):  # static loop over experts, not tokens
            end = offsets[expert]
            gate_up = jnp.matmul(x_sorted, params["w_gate_up"][expert].T, precision=_FULL)
            gate, up = jnp.split(gate_up, 2, axis=-1)
            scale = row_weights[:, None].astype(up.dtype)
            hidden = jax.nn.silu(gate) * up * scale
            y = jnp.matmul(hidden, params["w_down"][expert].T, precision=_FULL)
            out = jnp.where(((rows >= start) & (rows < end))[:, None], y, out)
            start = end
        return out


# ----------------------------------------------------------------------------- layer


class MoEOutput(NamedTuple):
    """Output of MoELayer: the layer output, same shape as its input, and the routing."""

    hidden_states: jax.Array
    routing: RoutingDecision


class MoELayer:
    """Router + E SwiGLU experts + sort-based dispatch and a slot-order combine.

    Args:
        config: the router configuration.
        router: a router to use instead of ``DynamicMoERouter(config)`` (e.g. a
            ``StaticTopKRouter`` for the baseline).
        implementation: the experts' matmul ("auto", "ragged_dot" or "dense").
    """

    def __init__(
        self, config: RouterConfig, router: _RouterBase | None = None, implementation: str = "auto"
    ) -> None:
        self.config = config
        self.router = router if router is not None else DynamicMoERouter(config)
        self.experts = SwiGLUExperts(
            config.num_experts, config.hidden_size, config.expert_hidden_size, implementation
        )

    def init(self, key: jax.Array) -> Params:
        """{"router": ..., "experts": ...}."""
        router_key, experts_key = jax.random.split(key)
        return {"router": self.router.init(router_key), "experts": self.experts.init(experts_key)}

    def __call__(self, params: Params, hidden_states: jax.Array) -> MoEOutput:
        """float[..., D] -> MoEOutput with float[..., D] hidden states."""
        routing = self.router(params["router"], hidden_states)
        flat = jnp.asarray(hidden_states).reshape(-1, self.config.hidden_size)  # [N, D]
        expert_dtype = params["experts"]["w_down"].dtype
        if flat.dtype != expert_dtype:
            raise TypeError(
                f"hidden_states dtype must match the experts' dtype {expert_dtype}; "
                f"got dtype={flat.dtype} (cast the input or the parameters)"
            )
        num_experts, num_tokens, max_k = self.config.num_experts, flat.shape[0], routing.max_k
        with jax.named_scope(span_name("dispatch")):
            active = routing.active.reshape(-1)  # [N*K]
            key = jnp.where(active, routing.expert_indices.reshape(-1), num_experts)
            order = jnp.argsort(key, stable=True)  # [N*K], pairs grouped by expert
            sorted_key = key[order]
            offsets = group_offsets(sorted_key, num_experts)  # [E]
            active_sorted = sorted_key < num_experts
            # Inactive rows (padding, drops) read and write a spare row N, as in PyTorch:
            # rows past offsets[-1] of a grouped matmul are undefined there.
            token_of_pair = jnp.where(active_sorted, order // max_k, num_tokens)
            x_sorted = jnp.pad(flat, ((0, 1), (0, 0)))[token_of_pair]  # [N*K, D]
            # where, not a product: it also stops the padding rows' gradients.
            row_weights = jnp.where(active_sorted, routing.expert_weights.reshape(-1)[order], 0.0)
        with jax.named_scope(span_name("experts")):
            y_sorted = self.experts(params["experts"], x_sorted, offsets, row_weights)  # [N*K, D]
        with jax.named_scope(span_name("combine")):
            # Back to (token, slot) order, then sum the K slots in float32.
            pair_of_row = jnp.where(active_sorted, order, num_tokens * max_k)
            by_pair = jnp.zeros((num_tokens * max_k + 1, flat.shape[-1]), y_sorted.dtype)
            by_pair = by_pair.at[pair_of_row].set(y_sorted)
            by_pair = by_pair[:-1].reshape(num_tokens, max_k, -1)  # [N, K, D]
            out = by_pair.sum(axis=1, dtype=jnp.float32)  # [N, D]
            # inf * 0 makes NaN only on non-finite tokens: a literal NaN operand would trip
            # jax_debug_nans on every call, even when every token is finite.
            poison = jnp.where(routing.nonfinite, jnp.inf, 0.0) * 0.0
            out = out + poison[:, None].astype(out.dtype)
        return MoEOutput(out.astype(flat.dtype).reshape(hidden_states.shape), routing)


# ----------------------------------------------------------------------------- model


class MoEModelOutput(NamedTuple):
    """Output of MoEModel: final hidden states, one routing per layer, summed aux loss."""

    hidden_states: jax.Array
    routings: tuple[RoutingDecision, ...]
    aux_loss: jax.Array


class MoEBlock:
    """Pre-norm residual block: x + MoE(RMSNorm(x))."""

    def __init__(self, config: RouterConfig, implementation: str = "auto") -> None:
        self.config = config
        self.moe = MoELayer(config, implementation=implementation)

    def init(self, key: jax.Array) -> Params:
        """{"norm": {"weight": float32[D]}, "moe": ...}."""
        return {"norm": {"weight": jnp.ones(self.config.hidden_size)}, "moe": self.moe.init(key)}

    def __call__(self, params: Params, hidden_states: jax.Array) -> MoEOutput:
        moe_out = self.moe(params["moe"], _rms_norm(params["norm"], hidden_states))
        return MoEOutput(hidden_states + moe_out.hidden_states, moe_out.routing)


def _rms_norm(params: Params, x: jax.Array) -> jax.Array:
    """nn.RMSNorm with eps=None: eps is the input dtype's machine epsilon."""
    eps = float(jnp.finfo(x.dtype).eps)  # type: ignore[no-untyped-call]
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)  # [..., 1]
    out: jax.Array = x * inv_rms * params["weight"].astype(x.dtype)
    return out


class MoEModel:
    """A stack of MoE blocks, the reference model the devkit's tools are tried on."""

    def __init__(self, config: RouterConfig, num_layers: int = 2, implementation: str = "auto"):
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1; got num_layers={num_layers!r}")
        self.config = config
        self.layers = [MoEBlock(config, implementation) for _ in range(num_layers)]

    def init(self, key: jax.Array) -> Params:
        """{"layers": [block params, ...]}."""
        keys = jax.random.split(key, len(self.layers))
        return {"layers": [layer.init(k) for layer, k in zip(self.layers, keys, strict=True)]}

    def __call__(self, params: Params, hidden_states: jax.Array) -> MoEModelOutput:
        routings: list[RoutingDecision] = []
        for layer, layer_params in zip(self.layers, params["layers"], strict=True):
            hidden_states, routing = layer(layer_params, hidden_states)
            routings.append(routing)
        aux_loss = jnp.stack([r.aux_loss for r in routings]).sum()
        return MoEModelOutput(hidden_states, tuple(routings), aux_loss)

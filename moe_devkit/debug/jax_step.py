"""One training step of the reference JAX MoEModel, laid out for a debugger.

``python -m moe_devkit.debug.jax_step --platform cpu|gpu`` (the "JAX model" configuration of
``.vscode/launch.json``). Before JAX loads, the debugging environment is set: jit disabled
(every op runs eagerly on concrete arrays, so a breakpoint inside the router stops with real
values), NaN checking on, traceback filtering off, no GPU memory preallocation, and
``JAX_PLATFORMS`` from ``--platform`` (values already set win). ``jax.config`` gets the same
switches once JAX is imported.

Each phase is its own statement with its result in a named local, so a breakpoint on any
line of ``train_step`` sees the batch, the routing decisions, the losses or the gradients.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from moe_devkit.debug.switches import (
    JAX_PLATFORMS,
    add_model_arguments,
    apply_env,
    configure_jax,
    jax_env,
)

if TYPE_CHECKING:
    import jax

    from moe_devkit.routers.jax_router import MoEModel, RoutingDecision

logger = logging.getLogger(__name__)

Params = Any  # the router's parameter pytree (nested dicts of arrays)


class StepResult(NamedTuple):
    """What one training step produced."""

    loss: jax.Array
    task_loss: jax.Array
    aux_loss: jax.Array
    grad_norm: jax.Array
    routings: tuple[RoutingDecision, ...]
    params: Params


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options of the debug step (a tiny model by default, so each line is quick to step)."""
    parser = argparse.ArgumentParser(prog="python -m moe_devkit.debug.jax_step")
    parser.add_argument("--platform", choices=sorted(JAX_PLATFORMS), default="cpu")
    add_model_arguments(parser)
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace) -> tuple[MoEModel, Params]:
    """The reference JAX MoEModel of ``args``' sizes and its initial parameters."""
    import jax

    from moe_devkit.config import RouterConfig
    from moe_devkit.routers.jax_router import MoEModel

    config = RouterConfig(
        hidden_size=args.hidden_size,
        num_experts=args.num_experts,
        max_k=args.max_k,
        expert_hidden_size=2 * args.hidden_size,
        complexity_hidden_size=max(args.hidden_size // 4, 1),
    )
    model = MoEModel(config, num_layers=args.layers)
    return model, model.init(jax.random.PRNGKey(args.seed))


def train_step(model: MoEModel, params: Params, hidden_states: jax.Array) -> StepResult:
    """Loss, gradients and an SGD update, one named phase per statement."""
    import jax
    import jax.numpy as jnp

    def loss_fn(p: Params) -> tuple[jax.Array, tuple[jax.Array, jax.Array, Any]]:
        output = model(p, hidden_states)
        task_loss = jnp.mean(jnp.square(output.hidden_states.astype(jnp.float32)))
        loss = task_loss + output.aux_loss
        return loss, (task_loss, output.aux_loss, output.routings)

    (loss, (task_loss, aux_loss, routings)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params
    )
    leaves = jax.tree_util.tree_leaves(grads)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in leaves))
    new_params = jax.tree_util.tree_map(lambda p, g: p - 1e-2 * g, params, grads)
    return StepResult(loss, task_loss, aux_loss, grad_norm, tuple(routings), new_params)


def run(args: argparse.Namespace) -> StepResult:
    """Builds the model and a random batch and runs one step under the debug switches."""
    import jax

    configure_jax(args.platform)
    model, params = build_model(args)
    key = jax.random.PRNGKey(args.seed + 1)
    shape = (args.batch, args.seq, args.hidden_size)
    hidden_states = jax.random.normal(key, shape)  # [batch, seq, D]
    return train_step(model, params, hidden_states)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one debug step; returns 0."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    apply_env(jax_env(args.platform))  # before the first jax import
    result = run(args)
    mean_k = [float(r.k_per_token.mean()) for r in result.routings]
    logger.info("loss %.6f, grad norm %.4f, mean k per layer %s",
                float(result.loss), float(result.grad_norm), mean_k)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The JAX reference router against the PyTorch one: same weights, same routing, same outputs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")  # the jax extra is optional; CI installs it
import jax.numpy as jnp  # noqa: E402
from jax.experimental import checkify  # noqa: E402

from moe_devkit.config import RouterConfig  # noqa: E402
from moe_devkit.routers import jax_router as jr  # noqa: E402
from moe_devkit.routers import torch_router as tr  # noqa: E402
from moe_devkit.routers.convert import (  # noqa: E402
    decision_to_jax,
    decision_to_torch,
    jax_to_torch,
    tensor_to_jax,
    torch_to_jax,
)


def tiny_config(**overrides: object) -> RouterConfig:
    base: dict[str, object] = dict(
        hidden_size=16, num_experts=6, min_k=1, max_k=3, expert_hidden_size=24
    )
    base.update(overrides)
    return RouterConfig(**base)  # type: ignore[arg-type]


def tokens(seed: int = 0, shape: tuple[int, ...] = (2, 24, 16)) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2
    return x


def assert_same_routing(t: tr.RoutingDecision, j: jr.RoutingDecision) -> None:
    assert np.asarray(j.expert_indices).tolist() == t.expert_indices.tolist()
    assert np.asarray(j.k_per_token).tolist() == t.k_per_token.tolist()
    assert np.asarray(j.dropped).tolist() == t.dropped.tolist()
    assert np.asarray(j.nonfinite).tolist() == t.nonfinite.tolist()
    for name in ("expert_weights", "complexity", "router_probs"):
        np.testing.assert_allclose(np.asarray(getattr(j, name)), getattr(t, name), atol=2e-6)
    for name in ("load_balancing_loss", "z_loss", "compute_loss", "aux_loss"):
        np.testing.assert_allclose(float(getattr(j, name)), float(getattr(t, name)), rtol=1e-5)
    assert j.batch_shape == t.batch_shape


# --------------------------------------------------------------------- layer parity


@pytest.mark.parametrize(
    ("mode", "capacity_factor"),
    [("complexity", None), ("complexity", 1.0), ("top_p", None), ("top_p", 0.75)],
)
def test_layer_matches_torch_with_the_same_weights(
    mode: str, capacity_factor: float | None
) -> None:
    config = tiny_config(mode=mode, capacity_factor=capacity_factor)
    torch.manual_seed(0)
    torch_layer = tr.MoELayer(config)
    x = tokens()
    x[1, 5, 3] = float("nan")  # one masked token
    with torch.no_grad():
        expected = torch_layer(x)
        reference = torch_layer.double()(x.double()).hidden_states  # float64 reference
    out = jax.jit(jr.MoELayer(config))(torch_to_jax(torch_layer.float()), tensor_to_jax(x))
    assert_same_routing(expected.routing, out.routing)
    got = np.asarray(out.hidden_states)
    np.testing.assert_allclose(got, expected.hidden_states.numpy(), atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(got, reference.numpy(), atol=2e-6, rtol=1e-5)
    assert np.isnan(got[1, 5]).all() and np.isfinite(np.delete(got.reshape(-1, 16), 29, 0)).all()


def test_model_and_static_router_match_torch() -> None:
    config = tiny_config()
    torch.manual_seed(1)
    model = tr.MoEModel(config, num_layers=2)
    static = tr.StaticTopKRouter(config, k=2)
    x = tokens(1)
    with torch.no_grad():
        expected, expected_static = model(x), static(x)
    out = jax.jit(jr.MoEModel(config, num_layers=2))(torch_to_jax(model), tensor_to_jax(x))
    for t, j in zip(expected.routings, out.routings, strict=True):
        assert_same_routing(t, j)
    np.testing.assert_allclose(
        np.asarray(out.hidden_states), expected.hidden_states.numpy(), atol=1e-5, rtol=1e-5
    )
    np.testing.assert_allclose(float(out.aux_loss), float(expected.aux_loss), rtol=1e-5)
    got_static = jax.jit(jr.StaticTopKRouter(config, k=2))(torch_to_jax(static), tensor_to_jax(x))
    assert_same_routing(expected_static, got_static)
    assert (np.asarray(got_static.k_per_token) == 2).all()


def test_gradients_match_torch_including_the_straight_through_mask() -> None:
    config = tiny_config()
    torch.manual_seed(2)
    torch_layer = tr.MoELayer(config)
    x = tokens(2, (32, 16))
    out = torch_layer(x)
    (out.hidden_states.square().sum() + out.routing.aux_loss).backward()
    layer = jr.MoELayer(config)

    def loss(params: dict, hidden: jax.Array) -> jax.Array:
        out = layer(params, hidden)
        return jnp.square(out.hidden_states).sum() + out.routing.aux_loss

    grads = jax.jit(jax.grad(loss))(torch_to_jax(torch_layer), tensor_to_jax(x))
    estimator = grads["router"]["complexity_estimator"]["fc1"]["weight"]
    assert float(jnp.abs(estimator).max()) > 0  # the soft mask carries gradient to the estimator
    for name, param in torch_layer.named_parameters():
        node = grads
        for part in name.split("."):
            node = node[part]
        np.testing.assert_allclose(np.asarray(node), param.grad.numpy(), atol=1e-4, rtol=1e-3)


def test_dense_experts_equal_ragged_dot() -> None:
    config = tiny_config()
    layer = jr.MoELayer(config, implementation="dense")
    assert layer.experts.implementation == "dense"
    params = layer.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (20, 16))
    dense = jax.jit(layer)(params, x).hidden_states
    ragged = jax.jit(jr.MoELayer(config))(params, x).hidden_states
    np.testing.assert_allclose(np.asarray(dense), np.asarray(ragged), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------- conversion


def test_conversion_round_trip_is_exact_and_strict() -> None:
    torch.manual_seed(3)
    model = tr.MoEModel(tiny_config(), num_layers=2)
    params = torch_to_jax(model)
    assert params["layers"][1]["moe"]["experts"]["w_down"].shape == (6, 16, 24)
    torch.manual_seed(4)
    other = jax_to_torch(params, tr.MoEModel(tiny_config(), num_layers=2))
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    del params["layers"][0]["norm"]
    with pytest.raises(RuntimeError, match="Missing key"):
        jax_to_torch(params, other)


def test_bfloat16_parameters_convert_exactly() -> None:
    torch.manual_seed(5)
    experts = tr.SwiGLUExperts(4, 8, 8).to(torch.bfloat16)
    params = torch_to_jax(experts)
    assert params["w_gate_up"].dtype == jnp.bfloat16
    back = jax_to_torch(params, tr.SwiGLUExperts(4, 8, 8).to(torch.bfloat16))
    assert torch.equal(back.w_gate_up, experts.w_gate_up)


def test_decisions_convert_both_ways() -> None:
    config = tiny_config()
    router = jr.DynamicMoERouter(config)
    decision = router(router.init(jax.random.key(0)), jnp.ones((2, 3, 16)))
    as_torch = decision_to_torch(decision)
    assert as_torch.expert_indices.dtype == torch.int64 and as_torch.batch_shape == (2, 3)
    back = decision_to_jax(as_torch)
    assert np.array_equal(np.asarray(back.expert_indices), np.asarray(decision.expert_indices))


# --------------------------------------------------------------------- JAX specifics


def test_jit_returns_a_padded_decision_pytree_with_static_shapes() -> None:
    config = tiny_config(mode="top_p", top_p=0.3)
    router = jr.DynamicMoERouter(config)
    assert "complexity_estimator" not in router.init(jax.random.key(0))
    decision = jax.jit(router)(router.init(jax.random.key(0)), jnp.zeros((5, 16)))
    assert decision.expert_indices.shape == (5, 3) and decision.batch_shape == (5,)
    k = np.asarray(decision.k_per_token)
    indices = np.asarray(decision.expert_indices)
    assert ((indices >= 0).sum(axis=1) == k).all()
    assert (indices[np.arange(3)[None, :] >= k[:, None]] == -1).all()
    leaves = jax.tree_util.tree_leaves(decision)
    assert len(leaves) == 12  # batch_shape is static metadata


def test_nonfinite_raise_policy_eager_and_under_checkify() -> None:
    config = tiny_config(nonfinite_policy="raise", mode="top_p")
    router = jr.DynamicMoERouter(config)
    params = router.init(jax.random.key(0))
    x = jnp.zeros((4, 16)).at[2, 0].set(jnp.inf)
    with pytest.raises(ValueError, match="first at flattened token index 2"):
        router(params, x)
    err, _ = jax.jit(checkify.checkify(router))(params, x)
    assert "1 token(s) with NaN/Inf, first at flattened token index 2" in str(err.get())


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ([[1.0] * 16], TypeError, "must be a jax.Array"),
        (jnp.zeros((2, 16), jnp.int32), TypeError, "floating-point"),
        (jnp.zeros((16,)), ValueError, "shape"),
        (jnp.zeros((2, 8)), ValueError, "hidden_size=16"),
        (jnp.zeros((0, 16)), ValueError, "at least one token"),
    ],
)
def test_bad_input_is_a_clear_error(value: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        jr.flatten_tokens(value, 16)


def test_same_names_in_the_same_order_as_the_torch_file() -> None:
    def public_order(module: object) -> list[str]:
        with open(module.__file__) as handle:  # type: ignore[attr-defined]
            source = handle.read()
        names = [
            line.split()[1].split("(")[0].rstrip(":")
            for line in source.splitlines()
            if line.startswith(("def ", "class "))
        ]
        return [n for n in names if not n.startswith("_")]

    assert public_order(tr) == public_order(jr)


def test_import_moe_devkit_does_not_import_jax() -> None:
    code = "import sys, moe_devkit; moe_devkit.RouterConfig; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""JaxRouterInspector, diagnostics on JAX/NumPy arrays, JAX numerics, diagnose --framework jax."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")  # the jax extra is optional; CI installs it
import jax.numpy as jnp  # noqa: E402

from moe_devkit.config import RouterConfig  # noqa: E402
from moe_devkit.diagnostics import arrays, utilization  # noqa: E402
from moe_devkit.diagnostics.jax_numerics import locate_nonfinite  # noqa: E402
from moe_devkit.inspect import InspectorConfig, RouterInspector  # noqa: E402
from moe_devkit.inspect.jax_inspector import (  # noqa: E402
    JaxRouterInspector,
    model_routing_stats,
    routing_stats,
)
from moe_devkit.reporting import load_report_json  # noqa: E402
from moe_devkit.routers import jax_router as jr  # noqa: E402
from moe_devkit.routers import torch_router as tr  # noqa: E402
from moe_devkit.routers.convert import torch_to_jax  # noqa: E402

CONFIG = RouterConfig(
    hidden_size=16, num_experts=6, max_k=3, expert_hidden_size=16, capacity_factor=1.0
)
INSPECTOR = InspectorConfig(window=3, max_windows=4)


@pytest.fixture(scope="module")
def both_inspectors() -> tuple[RouterInspector, JaxRouterInspector]:
    """14 steps of the same model in both frameworks (windows double once), one NaN token."""
    torch.manual_seed(0)
    model = tr.MoEModel(CONFIG, num_layers=2)
    params, jax_model = torch_to_jax(model), jr.MoEModel(CONFIG, num_layers=2)

    @jax.jit
    def step(params: dict, x: jax.Array, key: jax.Array) -> tuple:
        return model_routing_stats(jax_model(params, x).routings, key=key)

    jax_inspector = JaxRouterInspector(INSPECTOR)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad(), RouterInspector(model, config=INSPECTOR) as torch_inspector:
        for i in range(14):
            x = torch.randn(2, 8, 16, generator=generator) * (1 + i)
            if i == 4:
                x[0, 1, 0] = float("nan")
            model(x)
            stats = step(params, jnp.asarray(x.numpy()), jax.random.fold_in(jax.random.key(0), i))
            jax_inspector.record_model(stats)
    return torch_inspector, jax_inspector


def test_summary_equals_the_torch_inspectors(both_inspectors: tuple) -> None:
    torch_summary, jax_summary = (inspector.summary() for inspector in both_inspectors)
    assert list(jax_summary.layers) == ["layers.0.moe.router", "layers.1.moe.router"]
    for name, expected in torch_summary.layers.items():
        got = jax_summary.layers[name]
        assert got.keys() == expected.keys()
        for key in ("steps", "tokens", "selections", "nonfinite_tokens"):
            assert got[key] == expected[key], key
        for key in ("utilization", "k"):
            assert got[key] == expected[key], key  # integers; metrics from the same counts
        assert got["dropped_pairs"] == expected["dropped_pairs"] > 0
        assert got["coactivation"] == expected["coactivation"]
        assert got["complexity"]["joint_histogram"] == expected["complexity"]["joint_histogram"]
        for key in ("mean", "std", "min", "max"):
            assert got["complexity"][key] == pytest.approx(expected["complexity"][key], rel=1e-5)
        assert got["losses"] == pytest.approx(expected["losses"], rel=1e-5)
        assert [w["counts"] for w in got["windows"]] == [w["counts"] for w in expected["windows"]]
        assert [w["end_step"] for w in got["windows"]] == [3, 6, 9, 12]
        # reservoir larger than the run: every token of the sampled steps (0, 4, 8, 12)
        sampled_steps = len(range(0, 14, INSPECTOR.reservoir_every))
        assert len(got["sample"]["k"]) == got["tokens"] * sampled_steps // 14
        assert sorted(got["sample"]["k"]) == sorted(expected["sample"]["k"])
    assert [f.code for f in jax_summary.findings] == [f.code for f in torch_summary.findings]


def test_report_files_have_the_routing_schema(both_inspectors: tuple, tmp_path) -> None:
    paths = both_inspectors[1].report(str(tmp_path))
    report = load_report_json(paths.json)
    layer = report["sections"]["routing"]["layers"]["layers.1.moe.router"]
    torch_report = both_inspectors[0].summary().to_report()
    assert (
        layer.keys() == torch_report["sections"]["routing"]["layers"]["layers.1.moe.router"].keys()
    )
    assert paths.png.stat().st_size > 0 and paths.html.exists()


def test_record_outside_jit_and_shape_errors() -> None:
    router = jr.DynamicMoERouter(CONFIG)
    decision = jax.jit(router)(router.init(jax.random.key(0)), jnp.ones((4, 16)))
    inspector = JaxRouterInspector(INSPECTOR)
    inspector.record(decision, layer="r")
    layer = inspector.summary().layers["r"]
    assert layer["tokens"] == 4 and layer["selections"] == int(decision.k_per_token.sum())
    stats = jax.jit(routing_stats)(decision)
    with pytest.raises(ValueError, match="num_experts=6"):
        inspector.record_stats(stats._replace(counts=jnp.zeros(4, jnp.int32)), layer="r")
    with pytest.raises(ValueError, match="complexity_bins=20"):
        inspector.record_stats(stats._replace(joint=jnp.zeros((6, 4), jnp.int32)), layer="r")
    with pytest.raises(TypeError, match="RouterInspector for PyTorch"):
        inspector.record(object(), layer="r")  # type: ignore[arg-type]


# --------------------------------------------------------------------- arrays


def assert_close_tree(got: object, expected: object, path: str = "") -> None:
    """Nested dicts and lists equal, floats to 1e-6 relative."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), path
        for key in expected:
            assert_close_tree(got[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), path
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_close_tree(a, b, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-6, nan_ok=True), path
    else:
        assert got == expected, path


def test_utilization_metrics_accept_jax_and_numpy_arrays() -> None:
    indices = np.array([[0, 1, -1], [2, -1, -1], [0, 3, 5]], dtype=np.int32)
    logits = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    expected = utilization.utilization_from_indices(
        torch.from_numpy(indices), 6, router_logits=torch.from_numpy(logits)
    ).to_dict()
    for make in (np.asarray, jnp.asarray):
        got = arrays.utilization_from_indices(make(indices), 6, router_logits=make(logits))
        # a JAX array on a GPU arrives as a CUDA tensor: float32 sums may differ in the last bit
        assert_close_tree(got.to_dict(), expected)
    counts = arrays.load_balance(jnp.array([3, 1, 0, 0])).to_dict()
    assert counts["dead_experts"] == [2, 3]
    with pytest.raises(TypeError, match=r"numpy\.asarray"):
        arrays.as_tensor([[0, 1]])


# --------------------------------------------------------------------- numerics


def test_locate_nonfinite_names_the_input_the_primitive_and_the_line() -> None:
    router = jr.StaticTopKRouter(CONFIG)
    params = router.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 16))
    assert locate_nonfinite(router, params, x) is None
    finding = locate_nonfinite(router, params, x.at[2, 3].set(jnp.nan), location="moe", step=7)
    assert finding is not None and finding.code == "nonfinite-output"
    assert finding.severity == "error" and finding.step == 7 and finding.location == "moe"
    assert finding.details["tensor"] == "input args[1]"
    assert "jax_router.py" in finding.details["source"]
    overflow = locate_nonfinite(router, params, x * 1e37)
    assert overflow is not None and "output of" in overflow.details["tensor"]
    assert "jax_router.py" in overflow.details["source"]


# --------------------------------------------------------------------- CLI


def test_diagnose_framework_jax_writes_the_same_report(tmp_path) -> None:
    from moe_devkit.cli import main

    common = ["--steps", "2", "--batch", "2", "--seq", "8", "--hidden-size", "16", "--layers", "1"]
    common += ["--num-experts", "4", "--max-k", "2", "--device", "cpu"]
    assert main(["diagnose", *common, "--framework", "jax", "--out", str(tmp_path / "j")]) == 0
    assert main(["diagnose", *common, "--out", str(tmp_path / "t")]) == 0
    layers = [
        json.loads((tmp_path / d / "report.json").read_text())["sections"]["routing"]["layers"]
        for d in ("j", "t")
    ]
    jax_layer, torch_layer = (lay["layers.0.moe.router"] for lay in layers)
    assert jax_layer["k"]["histogram"] == torch_layer["k"]["histogram"]
    assert jax_layer["utilization"]["counts"] == torch_layer["utilization"]["counts"]
    assert (tmp_path / "j" / "routing_analysis.png").exists()

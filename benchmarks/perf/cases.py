"""The perf suite's cases, built against whichever ``moe_devkit`` is first on the path.

A worker process (``perf.serve``) builds them from the tree it imports: the working tree's
package in the candidate worker, an exported git revision's in the baseline worker. So this
module imports only torch and, inside the builders, the config, the reference routers and
the optional modules (utilization, inspector, gradients) that old revisions have too; a case
that a revision cannot build is skipped, with the reason.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

CASES = (
    "router.static",
    "router.dynamic",
    "router.top_p",
    "layer.static",
    "layer.dynamic",
    "model",
    "utilization",
    "inspector",
    "gradients",
    "train.layer.static",
    "train.layer.dynamic",
    "train.model.static",
    "train.model.dynamic",
)

Fn = Callable[[], object]


class Settled:
    """A case's call, plus the call that settles the work it defers (for the gates)."""

    def __init__(self, call: Fn, settle: Callable[[], None]) -> None:
        self.call, self.settle = call, settle

    def __call__(self) -> object:
        return self.call()

    def settled(self) -> object:
        out = self.call()
        self.settle()
        return out


def _drain(inspector: Any) -> None:
    """Folds an inspector's deferred steps (a no-op for revisions that defer nothing)."""
    for state in getattr(inspector, "layers", {}).values():
        drain = getattr(state, "drain", None)
        if drain is not None:
            drain()


def _sizes(device: str, quick: bool) -> dict[str, Any]:
    if device == "cuda":
        return dict(hidden=1024, experts=32, max_k=8, inner=1024, tokens=4096, dtype="bfloat16")
    if quick:
        return dict(hidden=64, experts=8, max_k=4, inner=128, tokens=128, dtype="float32")
    return dict(hidden=128, experts=16, max_k=4, inner=256, tokens=256, dtype="float32")


def _training_sizes(device: str) -> dict[str, Any]:
    """The training cases' shape: bench_training.py's presets (h100 on CUDA, cpu otherwise,
    quick or not: the CPU shape is small already)."""
    if device == "cuda":
        return dict(hidden=2048, experts=64, max_k=8, inner=1024, tokens=8192, dtype="bfloat16")
    return dict(hidden=64, experts=16, max_k=8, inner=128, tokens=512, dtype="float32")


TRAIN_MEAN_K = 4.0
"""The dynamic training cases' mean k (of max_k 8): top_p bisected to it per layer."""


class CaseBuilder:
    """Builds the suite's cases against whichever moe_devkit is importable."""

    def __init__(self, device: str, quick: bool) -> None:
        from moe_devkit.config import RouterConfig

        self.device = torch.device(device)
        s = _sizes(device, quick)
        self.dtype = getattr(torch, s["dtype"])
        self.config = RouterConfig(
            hidden_size=s["hidden"], num_experts=s["experts"], max_k=s["max_k"],
            expert_hidden_size=s["inner"], mode="complexity",
        )  # fmt: skip
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(s["tokens"], s["hidden"], generator=gen).to(self.device)

    def build(self, name: str) -> Fn | str:
        """A zero-argument callable for case ``name``, or the reason it is skipped."""
        torch.manual_seed(0)
        method = getattr(self, "_" + name.replace(".", "_"), None)
        if method is None:
            return f"unknown case {name!r}"
        result: Fn | str = method()
        return result

    def _no_grad(self, module: torch.nn.Module, x: torch.Tensor) -> Fn:
        module = module.to(self.device).eval()

        def call() -> object:
            with torch.no_grad():
                return module(x)

        return call

    def _router(self, **overrides: Any) -> torch.nn.Module:
        from dataclasses import replace

        from moe_devkit.routers.torch_router import DynamicMoERouter

        return DynamicMoERouter(replace(self.config, **overrides))

    def _router_static(self) -> Fn:
        from moe_devkit.routers.torch_router import StaticTopKRouter

        return self._no_grad(StaticTopKRouter(self.config), self.x)

    def _router_dynamic(self) -> Fn:
        return self._no_grad(self._router(), self.x)

    def _router_top_p(self) -> Fn:
        return self._no_grad(self._router(mode="top_p", top_p=0.6), self.x)

    def _layer(self, static: bool) -> Fn:
        from moe_devkit.routers.torch_router import MoELayer, StaticTopKRouter

        router = StaticTopKRouter(self.config) if static else None
        layer = MoELayer(self.config, router=router).to(dtype=self.dtype)
        return self._no_grad(layer, self.x.to(self.dtype))

    def _layer_static(self) -> Fn:
        return self._layer(static=True)

    def _layer_dynamic(self) -> Fn:
        return self._layer(static=False)

    def _model_module(self) -> torch.nn.Module:
        from moe_devkit.routers.torch_router import MoEModel

        return MoEModel(self.config, num_layers=2).to(self.device)

    def _model(self) -> Fn:
        return self._no_grad(self._model_module(), self.x)

    def _utilization(self) -> Fn | str:
        mod = _optional("moe_devkit.diagnostics.utilization")
        if isinstance(mod, str):
            return mod
        fn = getattr(mod, "utilization_from_decision", None)
        if fn is None:  # an older revision, compared with --against
            return "moe_devkit.diagnostics.utilization has no utilization_from_decision here"
        routing = self._routing()
        return lambda: fn(routing)

    def _routing(self) -> Any:
        with torch.no_grad():
            return self._router().to(self.device)(self.x)

    def _inspector(self) -> Fn | str:
        mod = _optional("moe_devkit.inspect")
        if isinstance(mod, str):
            return mod
        inspector_cls = getattr(mod, "RouterInspector", None)
        if inspector_cls is None:
            return "moe_devkit.inspect has no RouterInspector yet"
        model = self._model_module()
        inspector = inspector_cls()
        inspector.attach(model)
        return Settled(self._no_grad(model, self.x), lambda: _drain(inspector))

    def _gradients(self) -> Fn | str:
        mod = _optional("moe_devkit.diagnostics.gradients")
        if isinstance(mod, str):
            return mod
        stats = getattr(mod, "gradient_statistics", None)
        if stats is None:
            return "moe_devkit.diagnostics.gradients has no gradient_statistics yet"
        model = self._model_module()
        out = model(self.x)
        (out.hidden_states.float().square().mean() + out.aux_loss).backward()
        return lambda: stats(model)

    # --------------------------------------------------------------------- training steps
    # Forward + backward of one layer, and a whole step (zero_grad, forward, backward,
    # AdamW.step) of the 2-layer reference model, static top-max_k or dynamic (top_p mode,
    # the threshold bisected per layer to mean k TRAIN_MEAN_K on the case's input). AdamW's
    # learning rate is 0: the step runs every kernel of a real one but leaves the weights
    # (so the routing, so the work) as they are, however many calls each worker makes.

    def _training_model(self, static: bool) -> tuple[Any, torch.Tensor] | str:
        from moe_devkit.config import RouterConfig
        from moe_devkit.routers.torch_router import MoEModel, StaticTopKRouter

        s = _training_sizes(self.device.type)
        dtype = getattr(torch, s["dtype"])
        try:
            config = RouterConfig(
                hidden_size=s["hidden"], num_experts=s["experts"], min_k=1, max_k=s["max_k"],
                expert_hidden_size=s["inner"], mode="top_p",
            )  # fmt: skip
            with self.device:  # initialised where it runs: 0.8 G parameters on CUDA
                model: Any = MoEModel(config, num_layers=2)
        except (TypeError, ValueError) as exc:  # an older revision without top_p mode
            return f"the top_p reference model cannot be built in this revision ({exc})"
        blocks: list[Any] = list(model.layers)
        if not all(hasattr(block, "norm") and hasattr(block, "moe") for block in blocks):
            return "MoEModel's blocks have no .norm and .moe in this revision"
        with torch.no_grad():  # a confident (trained) router: logits with std ~2
            for block in blocks:
                block.moe.router.router_network.weight.mul_(4.0)
        if static:
            for block in blocks:
                weights = block.moe.router.state_dict()
                block.moe.router = StaticTopKRouter(config).to(self.device)
                block.moe.router.load_state_dict(weights, strict=False)
        model = model.to(dtype)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(s["tokens"], s["hidden"], generator=gen).to(self.device, dtype)
        if not static:
            h = x
            with torch.no_grad():
                for block in model.layers:
                    _bisect_top_p(block.moe, block.norm(h), TRAIN_MEAN_K)
                    h = block(h).hidden_states
        return model, x

    def _train_layer(self, static: bool) -> Fn | str:
        built = self._training_model(static)
        if isinstance(built, str):
            return built
        model, x = built
        block = model.layers[0]
        layer = block.moe
        with torch.no_grad():
            x = block.norm(x)  # the layer's own input, on which its top_p was bisected
        x.requires_grad_(True)
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x.device)

        def call() -> object:
            layer.zero_grad(set_to_none=True)
            x.grad = None
            out = layer(x)
            ((out.hidden_states.float() * g).sum() + out.routing.aux_loss).backward()
            return out.hidden_states

        return call

    def _train_model(self, static: bool) -> Fn | str:
        built = self._training_model(static)
        if isinstance(built, str):
            return built
        model, x = built
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x.device)

        def call() -> object:
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            ((out.hidden_states.float() * g).sum() + out.aux_loss).backward()
            optimizer.step()
            return out.hidden_states

        return call

    def _train_layer_static(self) -> Fn | str:
        return self._train_layer(static=True)

    def _train_layer_dynamic(self) -> Fn | str:
        return self._train_layer(static=False)

    def _train_model_static(self) -> Fn | str:
        return self._train_model(static=True)

    def _train_model_dynamic(self) -> Fn | str:
        return self._train_model(static=False)


def _bisect_top_p(layer: Any, x: torch.Tensor, target_mean_k: float) -> None:
    """Sets ``layer``'s top_p (its config and its router's) to give mean k within 0.05 of
    ``target_mean_k`` on ``x`` (bisection, as bench_moe_layer.calibrate_top_p)."""
    from dataclasses import replace

    low, high = 1e-3, 1.0
    for _ in range(30):
        config = replace(layer.config, top_p=(low + high) / 2)
        layer.config = layer.router.config = config
        mean_k = float(layer.router(x).k_per_token.float().mean())
        if abs(mean_k - target_mean_k) < 0.05:
            return
        low, high = (config.top_p, high) if mean_k < target_mean_k else (low, config.top_p)


def _optional(module: str) -> ModuleType | str:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        return f"{module} is not importable in this revision ({exc})"

"""Tiny models of every Mixture-of-Experts architecture in the installed transformers.

``moe_architectures()`` enumerates the MoE model types from transformers itself,
``tiny_config`` / ``build_tiny`` / ``save_tiny_dir`` build a small random model of one,
and ``record_expert_inputs`` records, independently of the inspector, what the experts
of each MoE block actually received in each forward.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import inspect
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

EXPERTS = 8
TOP_K = 2

# Config fields that hold the number of routed experts / experts per token.
EXPERT_COUNT_KEYS = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "moe_num_experts",
    "num_routed_experts",
    "num_moe_experts",
    "moe_num_routed_experts",
    "n_experts",
    "expert_num",
)
TOP_K_KEYS = (
    "num_experts_per_tok",
    "num_experts_per_token",
    "moe_topk",
    "moe_top_k",
    "top_k",
    "moe_k",
    "num_selected_experts",
    "experts_per_token",
    "router_top_k",
    "top_k_experts",
)

# Generic sizes, applied to every config field of that name (and to sub-configs).
GENERIC: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "ffn_hidden_size": 64,
    "moe_intermediate_size": 16,
    "expert_intermediate_size": 16,
    "moe_ffn_hidden_size": 16,
    "shared_expert_intermediate_size": 16,
    "shared_experts_intermediate_size": 16,
    "moe_shared_expert_intermediate_size": 16,
    "num_hidden_layers": 3,
    "num_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "n_group": 2,
    "num_expert_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "d_model": 32,
    "d_ff": 64,
    "d_kv": 8,
    "num_heads": 4,
    "num_decoder_layers": 3,
    "encoder_layers": 3,
    "decoder_layers": 3,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "sliding_window": 16,
    "n_heads": 4,
    "n_layers": 3,
    "max_seq_len": 64,
    "kv_n_heads": 2,
    "text_hidden_size": 32,
    "out_hidden_size": 32,
    "index_topk": 16,
    "index_head_dim": 8,
    "index_n_heads": 2,
    "linear_head_dim": 8,
    "linear_num_heads": 4,
    "swa_head_dim": 8,
    "o_lora_rank": 16,
    "kv_channels": 8,
    "hc_lowrank": 16,
    "router_hidden_size": 16,
    "shared_intermediate_size": 16,
    "share_expert_dim": 16,
    "expert_ffn_hidden_size": 16,
    "moe_hidden_size": 32,
    "first_dense_intermediate_size": 64,
    "dense_intermediate_size": 64,
    "mlp_only_intermediate_size": 64,
    "intermediate_size_mlp": 64,
    "hidden_size_per_layer_input": 8,
    "vocab_size_per_layer_input": 128,
    "ngram_vocab_size_base": 1024,
    "unpadded_vocab_size": 128,
    "ssm_state_size": 16,
    "mamba_num_heads": 4,
    "mamba_head_dim": 16,
    "n_groups": 2,
    "index_pool_size": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
for _key in EXPERT_COUNT_KEYS:
    GENERIC[_key] = EXPERTS
for _key in TOP_K_KEYS:
    GENERIC[_key] = TOP_K

# Per-architecture overrides, only where the generic sizes do not fit the architecture.
OVERRIDES: dict[str, dict[str, Any]] = {
    "dbrx": {"attn_config": {"clip_qkv": 8.0}},  # its attention clamps with no default bound
    "ernie4_5_vl_moe": {
        "text_config": {
            "moe_intermediate_size": [16, 16],  # text and vision experts
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 500000.0,
                "mrope_section": [1, 1, 2],
            },
        }
    },
    "gemma4": {"text_config": {"enable_moe_block": True, "global_head_dim": 16}},  # MoE is opt-in
    "diffusion_gemma": {"text_config": {"enable_moe_block": True, "global_head_dim": 16}},
    "dots3_note": {
        # the vision encoder's experts per layer (its default lists 46 layers): none, 8, 8
        "vision_config": {
            "pyramid_num_routed": [-1, 8, 8],
            "adapter_in_dim": 32,
            "adapter_out_dim": 32,
        },
        "audio_config": {"adapter_input_size": 32, "adapter_out_dim": 32},
        # sliding-window attention needs head_dim = qk_nope_head_dim + qk_rope_head_dim
        # and no per-layer overrides (the defaults are full size)
        "text_config": {"head_dim": 16, "per_layer_config": {}},
    },
    "glm4v_moe": {
        "text_config": {
            "head_dim": 16,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [2, 1, 1],
            },
        }
    },
    "kolibri1_1": {"head_dim": 16, "index_num_heads": 2},  # NVFP4 rounding: head_dim % 16 == 0
    "nemotron_h": {"layers_block_type": ["linear_attention", "moe", "full_attention", "moe"]},
    "nemotron_h_omni": {
        "vision_config": {"video_temporal_patch_size": 2},
        "text_config": {"layers_block_type": ["linear_attention", "moe", "full_attention", "moe"]},
    },
    "qwen4_exp": {
        "text_config": {
            "indexer_n_heads": 2,
            "indexer_kv_heads": 1,
            "indexer_head_dim": 8,
            "indexer_budget": 8,
            "indexer_compress_ratio": 2,
        }
    },
    "deepseek_ocr2": {"text_config": {"mlp_layer_types": ["dense", "sparse", "sparse"]}},
    "dots1": {"n_shared_experts": 1},
    "doge": {"is_moe": True, "num_experts": 16},  # product-key experts: a square count
    "glm5_next": {"text_config": {"qk_rope_head_dim": 0}},  # its DSA attention layers use no RoPE
    "granitemoehybrid": {
        "mamba_n_heads": 4,
        "mamba_d_head": 16,
        "mamba_d_state": 16,
        "layer_types": ["linear_attention", "full_attention", "linear_attention"],
    },
    "hy_v4_vl": {
        "text_config": {
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 1, 1],
            }
        }
    },
    "jamba": {
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "expert_layer_period": 1,
        "expert_layer_offset": 0,
        "use_mamba_kernels": False,
    },
    "lfm2_moe": {"num_dense_layers": 1, "layer_types": ["conv", "full_attention", "conv"]},
    "step3p7": {"text_config": {"sliding_window": 16}},
    "longcat_flash": {"zero_expert_num": 2},
    "nllb-moe": {
        "encoder_sparse_step": 2,
        "decoder_sparse_step": 2,
        "expert_capacity": 2,  # small enough that tokens are dropped
        "moe_eval_capacity_token_fraction": -1.0,  # the same capacity in eval
    },
    "switch_transformers": {"expert_capacity": 2},  # small enough that tokens are dropped
    "zaya": {"num_experts_per_tok": 1},  # the only k it supports
}

# Attributes set on the built config, where transformers' modeling code reads an attribute
# its config class does not define.
PATCHES: dict[str, dict[str, Any]] = {
    "dbrx": {"attn_config.rope_theta": 10000.0},
    # the thinker's generate() reads it; only the talker's config defines it (same value)
    "qwen3_omni_moe": {"thinker_config.vision_start_token_id": 151652},
}

# Multimodal models whose experts are in the language model are built as that language
# model where it has a language-model head, else whole (text-only input), except these.
TEXT_PART_ONLY: dict[str, str] = {
    "muse_spark": "the whole model has 118M parameters (its audio and vision encoders fix widths)",
    "diffusion_gemma": "the whole model is a block-diffusion generator: each forward draws noise",
}

# Architectures that cannot be built or run offline on CPU, with the reason.
SKIPPED: dict[str, str] = {}

SUB_CONFIGS = ("text_config", "language_config", "llm_config", "thinker_config", "decoder_config")


def _transformers() -> Any:
    import transformers

    return transformers


def _module_name(model_type: str) -> str:
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    return str(model_type_to_module_name(model_type))


def _modeling_sources(model_type: str, prefix: str = "modeling_") -> str:
    """The text of the architecture's modeling (or configuration) files, read from the
    installed package."""
    transformers = _transformers()
    folder = os.path.join(os.path.dirname(transformers.models.__file__), _module_name(model_type))
    if not os.path.isdir(folder):
        return ""
    text = []
    for name in sorted(os.listdir(folder)):
        if name.startswith(prefix) and name.endswith(".py"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                text.append(f.read())
    return "\n".join(text)


_MOE_SOURCE = re.compile(r'"router_logits"|class \w+Experts\(')


@functools.cache
def moe_architectures() -> list[str]:
    """Every MoE model type of the installed transformers, one per modeling module.

    A model type is MoE when its modeling code records ``router_logits`` or defines an
    experts module, or when its config (or a sub-config) counts more than one expert.
    Sub-model types that share their parent's module (``llama4_text``, ...) are covered
    by the parent.
    """
    from transformers.models.auto.configuration_auto import (  # type: ignore[attr-defined]
        CONFIG_MAPPING_NAMES,
    )

    found = []
    for model_type in CONFIG_MAPPING_NAMES:
        if _module_name(model_type) != model_type.replace("-", "_"):
            continue
        text = _modeling_sources(model_type)
        if not text:
            continue
        config_text = _modeling_sources(model_type, "configuration_")
        if _MOE_SOURCE.search(text) or (
            re.search(r"expert|sub_configs", config_text) and _config_counts_experts(model_type)
        ):
            found.append(model_type)
    return sorted(found)


def _config_counts_experts(model_type: str) -> bool:
    try:
        config = _transformers().AutoConfig.for_model(model_type)
    except Exception:  # a config whose defaults do not validate: the source decides
        return False
    return any(_num_experts(c) > 1 for c in _configs(config))


def _num_experts(config: Any) -> int:
    for key in EXPERT_COUNT_KEYS:
        value = _field(config, key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def _configs(config: Any) -> list[Any]:
    out = [config]
    for name in SUB_CONFIGS:
        sub = _field(config, name)
        if _is_config(sub):
            out.extend(_configs(sub))
    return out


def _fields(cls: type) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(inspect.signature(cls.__init__).parameters)  # type: ignore[misc]


def _field(config: Any, key: str) -> Any:
    """A config's own value of ``key`` (None when unset), without the lookups some
    configs make for per-layer attributes."""
    own = vars(config)
    return own.get(key, own.get(getattr(config, "attribute_map", {}).get(key, key)))


def _is_config(value: Any) -> bool:
    return hasattr(value, "to_dict") and hasattr(value, "model_type")


def _small(cls: type, extra: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments for a tiny ``cls``: the generic size of each integer field it
    declares (fields left None keep being derived), sub-configs made tiny the same way,
    no dropout, layer-type lists that keep every kind of layer, then ``extra``."""
    defaults = cls()
    kwargs: dict[str, Any] = {}
    for key in _fields(cls):
        value = _field(defaults, key)
        if _is_config(value):
            kwargs[key] = _small(type(value), extra.pop(key, {}))
        elif key in ("num_hidden_layers", "num_layers") and _has_per_layer_lists(cls, value):
            continue  # per-layer lists with no derived default fix the number of layers
        elif (key in GENERIC and isinstance(value, int) and not isinstance(value, bool)) or (
            key in (*EXPERT_COUNT_KEYS, *TOP_K_KEYS, "head_dim", "moe_intermediate_size")
            and value is None
        ):
            kwargs[key] = GENERIC[key]
        elif "dropout" in key and isinstance(value, float):
            kwargs[key] = 0.0
        elif key == "mlp_only_layers" and isinstance(value, list) and value:
            kwargs[key] = [0]  # one dense layer, the others MoE
    heads, kv_heads = (_field(defaults, k) for k in ("num_attention_heads", "num_key_value_heads"))
    if kv_heads is not None and kv_heads == heads:  # multi-head latent attention: kv heads = heads
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", heads)
    kwargs.update(extra)
    try:
        built = cls(**kwargs)
    except Exception:  # the caller reports the error of the final arguments
        return kwargs
    for key in _fields(cls):
        if key.endswith("layer_types") and key not in extra:
            pattern = _layer_pattern(_field(defaults, key), _field(built, key))
            if pattern is not None:
                kwargs[key] = pattern
    return kwargs


def _has_per_layer_lists(cls: type, layers: Any) -> bool:
    if not dataclasses.is_dataclass(cls) or not isinstance(layers, int) or layers < 2:
        return False
    return any(
        isinstance(f.default, (list, tuple)) and len(f.default) == layers
        for f in dataclasses.fields(cls)
    )


def _layer_pattern(default: Any, tiny: Any) -> list[Any] | None:
    """A layer-type list for the tiny model that keeps every kind of layer of the full
    model's list: the first layer as there, the other kinds over the remaining layers
    (``["dense", "sparse", "sparse"]``, ``["linear_attention", "full_attention", ...]``).
    None where the tiny list already has every kind."""
    if not isinstance(default, list) or not isinstance(tiny, list) or not tiny:
        return None
    kinds = list(dict.fromkeys(default))
    if set(kinds) <= set(tiny) or len(kinds) > len(tiny):
        return None
    rest = kinds[1:] or kinds
    return [kinds[0]] + [rest[i % len(rest)] for i in range(len(tiny) - 1)]


def _moe_path(config: Any) -> list[Any]:
    """The configs from ``config`` down to the one that carries the experts (searched
    depth first through language-model sub-configs); just ``[config]`` when it is that."""
    if _num_experts(config) > 1:
        return [config]
    for name in SUB_CONFIGS:
        sub = _field(config, name)
        if _is_config(sub):
            path = _moe_path(sub)
            if _num_experts(path[-1]) > 1:
                return [config, *path]
    return [config]


def _generative(config: Any) -> bool:
    try:
        return bool(model_class(config).can_generate())
    except KeyError:  # no model class with a forward (Qwen3-Omni's top level only generates)
        return False


def tiny_config(model_type: str) -> Any:
    """A tiny config of ``model_type`` (a fresh copy each call): hidden 32, 3 layers (2
    of them MoE where the architecture has dense layers), 8 experts, top-2, vocabulary
    128, no dropout, eager attention. For a multimodal model whose experts are in its
    language model, the config of that language model where it has a language-model
    head, else of the innermost model around it that has one, run on text alone (see
    ``built_part`` and ``TEXT_PART_ONLY``)."""
    return copy.deepcopy(_tiny_config(model_type))


@functools.cache
def _tiny_config(model_type: str) -> Any:
    """The tiny config ``tiny_config`` copies (built once per model type)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    config = cls(**_small(cls, copy.deepcopy(OVERRIDES.get(model_type, {}))))
    for path, value in PATCHES.get(model_type, {}).items():
        *parents, name = path.split(".")
        target = config
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, value)
    if (
        getattr(config, "is_encoder_decoder", False)
        and getattr(config, "decoder_start_token_id", None) is None
    ):
        config.decoder_start_token_id = config.pad_token_id  # generate() starts the decoder there
    nested = _moe_path(config)
    if model_type in TEXT_PART_ONLY or _generative(nested[-1]):
        config = nested[-1]
    else:  # the innermost model with a language-model head, else the experts' part
        config = next((c for c in reversed(nested) if _generative(c)), nested[-1])
    for sub in _configs(config):
        sub._attn_implementation = "eager"
    return config


def built_part(model_type: str) -> str:
    """Which model ``build_tiny(model_type)`` builds: the whole model or a part of it."""
    config = tiny_config(model_type)
    if config.model_type == model_type:
        return f"whole model ({model_class(config).__name__})"
    return f"part {config.model_type} ({model_class(config).__name__})"


def model_class(config: Any) -> Any:
    """The model class for ``config``, one with a language-model head where there is one:
    the auto classes' (causal LM, seq2seq LM, image-text-to-text), else the modeling
    module's own ``...ForCausalLM`` / ``...ForConditionalGeneration`` for that config,
    else the base model."""
    transformers = _transformers()
    for auto in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForImageTextToText"):
        found = getattr(transformers, auto)._model_mapping.get(type(config), None)
        if found is not None:
            return found
    module = importlib.import_module(
        type(config).__module__.replace(".configuration_", ".modeling_")
    )
    classes = [
        c
        for c in vars(module).values()
        if isinstance(c, type)
        and issubclass(c, nn.Module)
        and getattr(c, "config_class", None) is type(config)
        and c.forward is not nn.Module.forward
    ]
    for suffix in ("ForCausalLM", "ForConditionalGeneration"):
        for c in classes:
            if c.__name__.endswith(suffix):
                return c
    found = transformers.AutoModel._model_mapping.get(type(config), None)
    if found is not None:
        return found
    for c in classes:
        if c.__name__.endswith("Model"):
            return c
    raise KeyError(f"no model class for {type(config).__name__}")


def build_tiny(model_type: str, seed: int = 0) -> nn.Module:
    """A tiny random ``model_type`` model: eval mode, float32, the same weights for a seed."""
    config = tiny_config(model_type)
    torch.manual_seed(seed)
    model = model_class(config)(config)
    for name, buffer in model.named_buffers():
        if name.endswith("tid2eid"):  # hash routing (DeepSeek-V4): the checkpoint's table is
            # token -> k distinct experts; initialisation leaves it all zeros
            experts = torch.rand(buffer.shape[0], _num_experts(config)).argsort(dim=1)
            buffer.copy_(experts[:, : buffer.shape[1]])
    module: nn.Module = model.float().eval()
    return module


def save_tiny_dir(model_type: str, path: str | os.PathLike[str], seed: int = 0) -> nn.Module:
    """Saves a tiny ``model_type`` model (config.json and weights) under ``path``."""
    model = build_tiny(model_type, seed)
    model.save_pretrained(str(path))  # type: ignore[operator]
    return model


# ---------------------------------------------------------------------------------------
# Ground truth: what the experts of each MoE block received, read from the experts.

INDEX_ARGUMENTS = (
    "top_k_index",
    "router_indices",
    "selected_experts",
    "top_k_indices",
    "expert_indices",
)


@dataclasses.dataclass
class ExpertInputs:
    """What the experts of one MoE block received, summed over the recorded forwards.

    counts: tokens each expert received (int64[E]); k_histogram[k]: tokens sent to
    exactly k experts; tokens: tokens that entered the block; forwards: forwards recorded.
    """

    num_experts: int
    counts: torch.Tensor
    k_histogram: list[int]
    tokens: int = 0
    forwards: int = 0

    def add(self, pairs: torch.Tensor, tokens: int) -> None:
        """One forward: ``pairs[t, e]`` is how many times expert e ran token t."""
        pairs = pairs.to(torch.int64)
        self.counts += pairs.sum(dim=0).cpu()
        per_token = pairs.sum(dim=1).cpu()
        width = max(len(self.k_histogram), int(per_token.max()) + 1 if per_token.numel() else 1)
        hist = torch.bincount(per_token, minlength=width).tolist()
        old = self.k_histogram + [0] * (width - len(self.k_histogram))
        self.k_histogram = [a + b for a, b in zip(old, hist, strict=True)]
        self.tokens += tokens
        self.forwards += 1


def _recomputing() -> bool:
    """True while autograd recomputes a checkpointed forward during backward."""
    return bool(torch._C._current_graph_task_id() != -1)


def _pairs_from_indices(index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(tokens, k) expert indices (values outside [0, E) ran nowhere) -> (tokens, E)
    counts of the pairs (a token sent twice to one expert runs there twice)."""
    index = index.reshape(index.shape[0], -1).long()
    valid = (index >= 0) & (index < num_experts)
    pairs = torch.zeros(index.shape[0], num_experts + 1, dtype=torch.int64, device=index.device)
    pairs.scatter_add_(1, torch.where(valid, index, num_experts), valid.long())
    return pairs[:, :num_experts]


def _match_rows(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The token index of each row of ``rows``, an exact copy of a row of ``tokens``.

    Identical tokens are routed alike, so rows equal to several tokens take them in
    turn; a row that repeats a token already taken (an expert handed the same token
    twice) maps to that token again."""
    equal = (rows[:, None, :] == tokens[None, :, :]).all(dim=-1).cpu()
    taken = torch.zeros(tokens.shape[0], dtype=torch.bool)
    out = []
    for row in equal:
        matches = row.nonzero()[:, 0]
        if not len(matches):
            raise AssertionError("an expert received a row that is no token of its block's input")
        free = matches[~taken[matches]]
        token = int(free[0]) if len(free) else int(matches[0])
        taken[token] = True
        out.append(token)
    return torch.tensor(out, dtype=torch.long)


def _add_pairs(pairs: torch.Tensor, tokens: torch.Tensor, expert: int) -> None:
    pairs[:, expert].index_add_(0, tokens, torch.ones_like(tokens))


def _num_experts_of(experts: nn.Module) -> int:
    value = getattr(experts, "num_experts", None)
    if isinstance(value, int):
        return value
    return next(iter(experts.parameters())).shape[0]


def _param_names(module: nn.Module) -> list[str]:
    return list(inspect.signature(module.forward).parameters)


class _Recorder:
    def __init__(self) -> None:
        self.layers: dict[str, ExpertInputs] = {}
        self.handles: list[Any] = []

    def layer(self, path: str, num_experts: int) -> ExpertInputs:
        if path not in self.layers:
            self.layers[path] = ExpertInputs(
                num_experts, torch.zeros(num_experts, dtype=torch.int64), []
            )
        return self.layers[path]

    def pre(self, module: nn.Module, hook: Any) -> None:
        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def post(self, module: nn.Module, hook: Any) -> None:
        self.handles.append(module.register_forward_hook(hook))

    # One method per way transformers hands tokens to experts.

    def indexed_experts(self, path: str, experts: nn.Module, name: str) -> None:
        """``experts(hidden_states, <indices>, <weights>)``: the indices it is given."""
        num_experts = _num_experts_of(experts)
        position = _param_names(experts).index(name)
        self.layer(path, num_experts)

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if _recomputing():
                return
            index = kwargs[name] if name in kwargs else args[position]
            if index.dtype == torch.bool or (
                index.shape[-1] == num_experts
                and not index.is_floating_point()
                and index.dim() == 3
            ):
                pairs = index.reshape(-1, num_experts).long().clamp_max(1)  # one-hot dispatch mask
            else:
                pairs = _pairs_from_indices(index, num_experts)
            self.layer(path, num_experts).add(pairs, pairs.shape[0])

        self.pre(experts, hook)

    def expert_modules(self, path: str, experts: nn.Module) -> None:
        """A container of one module per expert: the rows each expert module receives,
        matched to the tokens the container was given."""
        children = list(experts.children())
        modules = [m for m in children if not isinstance(m, nn.Dropout)]
        num_experts = len(modules)
        self.layer(path, num_experts)
        state: dict[str, Any] = {}

        def enter(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden: torch.Tensor = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            state["tokens"] = None if _recomputing() else hidden.reshape(-1, hidden.shape[-1])
            state["pairs"] = torch.zeros(
                state["tokens"].shape[0] if state["tokens"] is not None else 0,
                num_experts,
                dtype=torch.int64,
            )

        def leave(_m: nn.Module, _args: Any, _out: Any) -> None:
            if state.get("tokens") is not None:
                self.layer(path, num_experts).add(state["pairs"], state["tokens"].shape[0])
            state["tokens"] = None

        def expert_hook(e: int) -> Any:
            def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                if state.get("tokens") is None:
                    return
                rows = (args[0] if args else next(iter(kwargs.values()))).reshape(
                    -1, state["tokens"].shape[-1]
                )
                _add_pairs(state["pairs"], _match_rows(rows, state["tokens"]), e)

            return hook

        self.pre(experts, enter)
        self.post(experts, leave)
        for e, module in enumerate(modules):
            self.pre(module, expert_hook(e))

    def sized_experts(self, path: str, block: nn.Module, experts: nn.Module) -> None:
        """``experts(inputs, expert_size)`` (JetMoE): rows sorted by expert, ``expert_size``
        of each, matched to the tokens the block was given."""
        num_experts = _num_experts_of(experts)
        self.layer(path, num_experts)
        state: dict[str, Any] = {}

        def enter(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else next(iter(kwargs.values()))
            state["tokens"] = None if _recomputing() else hidden.reshape(-1, hidden.shape[-1])

        # The router sees the block's tokens also where the block is entered through a
        # method other than forward (JetMoE's mixture-of-attention calls ``map``).
        self.pre(getattr(block, "router", block), enter)

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            tokens = state.pop("tokens", None)
            if tokens is None:
                return
            inputs, sizes = args[0], (args[1] if len(args) > 1 else kwargs["expert_size"])
            pairs = torch.zeros(tokens.shape[0], num_experts, dtype=torch.int64)
            for e, rows in enumerate(inputs.split(list(sizes), dim=0)):
                _add_pairs(pairs, _match_rows(rows, tokens), e)
            self.layer(path, num_experts).add(pairs, tokens.shape[0])

        self.pre(experts, hook)

    def dense_experts(self, path: str, experts: nn.Module) -> None:
        """``experts(routed_in)`` with every token repeated once per expert and scaled by
        its dense router score (Llama-4): an expert receives the tokens of non-zero rows."""
        num_experts = _num_experts_of(experts)
        self.layer(path, num_experts)

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if _recomputing():
                return
            routed = args[0] if args else next(iter(kwargs.values()))
            routed = routed.reshape(num_experts, -1, routed.shape[-1])
            pairs = (routed != 0).any(dim=-1).T.long()
            self.layer(path, num_experts).add(pairs, pairs.shape[0])

        self.pre(experts, hook)

    def embedded_experts(self, path: str, embedding: nn.Embedding) -> None:
        """Product-key experts looked up as embeddings (Doge): the looked-up indices."""
        num_experts = embedding.num_embeddings
        self.layer(path, num_experts)

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if _recomputing():
                return
            pairs = _pairs_from_indices(args[0], num_experts)
            self.layer(path, num_experts).add(pairs, pairs.shape[0])

        self.pre(embedding, hook)

    def zero_compute_experts(self, path: str, router: nn.Module, num_experts: int) -> None:
        """Routed plus zero-compute (identity) experts (LongCat-Flash): the router's
        indices, where indices from ``n_routed_experts`` on are the identity experts; the
        experts module is handed placeholder indices for those, so it cannot tell."""
        self.layer(path, num_experts)

        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            if _recomputing():
                return
            pairs = _pairs_from_indices(out[-1], num_experts)
            self.layer(path, num_experts).add(pairs, pairs.shape[0])

        self.post(router, hook)

    def attach(self, model: nn.Module) -> None:
        for path, block in model.named_modules():
            zero = getattr(block, "zero_expert_num", 0)
            experts = getattr(block, "experts", None)
            if zero and isinstance(experts, nn.Module) and hasattr(block, "router"):
                self.zero_compute_experts(path, block.router, _num_experts_of(experts) + zero)
                continue
            if isinstance(getattr(block, "down_embed", None), nn.Embedding) and hasattr(
                block, "router_gate"
            ):
                self.embedded_experts(path, block.down_embed)
                continue
            for name, child in block.named_children():
                params = _param_names(child)
                if params[:2] == ["inputs", "expert_size"]:
                    self.sized_experts(path, block, child)
                    break  # the block's first parallel experts see the tokens; the rest repeat them
                if name != "experts" or any(
                    _param_names(g)[:2] == ["inputs", "expert_size"] for g in child.children()
                ):
                    continue  # not experts, or a MoE block of its own (JetMoE's attention)
                if (
                    isinstance(child, (nn.ModuleDict, nn.ModuleList))
                    and len(list(child.children())) > 1
                ):
                    self.expert_modules(path, child)
                elif len(params) >= 2 and params[1] in INDEX_ARGUMENTS:
                    self.indexed_experts(path, child, params[1])
                elif len(params) == 1 and hasattr(block, "router"):
                    self.dense_experts(path, child)
                else:
                    raise AssertionError(
                        f"{path}.{name}: no ground truth for experts {type(child).__name__}{params}"
                    )


@contextmanager
def record_expert_inputs(model: nn.Module) -> Iterator[dict[str, ExpertInputs]]:
    """Records, per MoE block (keyed by its module path), what its experts received in
    each forward; forwards recomputed by gradient checkpointing are not recorded twice.
    Every MoE block of the model has an entry, with ``forwards == 0`` where it never ran
    (a multimodal model's vision experts under text input)."""
    recorder = _Recorder()
    recorder.attach(model)
    try:
        yield recorder.layers
    finally:
        for handle in recorder.handles:
            handle.remove()

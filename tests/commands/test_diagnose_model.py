"""``moe-devkit diagnose --model SOURCE``: a transformers model directory (with and without
weights, with a tokenizer and ``--text``), a ``pkg.module:factory`` path, ``--train``, and the
one-line usage errors of a bad SOURCE or ``--text``.

The model directories are built offline from transformers' own config classes and
``save_pretrained``; the command runs in-process through ``moe_devkit.cli.main``, as the
other command tests run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_devkit.cli import main  # noqa: E402
from moe_devkit.commands._model_source import model_inputs, parse_source  # noqa: E402

STEPS, BATCH, SEQ, TOP_K, EXPERTS = 4, 2, 8, 2, 8
WORKLOAD = ["--steps", str(STEPS), "--batch-size", str(BATCH), "--seq-len", str(SEQ)]
COMMON: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=64,
    max_position_embeddings=64,
)
TEXT = "the router sends each token to two experts of the eight , one token at a time . " * 8
WORDS = sorted(set(TEXT.split()))


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(arch: str) -> Any:
    """A 2-layer, 8-expert, top-2 config of ``arch``, small enough for a CPU step in ms."""
    t = transformers
    moe: dict[str, Any] = dict(num_experts_per_tok=TOP_K)
    if arch == "olmoe":
        return t.OlmoeConfig(**COMMON, **moe, num_experts=EXPERTS)
    if arch == "deepseek_v2":
        return t.DeepseekV2Config(
            **COMMON,
            **moe,
            n_routed_experts=EXPERTS,
            moe_intermediate_size=16,
            first_k_dense_replace=0,
            n_shared_experts=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        )
    if arch == "qwen3_next":
        return t.Qwen3NextConfig(
            **COMMON,
            **moe,
            num_experts=EXPERTS,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            head_dim=16,
            linear_num_value_heads=2,
            linear_num_key_heads=1,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention"],
        )
    raise AssertionError(arch)


def save_model_dir(
    path: Path, arch: str, *, weights: bool, tokenizer: bool = False
) -> torch.nn.Module:
    """Writes a model directory as save_pretrained does; returns the model it describes."""
    config = tiny_config(arch)
    torch.manual_seed(1234)  # not the command's seed: loaded weights differ from its random ones
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if weights:  # DeepSeek-V2 in shards, as large checkpoints come
        model.save_pretrained(path, max_shard_size="100KB" if arch == "deepseek_v2" else "1GB")
    else:
        config.save_pretrained(path)
    if tokenizer:
        save_tokenizer(path)
    return model


def save_tokenizer(path: Path) -> None:
    """A word-level tokenizer of TEXT's words, built offline with the tokenizers library."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    fast.save_pretrained(path)


def diagnose(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """Runs ``moe-devkit diagnose ARGV`` in-process: (exit code, stdout, stderr)."""
    code = main(["diagnose", *map(str, argv), "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


def read_report(out: Path) -> dict[str, Any]:
    """The routing section of ``out/report.json``, after checking the three files are there."""
    for name in ("report.json", "routing_analysis.png", "report.html"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "routing_analysis.png").read_bytes().startswith(b"\x89PNG")
    assert "<html" in (out / "report.html").read_text().lower()
    routing: dict[str, Any] = json.loads((out / "report.json").read_text())["sections"]["routing"]
    return routing


def assert_full_report(routing: dict[str, Any], *, layers: int, steps: int = STEPS) -> None:
    """Every layer present, each token routed to TOP_K of EXPERTS experts at every step."""
    assert len(routing["layers"]) == layers, list(routing["layers"])
    tokens = steps * BATCH * SEQ
    for name, layer in routing["layers"].items():
        counts = layer["utilization"]["counts"]
        assert len(counts) == EXPERTS, name
        assert layer["tokens"] == tokens, name
        assert sum(counts) == tokens * TOP_K, name
        assert sum(c > 0 for c in counts) >= 2, (name, counts)
        assert layer["k"]["histogram"][TOP_K] == tokens, name


def assert_one_line_error(code: int, out: str, err: str, *fragments: str, stdout: str = "") -> None:
    """Exit 2, one line on stderr naming the fragments, and on stdout nothing (or, for a
    run that started, ``stdout``: its first progress line)."""
    assert code == 2, err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("moe-devkit diagnose: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert out == stdout, out


# ----------------------------------------------------------------------------- --model DIR


@pytest.mark.parametrize("weights", [True, False], ids=["weights", "config-only"])
@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v2", "qwen3_next"])
def test_model_directory_writes_a_full_report(
    arch: str, weights: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, out = tmp_path / "model", tmp_path / "report"
    model = save_model_dir(model_dir, arch, weights=weights)
    sharded = (model_dir / "model.safetensors.index.json").exists()
    assert sharded == (weights and arch == "deepseek_v2")
    code, stdout, err = diagnose(capsys, "--model", model_dir, *WORKLOAD, "--out", out)
    assert code in (0, 1), err
    routing = read_report(out)
    assert_full_report(routing, layers=2)
    run = routing["config"]["run"]
    assert run["source"] == str(model_dir) and run["kind"] == "directory"
    assert run["class"] == type(model).__name__
    assert run["config_class"] == type(model.config).__name__
    assert run["parameters"] == sum(p.numel() for p in model.parameters())
    assert run["weights"] == ("loaded" if weights else "random")
    assert run["inputs"] == {
        "kind": "tokens",
        "size": 64,
        "rule": "config.vocab_size",
        "text_tokens": None,
    }
    assert (run["steps"], run["batch_size"], run["seq_len"], run["train"]) == (4, 2, 8, False)
    lines = stdout.splitlines()
    notes = [line for line in lines if line.startswith("note: ")]
    if weights:
        assert notes == []
    else:
        assert notes == [
            f"note: {model_dir} has no weights (*.safetensors, pytorch_model*.bin): random "
            "weights from config.json (seed 0)"
        ]
    ran = next(line for line in lines if line.startswith("ran: "))
    assert ran.startswith(f"ran: {type(model).__name__} from {model_dir} (")
    assert "4 steps x 2 x 8 = 64 tokens" in ran
    verdict = next(line for line in lines if line.startswith("verdict: "))
    assert lines.index(verdict) == lines.index(ran) + 1
    assert (" error" in verdict) == (code == 1), verdict


def _expert_counts_of(model: torch.nn.Module, windows: list[torch.Tensor]) -> list[list[int]]:
    """Per layer, how many tokens each expert received (hooks on the experts' inputs)."""
    counts: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def record(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            indices = args[1].reshape(-1)
            counts[name] = counts.get(name, 0) + torch.bincount(indices, minlength=EXPERTS)

        return record

    handles = [
        module.register_forward_pre_hook(hook(name))
        for name, module in model.named_modules()
        if type(module).__name__ == "OlmoeExperts"
    ]
    with torch.no_grad():
        for ids in windows:
            model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return [counts[name].tolist() for name in sorted(counts)]


def test_text_is_tokenized_with_the_directory_tokenizer_and_the_weights_are_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The report's counts are what the saved model's experts receive for the text's tokens,
    packed end to end into batch x seq-len windows: the weights were loaded, not drawn."""
    model_dir, out, text = tmp_path / "model", tmp_path / "report", tmp_path / "text.txt"
    model = save_model_dir(model_dir, "olmoe", weights=True, tokenizer=True)
    text.write_text(TEXT)
    code, stdout, err = diagnose(
        capsys, "--model", model_dir, "--text", text, *WORKLOAD, "--out", out
    )
    assert code in (0, 1), err
    routing = read_report(out)
    assert_full_report(routing, layers=2)
    ids = [WORDS.index(word) + 1 for word in TEXT.split()]
    assert routing["config"]["run"]["inputs"]["text_tokens"] == len(ids)
    stream = torch.tensor(ids)  # the run takes 4 x 2 x 8 = 64 of them
    per_step = BATCH * SEQ
    windows = [stream[s * per_step : (s + 1) * per_step].view(BATCH, SEQ) for s in range(STEPS)]
    expected = _expert_counts_of(model, windows)
    layers = [routing["layers"][name] for name in sorted(routing["layers"])]
    assert [layer["utilization"]["counts"] for layer in layers] == expected
    assert f"text {text} ({len(ids)} tokens)" in stdout


def test_weights_missing_from_the_checkpoint_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint without one router's weight: the run says so and the report lists it."""
    from safetensors.torch import load_file, save_file

    model_dir, out = tmp_path / "model", tmp_path / "report"
    save_model_dir(model_dir, "olmoe", weights=True)
    weights = load_file(model_dir / "model.safetensors")
    del weights["model.layers.1.mlp.gate.weight"]
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    argv = ["--steps", "2", "--batch-size", "2", "--seq-len", "8", "--out", out]
    code, stdout, err = diagnose(capsys, "--model", model_dir, *argv)
    assert code in (0, 1), err
    run = read_report(out)["config"]["run"]
    assert (run["weights"], run["missing_weights"]) == (
        "loaded",
        ["model.layers.1.mlp.gate.weight"],
    )
    lines = stdout.splitlines()
    assert [line for line in lines if line.startswith("note: ")] == [
        "note: 1 weight missing from the checkpoint, left random: model.layers.1.mlp.gate.weight"
    ]
    assert f"ran: OlmoeForCausalLM from {model_dir} (weights loaded, 1 missing)" in stdout


# ----------------------------------------------------------------------------- factory


FACTORIES = """
import torch
import transformers

from moe_devkit.config import RouterConfig
from moe_devkit.routers.torch_router import MoEModel


def reference():
    config = RouterConfig(
        hidden_size=16, expert_hidden_size=32, complexity_hidden_size=4, num_experts=8,
        min_k=2, max_k=2,
    )
    return MoEModel(config, num_layers=1)


def olmoe():
    config = transformers.OlmoeConfig(
        hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64, max_position_embeddings=64, num_experts=8,
        num_experts_per_tok=2,
    )
    return transformers.OlmoeForCausalLM(config)


NOT_CALLABLE = 3


def raises():
    raise RuntimeError("the factory failed")


def no_module():
    return {"model": None}


def featureless():
    return torch.nn.Sequential(torch.nn.ReLU())


class Broken(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = reference()

    def forward(self, x):
        raise ValueError("this model wants a dict")


def broken():
    return Broken()
"""


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module of factories in the current directory (tmp_path), as a user writes one."""
    name = "diagnose_model_factories"
    (tmp_path / f"{name}.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(__import__("sys").modules, name, raising=False)
    return name


def test_factory_of_a_transformers_model_writes_a_full_report(
    factories: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    code, stdout, err = diagnose(capsys, "--model", f"{factories}:olmoe", *WORKLOAD, "--out", out)
    assert code in (0, 1), err
    routing = read_report(out)
    assert_full_report(routing, layers=2)
    run = routing["config"]["run"]
    assert (run["kind"], run["class"], run["weights"]) == ("factory", "OlmoeForCausalLM", "factory")
    assert run["inputs"]["kind"] == "tokens" and run["inputs"]["size"] == 64
    assert f"ran: OlmoeForCausalLM from {factories}:olmoe (built by the factory)" in stdout


def test_the_installed_command_imports_a_factory_from_the_current_directory(
    tmp_path: Path,
) -> None:
    """The ``moe-devkit`` script, whose own folder is first on sys.path, finds a factory
    module in the directory it runs in, as ``python -m`` would; a model without a
    vocabulary gets float inputs of its config's hidden size."""
    script = Path(sys.executable).with_name("moe-devkit")
    assert script.exists(), "the dev install provides the moe-devkit script"
    (tmp_path / "my_moe.py").write_text(
        "from moe_devkit.config import RouterConfig\n"
        "from moe_devkit.routers.torch_router import MoEModel\n\n\n"
        "def build():\n"
        "    config = RouterConfig(hidden_size=16, expert_hidden_size=32,\n"
        "                          complexity_hidden_size=4, num_experts=8, min_k=2, max_k=2)\n"
        "    return MoEModel(config, num_layers=1)\n"
    )
    argv = ["diagnose", "--model", "my_moe:build", *WORKLOAD, "--device", "cpu", "--out", "r"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(script), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode in (0, 1), proc.stderr
    routing = read_report(tmp_path / "r")
    assert_full_report(routing, layers=1)
    inputs = routing["config"]["run"]["inputs"]
    assert (inputs["kind"], inputs["size"], inputs["rule"]) == ("hidden", 16, "config.hidden_size")
    assert "ran: MoEModel from my_moe:build (built by the factory)" in proc.stdout
    assert "random float inputs [batch, seq, 16] (config.hidden_size)" in proc.stdout


# ----------------------------------------------------------------------------- --train


def test_train_changes_the_routing_and_lowers_the_loss(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same model, same text, with and without --train: the trained run routes apart from
    the frozen one after its first steps, and its loss (the LM loss with the model's router
    loss) goes down."""
    model_dir, text = tmp_path / "model", tmp_path / "text.txt"
    save_model_dir(model_dir, "olmoe", weights=False, tokenizer=True)
    text.write_text(TEXT)
    steps = ["--steps", "8", "--batch-size", "2", "--seq-len", "8", "--text", str(text)]
    runs = {}
    for train in (False, True):
        out = tmp_path / f"report-{train}"
        extra = ["--train", "--lr", "0.01"] if train else []
        code, stdout, err = diagnose(capsys, "--model", model_dir, *steps, *extra, "--out", out)
        assert code in (0, 1), err
        runs[train] = (read_report(out), stdout)
    frozen, trained = runs[False][0], runs[True][0]
    assert_full_report(trained, layers=2, steps=8)
    run = trained["config"]["run"]
    assert (run["train"], run["optimizer"], run["lr"]) == (True, "AdamW", 0.01)
    losses = run["losses"]
    assert len(losses) == 8 and all(loss > 0 for loss in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert frozen["config"]["run"]["train"] is False and "losses" not in frozen["config"]["run"]
    for name, layer in trained["layers"].items():
        windows = [w["counts"] for w in layer["windows"]]
        frozen_windows = [w["counts"] for w in frozen["layers"][name]["windows"]]
        assert len(windows) == len(frozen_windows) == 4
        assert sum(windows[0]) == sum(frozen_windows[0]) == 2 * BATCH * SEQ * TOP_K
    moved = [
        (name, i)
        for name, layer in trained["layers"].items()
        for i, window in enumerate(layer["windows"])
        if window["counts"] != frozen["layers"][name]["windows"][i]["counts"]
    ]
    assert any(i >= 2 for _, i in moved), moved  # the routing keeps moving as it trains
    stdout = runs[True][1]
    assert "training: 8/8 steps (100%)" in stdout
    ran = next(line for line in stdout.splitlines() if line.startswith("ran: "))
    assert f"trained with AdamW (lr 0.01), loss {losses[0]:.4g} -> {losses[-1]:.4g}" in ran


def test_the_reference_trains_too_and_its_run_is_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--model reference (the default) with --train: AdamW steps on the reference loss (the
    output's mean square plus its aux loss); the report records the reference run."""
    out = tmp_path / "report"
    small = ["--hidden-size", "16", "--layers", "1", "--num-experts", "8", "--min-k", "2"]
    small += ["--max-k", "2", *WORKLOAD, "--train", "--lr", "0.01"]
    code, stdout, err = diagnose(capsys, *small, "--out", out)
    assert code in (0, 1), err
    routing = read_report(out)
    assert_full_report(routing, layers=1)
    run = routing["config"]["run"]
    assert (run["kind"], run["class"], run["weights"], run["train"]) == (
        "reference",
        "MoEModel",
        "random",
        True,
    )
    assert len(run["losses"]) == STEPS and run["losses"][-1] < run["losses"][0], run["losses"]
    ran = next(line for line in stdout.splitlines() if line.startswith("ran: "))
    assert ran.startswith("ran: torch reference model, 1 layer x 8 experts, hidden 16, k 2-2")
    assert "trained with AdamW (lr 0.01)" in ran


# ----------------------------------------------------------------------------- errors


def test_a_missing_directory_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, missing = tmp_path / "report", tmp_path / "no-such-model"
    result = diagnose(capsys, "--model", missing, "--out", out)
    assert_one_line_error(*result, f"--model {str(missing)!r}: no such directory")
    assert not out.exists()


def test_a_directory_without_config_json_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, empty = tmp_path / "report", tmp_path / "empty"
    empty.mkdir()
    result = diagnose(capsys, "--model", empty, "--out", out)
    assert_one_line_error(*result, f"--model {str(empty)!r}: no config.json in the directory")
    assert not out.exists()


def test_a_config_that_is_not_moe_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, model_dir = tmp_path / "report", tmp_path / "llama"
    transformers.LlamaConfig(**COMMON).save_pretrained(model_dir)
    result = diagnose(capsys, "--model", model_dir, "--seq-len", "8", "--out", out)
    assert_one_line_error(
        *result, f"--model {str(model_dir)!r}: found no router", "LlamaForCausalLM (LlamaConfig)"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("attr", "message"),
    [
        ("nothing", "module {m} has no attribute 'nothing'"),
        ("NOT_CALLABLE", "{m}.NOT_CALLABLE is not callable (got int)"),
        ("raises", "{m}.raises() raised RuntimeError: the factory failed"),
        ("no_module", "{m}.no_module() must return a torch.nn.Module; got dict"),
        ("featureless", "cannot tell what to feed Sequential: it has no config.vocab_size"),
        (
            "broken",
            "step 1 failed on torch.float32 inputs [8x128x16]: ValueError: this model wants a dict",
        ),
    ],
)
def test_a_factory_that_gives_no_module_is_a_one_line_error(
    attr: str, message: str, factories: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    result = diagnose(capsys, "--model", f"{factories}:{attr}", "--out", out)
    started = "routing: 0/20 steps\n" if attr == "broken" else ""
    message = f"--model '{factories}:{attr}': " + message.format(m=factories)
    assert_one_line_error(*result, message, stdout=started)
    assert not out.exists()


def test_a_factory_module_that_cannot_be_imported_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both a module that is not there and one whose own import fails name the module."""
    (tmp_path / "diagnose_broken_factory.py").write_text("import no_such_package_xyz\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "report"
    result = diagnose(capsys, "--model", "no_such_module_xyz:build", "--out", out)
    assert_one_line_error(
        *result,
        "--model 'no_such_module_xyz:build': cannot import no_such_module_xyz: "
        "ModuleNotFoundError: No module named 'no_such_module_xyz'",
    )
    result = diagnose(capsys, "--model", "diagnose_broken_factory:build", "--out", out)
    assert_one_line_error(
        *result,
        "--model 'diagnose_broken_factory:build': cannot import diagnose_broken_factory: "
        "ModuleNotFoundError: No module named 'no_such_package_xyz'",
    )
    assert not out.exists()


def test_a_bad_source_string_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    result = diagnose(capsys, "--model", "not a model", "--out", out)
    assert_one_line_error(
        *result,
        "--model expects 'reference', a transformers model directory (with config.json) or a "
        "Python path 'pkg.module:factory'; got 'not a model'",
    )
    assert not out.exists()


@pytest.mark.parametrize("content", [None, "", " \n\n "], ids=["missing", "empty", "blank"])
def test_a_missing_or_empty_text_file_is_a_one_line_error(
    content: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, out, text = tmp_path / "model", tmp_path / "report", tmp_path / "text.txt"
    config = tiny_config("olmoe")
    config.save_pretrained(model_dir)
    save_tokenizer(model_dir)
    if content is not None:
        text.write_text(content)
    result = diagnose(capsys, "--model", model_dir, "--text", text, "--out", out)
    expected = "no such file" if content is None else "is empty"
    assert_one_line_error(*result, f"--text {str(text)!r}", expected)
    assert not out.exists()


def test_a_directory_without_transformers_installed_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers is imported only for a model directory; without it the error names the
    extra to install."""
    out, model_dir = tmp_path / "report", tmp_path / "model"
    tiny_config("olmoe").save_pretrained(model_dir)
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an install without it sees
    result = diagnose(capsys, "--model", model_dir, "--out", out)
    assert_one_line_error(
        *result,
        f"--model {str(model_dir)!r}: a model directory needs transformers, not installed "
        """here: `pip install "moe-devkit[hf]"`""",
    )
    assert not out.exists()


class _Holder(torch.nn.Module):
    def __init__(self, *children: torch.nn.Module, config: Any = None, hidden: Any = None):
        super().__init__()
        self.body = torch.nn.Sequential(*children)
        if config is not None:
            self.config = config
        if hidden is not None:
            self.hidden_size = hidden


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            _Holder(torch.nn.Linear(4, 4), config=SimpleNamespace(vocab_size=10, hidden_size=4)),
            ("tokens", 10, "config.vocab_size"),
        ),
        (
            _Holder(torch.nn.Linear(4, 4), torch.nn.Embedding(12, 4)),
            ("tokens", 12, "nn.Embedding body.1"),
        ),
        (
            _Holder(torch.nn.Linear(4, 4), config=SimpleNamespace(d_model=6)),
            ("hidden", 6, "config.d_model"),
        ),
        (_Holder(torch.nn.Linear(4, 4), hidden=7), ("hidden", 7, "hidden_size")),
        (_Holder(torch.nn.ReLU(), torch.nn.Linear(5, 3)), ("hidden", 5, "nn.Linear body.1")),
    ],
    ids=["config.vocab_size", "embedding", "config.d_model", "hidden_size", "first-linear"],
)
def test_the_inputs_rule_reads_the_vocabulary_then_the_hidden_size(
    model: torch.nn.Module, expected: tuple[str, int, str]
) -> None:
    inputs = model_inputs(model, parse_source("reference"))
    assert (inputs.kind, inputs.size, inputs.rule) == expected


def test_options_the_model_cannot_take_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --seq-len beyond the model's positions, --text without a tokenizer, and a model
    directory under --framework jax (which runs the reference only)."""
    model_dir, out, text = tmp_path / "model", tmp_path / "report", tmp_path / "text.txt"
    tiny_config("olmoe").save_pretrained(model_dir)
    text.write_text(TEXT)
    result = diagnose(capsys, "--model", model_dir, "--seq-len", "65", "--out", out)
    assert_one_line_error(
        *result, "--seq-len must be <= the model's max_position_embeddings (64); got 65"
    )
    result = diagnose(capsys, "--model", model_dir, "--text", text, "--out", out)
    assert_one_line_error(
        *result,
        "--text needs the model's tokenizer, and its directory has none",
        f"got --model {str(model_dir)!r}",
    )
    result = diagnose(capsys, "--model", model_dir, "--framework", "jax", "--out", out)
    assert_one_line_error(
        *result,
        f"--framework jax runs the reference model only, untrained; got --model {str(model_dir)!r}",
    )
    assert not out.exists()

"""The readers of other stacks' routing records: each test writes a fixture in the documented
layout (vLLM's routed-experts arrays, Megatron-LM router records as JSON lines, sglang's
expert-distribution dumps), reads it, and checks the result against the source arrays
exactly, padding sentinels (E, 255, -1) as -1; bad files are one clear ValueError."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_zoo import build_tiny
from torch import nn

from moe_devkit.inspect.trace import RoutingTrace, RoutingTraceRecorder, compare_traces
from moe_devkit.inspect.trace_readers import (
    ExpertCounts,
    compare_counts,
    detect_format,
    map_sentinels,
    read_megatron,
    read_sglang,
    read_trace,
    read_vllm,
)

E, L, K = 8, 3, 2


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def recorded() -> RoutingTrace:
    """A trace of one 12-token sequence of a real tiny Mixtral (3 layers, 8 experts, top-2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model: nn.Module = build_tiny("mixtral").eval()
        ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
        with RoutingTraceRecorder(model) as recorder, torch.no_grad():
            model(input_ids=ids)
        return recorder.trace()
    finally:
        torch.set_num_threads(threads)


def _ids(rng: np.random.Generator, tokens: int, experts: int = E) -> np.ndarray:
    """[tokens, L, K] distinct expert ids per (token, layer)."""
    return np.stack(
        [np.stack([rng.permutation(experts)[:K] for _ in range(L)]) for _ in range(tokens)]
    )


def _expected(ids: np.ndarray, experts: int = E) -> np.ndarray:
    """The source with its sentinels as -1, written out independently of the reader."""
    out = ids.astype(np.int64).copy()
    out[(out == experts) | (out == 255) | (out == -1)] = -1
    return out.astype(np.int32)


# ----------------------------------------------------------------------------- vLLM


def test_vllm_npz_prompt_and_generation(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    prompt = _ids(rng, 5).astype(np.int16)
    generated = _ids(rng, 4).astype(np.int16)
    prompt[1, 2, 1] = E  # k padded with E
    generated[3, 0, 1] = -1  # and with -1
    prompt_ids = rng.integers(0, 100, 5)
    token_ids = rng.integers(0, 100, 5)  # the last generated token was never fed back
    path = tmp_path / "request.npz"
    np.savez(
        path,
        prompt_routed_experts=prompt,
        routed_experts=generated,
        prompt_token_ids=prompt_ids,
        token_ids=token_ids,
    )
    assert detect_format(path) == "vllm"
    trace = read_vllm(path, E)
    source = np.concatenate([prompt, generated])
    assert trace.expert_ids.dtype == np.int32
    assert np.array_equal(trace.expert_ids, _expected(source))
    assert trace.expert_ids[1, 2, 1] == -1 and trace.expert_ids[8, 0, 1] == -1
    assert np.array_equal(trace.token_ids, np.concatenate([prompt_ids, token_ids[:4]]))
    assert np.array_equal(trace.positions, np.arange(9))
    assert np.array_equal(trace.sequence, np.zeros(9))
    assert trace.layers == ["layers.0", "layers.1", "layers.2"] and trace.num_experts == [E] * L
    # round trip through this package's .npz: the same trace
    again = RoutingTrace.load(trace.save(tmp_path / "native.npz"))
    assert np.array_equal(again.expert_ids, trace.expert_ids)
    assert compare_traces(trace, again).identical
    assert read_trace(path, num_experts=E).expert_ids.tolist() == trace.expert_ids.tolist()


def test_vllm_array_of_a_recorded_trace_compares_identical(
    recorded: RoutingTrace, tmp_path: Path
) -> None:
    """A recorded trace written as vLLM writes it (int16, k padded with E) reads back as the
    same routing: compare_traces finds no difference in any layer."""
    ids = recorded.expert_ids.astype(np.int16)
    ids[ids < 0] = E
    path = tmp_path / "routed.npy"
    np.save(path, ids)
    read = read_vllm(path, recorded.num_experts, layers=recorded.layers)
    assert np.array_equal(read.expert_ids, recorded.expert_ids)
    result = compare_traces(recorded, read)
    assert result.tokens_compared == 12 and result.any_layer_differs == 0.0
    assert all(layer.jaccard == 1.0 for layer in result.layers)


def test_vllm_batch_drops_padding_rows_and_pt_forms(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    batch = np.full((2, 6, L, K), 255, dtype=np.uint8)  # uint8 padded with 255
    first, second = _ids(rng, 6), _ids(rng, 4)
    batch[0], batch[1, :4] = first, second
    path = tmp_path / "batch.npy"
    np.save(path, batch)
    trace = read_vllm(path, E)
    assert np.array_equal(trace.expert_ids, np.concatenate([first, second]).astype(np.int32))
    assert trace.sequence.tolist() == [0] * 6 + [1] * 4
    assert trace.positions.tolist() == [*range(6), *range(4)]
    # a .pt list of per-request tensors: the same trace
    listed = tmp_path / "requests.pt"
    torch.save([torch.from_numpy(first), torch.from_numpy(second)], listed)
    assert detect_format(listed) == "vllm"
    from_list = read_vllm(listed, E)
    assert np.array_equal(from_list.expert_ids, trace.expert_ids)
    assert np.array_equal(from_list.sequence, trace.sequence)
    # a .pt tensor of one request
    one = tmp_path / "one.pt"
    torch.save(torch.from_numpy(first.astype(np.int16)), one)
    assert np.array_equal(read_vllm(one, E).expert_ids, first.astype(np.int32))


def test_sentinels_and_bad_ids() -> None:
    ids = np.array([[[0, 8]], [[255, -1]], [[7, 3]]])
    assert map_sentinels(ids, [8], "x").tolist() == [[[0, -1]], [[-1, -1]], [[7, 3]]]
    with pytest.raises(ValueError, match=r"x: expert id 9 at token 0, layer 0 is neither"):
        map_sentinels(np.array([[[9, 1]]]), [8], "x")
    # from 256 experts on, 255 is an expert, not padding
    wide = map_sentinels(np.array([[[255, 300]]]), [300], "x")
    assert wide.tolist() == [[[255, -1]]]
    with pytest.raises(ValueError, match=r"expected an integer array \[tokens, layers, k\]"):
        map_sentinels(np.zeros((2, 1, 2), np.float32), [8], "x")


def test_vllm_errors_name_file_and_expectation(tmp_path: Path) -> None:
    bad_shape = tmp_path / "flat.npy"
    np.save(bad_shape, np.zeros((4, 2), np.int64))
    with pytest.raises(ValueError, match=rf"{bad_shape}: expected routed experts \[tokens"):
        read_vllm(bad_shape, E)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, something=np.zeros(3))
    with pytest.raises(
        ValueError, match=r"not a routing record: .*vLLM's prompt_routed_experts or routed_experts"
    ):
        detect_format(wrong)
    with pytest.raises(ValueError, match=r"num_experts must be an int >= 1 or one per layer"):
        read_vllm(_saved(tmp_path), [8, 8])
    with pytest.raises(ValueError, match="needs num_experts"):
        read_trace(_saved(tmp_path))
    text = tmp_path / "text.npy"
    text.write_text("no array")
    with pytest.raises(ValueError, match=r"not a readable \.npy/\.npz file"):
        read_vllm(text, E)
    with pytest.raises(FileNotFoundError):
        read_trace(tmp_path / "missing.npy", num_experts=E)


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "ok.npy"
    np.save(path, _ids(np.random.default_rng(2), 3))
    return path


# ----------------------------------------------------------------------------- Megatron


def test_megatron_jsonl_sequence_major_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    seq_len, b = 3, 2
    lines, expected_rows = [], []
    for step in (0, 1):
        per_layer = [
            np.stack([rng.permutation(E)[:K] for _ in range(seq_len * b)]) for _ in range(L)
        ]
        per_layer[2][1, 1] = -1  # a dynamic-k router's padding
        tokens = rng.integers(0, 100, seq_len * b)
        for layer, ids in enumerate(per_layer):
            lines.append(
                json.dumps(
                    {
                        "step": step,
                        "layer": layer,
                        "micro_batch_size": b,
                        "num_experts": E,
                        "token_ids": tokens.tolist(),
                        "topk_indices": ids.tolist(),
                    }
                )
            )
        for r in range(seq_len * b):
            # row r of a [s, b] microbatch is position r // b of sequence r % b
            expected_rows.append(
                (step * b + r % b, r // b, tokens[r], [per_layer[j][r] for j in range(L)])
            )
    path = tmp_path / "router.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert detect_format(path) == "megatron"
    trace = read_megatron(path)
    assert trace.num_experts == [E] * L and trace.layers == ["layers.0", "layers.1", "layers.2"]
    assert trace.sequence.tolist() == [row[0] for row in expected_rows]
    assert trace.positions.tolist() == [row[1] for row in expected_rows]
    assert trace.token_ids.tolist() == [row[2] for row in expected_rows]
    assert np.array_equal(trace.expert_ids, np.array([row[3] for row in expected_rows]))
    assert trace.expert_ids[1, 2, 1] == -1
    again = RoutingTrace.load(trace.save(tmp_path / "native.npz"))
    assert compare_traces(trace, again).identical


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", r"line 1: not JSON"),
        ("[1, 2]", r"line 1: expected a JSON object; got list"),
        ('{"topk_indices": [[1, 2]]}', r"line 1: 'layer' must be int; got None"),
        ('{"layer": 0, "topk_indices": [1, 2]}', r"line 1: 'topk_indices' must be a list"),
        ('{"layer": 0, "topk_indices": [[1.5, 2]]}', r"line 1: 'topk_indices' must be a list"),
        ('{"layer": 0, "topk_indices": [[1, 2]]}', r"num_experts is not in the records"),
        ('{"layer": 0, "num_experts": 8, "topk_indices": [[1, 9]]}', r"expert id 9 at token 0"),
        (
            '{"layer": 0, "micro_batch_size": 2, "num_experts": 8, "topk_indices": [[1, 2]]}',
            r"'micro_batch_size' must be >= 1 and divide the 1 rows; got 2",
        ),
    ],
)
def test_megatron_errors(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "router.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        read_megatron(path)


# ----------------------------------------------------------------------------- sglang


def test_sglang_stat_dump_sums_the_steps(tmp_path: Path, recorded: RoutingTrace) -> None:
    """A stat-mode dump of the recorded trace's counts, split over two steps, reads to the
    trace's own counts: compare_counts finds the same loads."""
    counts = np.zeros((L, E), np.int64)
    for layer in range(L):  # counted here directly from the source ids
        for expert in recorded.expert_ids[:, layer].reshape(-1):
            if expert >= 0:
                counts[layer, expert] += 1
    first = counts // 2
    steps = torch.from_numpy(np.stack([first, counts - first]).astype(np.int32))
    path = tmp_path / "expert_distribution_recorder_1.0.pt"
    torch.save(
        {"rank": 0, "logical_count": steps, "average_utilization_rate_over_window": None}, path
    )
    assert detect_format(path) == "sglang"
    read = read_sglang(path, layers=recorded.layers)
    assert np.array_equal(read.counts, counts) and read.num_experts == [E] * L
    of_trace = ExpertCounts.from_trace(recorded)
    assert np.array_equal(of_trace.counts, counts)
    result = compare_counts(of_trace, read)
    assert [layer.total_variation for layer in result.layers] == [0.0] * L
    assert result.findings() == []
    with pytest.raises(ValueError, match="per-layer counts, not per-token experts"):
        read_trace(path)


def test_sglang_per_token_records_map_physical_to_logical(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    physical = 10  # 8 logical experts and 2 redundant copies
    mapping = np.stack([np.concatenate([np.arange(E), rng.integers(0, E, 2)]) for _ in range(L)])
    records = []
    expected = np.zeros((L, E), np.int64)
    for n in (4, 3):
        ids = np.full((L, n, 8), -1, np.int32)  # sglang pads its top-k buffer to 8 with -1
        ids[:, :, :K] = rng.integers(0, physical, (L, n, K))
        for layer in range(L):
            for p in ids[layer, :, :K].reshape(-1):
                expected[layer, mapping[layer, p]] += 1
        records.append(
            {"forward_pass_id": len(records), "rank": 0, "topk_ids_of_layer": torch.from_numpy(ids)}
        )
    path = tmp_path / "expert_distribution_recorder_2.0_0.pt"
    torch.save(
        {"records": records, "last_physical_to_logical_map": torch.from_numpy(mapping)}, path
    )
    read = read_sglang(path)
    assert np.array_equal(read.counts, expected)
    assert read.metadata["mode"] == "per_token"


def test_count_comparison_of_different_loads() -> None:
    a = ExpertCounts(np.array([[3, 1, 0, 0], [2, 2, 2, 2]]), ["x", "y"], [4, 4])
    b = ExpertCounts(np.array([[1, 3, 0, 0], [2, 2, 2, 2]]), ["x", "y"], [4, 4])
    result = compare_counts(a, b)
    # x: shares (.75, .25) vs (.25, .75): total variation 0.5, largest gap 0.5; y equal
    assert [(r.layer, r.total_variation, r.max_share_diff) for r in result.layers] == [
        ("x", 0.5, 0.5),
        ("y", 0.0, 0.0),
    ]
    assert [f.location for f in result.findings(0.4)] == ["x"]
    assert result.findings(0.5) == []
    with pytest.raises(ValueError, match="the counts share no layer"):
        compare_counts(a, ExpertCounts(np.zeros((1, 4), np.int64), ["z"], [4]))


def test_sglang_errors(tmp_path: Path) -> None:
    path = tmp_path / "dump.pt"
    torch.save({"rank": 0}, path)
    with pytest.raises(
        ValueError, match=r"not an sglang expert-distribution dump: expected a dict"
    ):
        read_sglang(path)
    torch.save({"logical_count": torch.zeros(2, 3, 4)}, path)
    with pytest.raises(ValueError, match=r"logical_count must be non-negative integers"):
        read_sglang(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"not a readable \.pt file"):
        read_sglang(path)

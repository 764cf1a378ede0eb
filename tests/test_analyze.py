"""Analysis against a brute-force reference written independently of moeprof's policy code."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
from conftest import random_trace

import moeprof
from moeprof.analyze import expert_masks
from moeprof.errors import MoeprofError
from moeprof.trace import Trace


def reference_batches(trace: Trace, policy: str, b: int) -> list[list[int]]:
    """Rows of each batch, by direct simulation (one Python step at a time)."""
    n = trace.n_tokens
    if policy == "tokens":
        return [list(range(s, min(n, s + b))) for s in range(0, n, b)]
    if policy == "recorded":
        groups: dict[int, list[int]] = defaultdict(list)
        for row, step in enumerate(trace.steps.tolist()):
            groups[step].append(row)
        return [groups[s] for s in sorted(groups)]
    # decode: continuous batching with b slots
    rows_of: dict[int, list[tuple[int, int]]] = defaultdict(list)
    order: list[int] = []
    for row, (req, pos) in enumerate(zip(trace.request_ids.tolist(), trace.positions.tolist())):
        if req not in rows_of:
            order.append(req)
        rows_of[req].append((pos, row))
    waiting = [sorted(rows_of[r]) for r in order]
    active: list[list[tuple[int, int]]] = []
    batches = []
    while waiting or active:
        while len(active) < b and waiting:
            active.append(waiting.pop(0))
        batches.append([req_rows.pop(0)[1] for req_rows in active])
        active = [req_rows for req_rows in active if req_rows]
    return batches


def reference_counts(trace: Trace, batches: list[list[int]]) -> tuple[list[int], list[int]]:
    ids = trace.expert_ids.tolist()
    n_exp = trace.n_experts.tolist()
    requests = [0] * trace.n_layers
    unique = [0] * trace.n_layers
    for rows in batches:
        for layer in range(trace.n_layers):
            chosen = [e for r in rows for e in ids[r][layer] if e != n_exp[layer]]
            requests[layer] += len(chosen)
            unique[layer] += len(set(chosen))
    return requests, unique


def reference_uniform(trace: Trace, batches: list[list[int]]) -> list[float]:
    """Σ_b E·(1 − Π_t (1 − k_t/E)) per layer, k_t = the token's routed (non-sentinel) slots."""
    ids = trace.expert_ids.tolist()
    n_exp = trace.n_experts.tolist()
    out = [0.0] * trace.n_layers
    for rows in batches:
        for layer in range(trace.n_layers):
            e = n_exp[layer]
            miss = math.prod(1 - sum(x != e for x in ids[r][layer]) / e for r in rows)
            out[layer] += e * (1 - miss)
    return out


@pytest.mark.parametrize("policy", ["tokens", "decode", "recorded"])
def test_policies_match_brute_force(policy: str) -> None:
    rng = np.random.default_rng(1234)
    for _ in range(120):
        trace = random_trace(rng)
        sizes = sorted({int(x) for x in rng.integers(1, 12, size=3)} | {1})
        result = moeprof.analyze(trace, sizes, policy=policy)
        rows = result.results
        assert len(rows) == (1 if policy == "recorded" else len(sizes))
        for row in rows:
            batches = reference_batches(trace, policy, row.batch_size)
            requests, unique = reference_counts(trace, batches)
            assert row.n_batches == len(batches)
            assert [layer.requests for layer in row.layers] == requests
            assert [layer.unique for layer in row.layers] == unique
            assert row.requests == sum(requests) and row.unique == sum(unique)
            eb = trace.expert_bytes.tolist()
            assert row.bytes_requested == sum(r * e for r, e in zip(requests, eb))
            assert row.bytes_unique == sum(u * e for u, e in zip(unique, eb))
            if sum(requests):
                assert row.memory_savings == pytest.approx(1 - sum(unique) / sum(requests))
            bytes_req = row.bytes_requested
            if bytes_req:
                assert row.bandwidth_savings == pytest.approx(1 - row.bytes_unique / bytes_req)
            uniform = reference_uniform(trace, batches)
            assert [layer.uniform_unique for layer in row.layers] == pytest.approx(uniform)
            if sum(requests):
                want = 1 - sum(uniform) / sum(requests)
                assert row.uniform_memory_savings == pytest.approx(want)


def test_plan_batches_rows_match_reference() -> None:
    rng = np.random.default_rng(7)
    for _ in range(60):
        trace = random_trace(rng)
        for policy in ("tokens", "decode", "recorded"):
            b = int(rng.integers(1, 6))
            plan = moeprof.plan_batches(trace, policy, b)
            got = [sorted(plan.rows(i).tolist()) for i in range(plan.n_batches)]
            want = [sorted(rows) for rows in reference_batches(trace, policy, b)]
            assert got == want, policy


def test_uniform_expectation_formula() -> None:
    trace = moeprof.synthesize(
        n_experts=8, top_k=2, n_layers=2, n_requests=1, tokens_per_request=64, seed=3
    )
    row = moeprof.analyze(trace, [8]).results[0]
    expected_unique = 8 * (1 - (1 - 2 / 8) ** 8)  # per full batch of 8 tokens
    assert row.uniform_unique == pytest.approx(2 * 8 * expected_unique)
    assert row.uniform_memory_savings == pytest.approx(1 - expected_unique / 16)
    # Short last batch uses its own size.
    trace = moeprof.synthesize(
        n_experts=8, top_k=2, n_layers=1, n_requests=1, tokens_per_request=10, seed=3
    )
    row = moeprof.analyze(trace, [8]).results[0]
    want = 8 * (1 - 0.75**8) + 8 * (1 - 0.75**2)
    assert row.uniform_unique == pytest.approx(want)


def test_uniform_synthetic_routing_matches_uniform_expectation() -> None:
    trace = moeprof.synthesize(
        n_experts=16, top_k=2, n_layers=4, n_requests=50, tokens_per_request=200, seed=11
    )
    for row in moeprof.analyze(trace, [2, 8, 32]).results:
        assert row.memory_savings == pytest.approx(row.uniform_memory_savings, abs=0.01)


def test_batch_size_one_saves_nothing_and_max_reuse() -> None:
    trace = moeprof.synthesize(n_experts=8, top_k=2, n_layers=3, seed=0, zipf=1.2)
    rows = moeprof.analyze(trace, [1, 16]).results
    assert rows[0].memory_savings == 0.0 and rows[0].unique == rows[0].requests
    big = rows[1]
    per_layer = [1 - layer.unique / layer.requests for layer in big.layers]
    assert big.max_reuse_factor == pytest.approx(max(per_layer))
    assert big.max_reuse_layer == int(np.argmax(per_layer))
    assert big.mean_reuse_factor == pytest.approx(float(np.mean(per_layer)))


def test_unknown_expert_bytes_bandwidth_equals_memory() -> None:
    ids = np.array([[[0, 1]], [[1, 2]], [[0, 1]]])
    trace = Trace.from_arrays(ids, n_experts=4)
    row = moeprof.analyze(trace, [3]).results[0]
    assert (row.requests, row.unique) == (6, 3)
    assert row.bytes_requested == 0
    assert row.bandwidth_savings == row.memory_savings == 0.5


def test_heterogeneous_expert_bytes_weight_bandwidth() -> None:
    # Layer 0: both tokens share expert 0 (1 saved of 2); layer 1: distinct (0 saved).
    ids = np.array([[[0], [0]], [[0], [1]]])
    trace = Trace.from_arrays(ids, n_experts=2, expert_bytes=[100, 300])
    row = moeprof.analyze(trace, [2]).results[0]
    assert row.memory_savings == pytest.approx(1 / 4)
    assert row.bandwidth_savings == pytest.approx(100 / 800)


def test_results_json_shape() -> None:
    trace = moeprof.synthesize(n_layers=2, seed=0)
    doc = moeprof.analyze(trace, [8, 1]).to_dict()
    assert doc["moeprof_version"] == moeprof.__version__
    assert doc["trace"]["n_tokens"] == trace.n_tokens
    assert [r["batch_size"] for r in doc["results"]] == [1, 8]
    for key in (
        "requests",
        "unique",
        "memory_savings",
        "bandwidth_savings",
        "bytes_requested",
        "bytes_unique",
        "policy",
        "layers",
        "uniform_memory_savings",
        "max_reuse_factor",
    ):
        assert key in doc["results"][1]
    assert set(doc["results"][1]["layers"][0]) >= {"layer", "requests", "unique", "memory_savings"}


@pytest.mark.parametrize(
    "bad,message",
    [
        ("0", "batch size must be at least 1, got 0"),
        ("-1", "batch size must be at least 1, got -1"),
        ("x", "batch size 'x' is not a whole number"),
        ("1.5", "batch size '1.5' is not a whole number"),
        ("", "no batch sizes given"),
        ("4,a", "batch size 'a' is not a whole number"),
        ("1,,2", "batch sizes '1,,2' have an empty item \\(two commas in a row"),
        ("1,2,", "batch sizes '1,2,' have an empty item"),
        (",", "no batch sizes given"),
        ("٣", "batch size '٣' is not a whole number"),
        ("1" * 5000, "batch size '1111111111"),
    ],
)
def test_bad_batch_sizes(bad: str, message: str) -> None:
    """`--batch-sizes` text is parsed at the command boundary; the library takes numbers."""
    from moeprof.commands._common import parse_batch_sizes

    with pytest.raises(MoeprofError, match=f"^{message}"):
        parse_batch_sizes(bad)
    assert parse_batch_sizes(" 8, 1,8 ") == [1, 8]
    trace = moeprof.synthesize(n_layers=1, seed=0)
    with pytest.raises(MoeprofError, match="batch sizes must be whole numbers, not the text"):
        moeprof.analyze(trace, bad)  # type: ignore[arg-type]


def test_unknown_policy_and_missing_steps() -> None:
    trace = moeprof.synthesize(n_layers=1, seed=0)
    with pytest.raises(MoeprofError, match="unknown policy"):
        moeprof.analyze(trace, [1], policy="greedy")
    with pytest.raises(MoeprofError, match="recorded steps"):
        moeprof.analyze(trace, [1], policy="recorded")


def test_empty_trace_is_an_error() -> None:
    trace = Trace.from_arrays(np.zeros((0, 2, 2), dtype=np.int64), n_experts=4)
    with pytest.raises(MoeprofError, match="empty"):
        moeprof.analyze(trace, [1])


def test_ids_out_of_range_rejected_by_analysis_of_loaded_trace() -> None:
    # Build a valid trace, then corrupt an id the way a foreign writer could.
    trace = Trace.from_arrays(np.array([[[0, 1]]]), n_experts=4)
    trace.expert_ids = np.array([[[0, 9]]], dtype=np.uint8)
    with pytest.raises(MoeprofError, match="out of range"):
        moeprof.analyze(trace, [1])


def test_decode_policy_fills_slots_from_queue() -> None:
    # Requests of lengths 3, 1, 2 with 2 slots: steps [A0 B0] [A1 C0] [A2 C1].
    req = np.array([0, 0, 0, 1, 2, 2])
    ids = np.arange(6).reshape(6, 1, 1)
    trace = Trace.from_arrays(ids, n_experts=8, request_ids=req)
    plan = moeprof.plan_batches(trace, "decode", 2)
    assert [sorted(plan.rows(i).tolist()) for i in range(plan.n_batches)] == [
        [0, 3],
        [1, 4],
        [2, 5],
    ]


def test_large_expert_counts_use_multiple_words() -> None:
    rng = np.random.default_rng(5)
    for n_exp in (64, 65, 128, 300):
        trace = random_trace(rng, n_tokens=40, n_layers=2, top_k=3, n_experts=n_exp)
        row = moeprof.analyze(trace, [40]).results[0]
        _, unique = reference_counts(trace, [list(range(40))])
        assert [layer.unique for layer in row.layers] == unique
        assert math.isfinite(row.memory_savings)


def test_uniform_expectation_counts_only_routed_slots() -> None:
    # Layer 0: top-2 of 4 experts, but the second token routes to one expert only (a sentinel).
    ids = np.array([[[0, 1]], [[2, 4]]])
    row = moeprof.analyze(Trace.from_arrays(ids, n_experts=4), [2]).results[0]
    want = 4 * (1 - (1 - 2 / 4) * (1 - 1 / 4))
    assert row.uniform_unique == pytest.approx(want)
    assert row.requests == 3
    assert row.uniform_memory_savings == pytest.approx(1 - want / 3)


def test_layer_without_routing_is_left_out_of_reuse_factors() -> None:
    # Layer 1 holds only sentinels: no requests, so no reuse factor, even though 0/0 reads as 0.
    ids = np.array([[[0], [2]], [[0], [2]], [[1], [2]], [[1], [2]]])
    row = moeprof.analyze(Trace.from_arrays(ids, n_experts=2), [4]).results[0]
    assert [layer.requests for layer in row.layers] == [4, 0]
    assert row.mean_reuse_factor == pytest.approx(0.5)
    assert row.max_reuse_layer == 0 and row.max_reuse_factor == pytest.approx(0.5)


def test_partly_known_expert_sizes_give_no_byte_totals() -> None:
    ids = np.array([[[0], [0]], [[0], [1]]])
    trace = Trace.from_arrays(ids, n_experts=2, expert_bytes=[100, 0])
    row = moeprof.analyze(trace, [2]).results[0]
    assert [layer.bytes_requested for layer in row.layers] == [200, 0]
    assert (row.bytes_requested, row.bytes_unique, row.bytes_saved) == (0, 0, 0)
    assert row.bandwidth_savings == row.memory_savings == pytest.approx(1 / 4)


def test_byte_totals_do_not_overflow_int64() -> None:
    # 2**20 tokens x 9 experts of 1 TiB: 9.4e6 requests x 2**40 B is beyond int64.
    n = 2**20
    ids = ((np.arange(n)[:, None] + np.arange(9)[None, :]) % 16)[:, None, :]
    trace = Trace.from_arrays(ids, n_experts=16, expert_bytes=2**40)
    row = moeprof.analyze(trace, [1, 2]).results[1]
    assert row.requests == 9 * n
    assert row.bytes_requested == 9 * n * 2**40 > 2**63
    assert row.bytes_unique == row.unique * 2**40


def test_batch_larger_than_the_trace_is_the_whole_trace() -> None:
    trace = moeprof.synthesize(n_experts=8, top_k=2, n_layers=1, n_requests=2, seed=1)
    whole = moeprof.analyze(trace, [trace.n_tokens]).results[0]
    for b in (trace.n_tokens + 1, 2**31 - 1):
        for policy in ("tokens", "decode"):
            row = moeprof.analyze(trace, [b], policy=policy).results[0]
            assert row.batch_size == b
            if policy == "tokens":
                assert (row.n_batches, row.unique) == (1, whole.unique)
    with pytest.raises(MoeprofError, match="at most"):
        moeprof.analyze(trace, [2**31])


def test_many_experts_need_no_quadratic_table() -> None:
    # 65,535 experts: a per-expert lookup table would take 65,536 x 1,024 words per layer.
    ids = np.array([[[0, 65534]], [[65534, 7]], [[65535, 1]]])
    trace = Trace.from_arrays(ids, n_experts=65535)
    masks = expert_masks(trace)
    assert masks.shape == (3, 1, 1024)
    row = moeprof.analyze(trace, [3]).results[0]
    assert (row.requests, row.unique) == (5, 4)


def test_uniform_from_bitsets_equals_uniform_from_ids() -> None:
    # k_t from the bitsets' popcount must equal the routed slots counted from the ids.
    rng = np.random.default_rng(3)
    for _ in range(20):
        trace = random_trace(rng, sentinel_rate=0.3)
        from moeprof.analyze import slots_per_token

        from_ids = slots_per_token(trace)
        from_masks = slots_per_token(trace, expert_masks(trace))
        if from_ids is None:
            assert from_masks is None
        else:
            assert np.array_equal(from_ids, from_masks)


def test_popcount_fallback_matches_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Older NumPy (no bitwise_count) counts bits through a byte table: same counts, same dtype."""
    import importlib

    analyze_mod = importlib.import_module("moeprof.analyze")  # the module, not the function

    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**63, size=(7, 3, 2), dtype=np.uint64) * 2 + 1
    want = np.array([bin(int(w)).count("1") for w in words.ravel()]).reshape(words.shape)
    got = analyze_mod._popcount_bytes(words[:, ::2])  # a strided view too
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want[:, ::2])
    np.testing.assert_array_equal(analyze_mod.popcount(words), want)
    # The whole analysis with the fallback gives the same numbers.
    trace = moeprof.synthesize(
        n_layers=2, n_experts=70, top_k=3, n_requests=4, tokens_per_request=16, seed=1
    )
    ref = moeprof.analyze(trace, [1, 4, 64]).to_dict()
    monkeypatch.delattr(np, "bitwise_count")
    assert moeprof.analyze(trace, [1, 4, 64]).to_dict() == ref

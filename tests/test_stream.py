"""Streaming analysis (moeprof.stream): chunks, shards and per-layer reads give exactly the
in-memory results; counts checked against an independent per-batch set() count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moeprof
from moeprof.batching import get_policy
from moeprof.cache import simulate_cache
from moeprof.errors import MoeprofError
from moeprof.schedule import schedule
from moeprof.shards import open_shards
from moeprof.stream import (
    InMemory,
    analyze_stream,
    default_chunk_tokens,
    map_range,
    merge,
    plan_index,
)
from moeprof.trace import Trace

POLICIES = ("tokens", "decode", "recorded", "serve")
SIZES = (1, 2, 3, 8, 64)


def make_trace(
    seed: int,
    *,
    n_tokens: int = 160,
    n_experts: tuple[int, ...] = (70, 9, 130),
    top_k: int = 3,
    sentinel_rate: float = 0.15,
    n_requests: int = 12,
) -> Trace:
    """Random routing with sentinels (empty slots), uneven expert counts per layer (> 64:
    several bitset words), steps and phases."""
    rng = np.random.default_rng(seed)
    n_layers = len(n_experts)
    ids = np.empty((n_tokens, n_layers, top_k), dtype=np.uint16)
    for layer, e in enumerate(n_experts):
        chosen = np.argsort(rng.random((n_tokens, e)), axis=1)[:, :top_k]
        empty = rng.random((n_tokens, top_k)) < sentinel_rate
        ids[:, layer, :] = np.where(empty, e, chosen)
    requests = np.sort(rng.integers(0, n_requests, n_tokens))
    return Trace.from_arrays(
        ids,
        n_experts=list(n_experts),
        request_ids=requests,
        steps=rng.integers(0, n_tokens // 3, n_tokens),
        phase=rng.integers(0, 2, n_tokens),
        expert_bytes=[1000 + i for i in range(n_layers)],
    )


def far_apart_decode_trace() -> Trace:
    """Two long requests and many short ones between them: decode steps pair rows hundreds of
    rows apart (step 0 holds row 0 and the first row of the last request)."""
    rng = np.random.default_rng(7)
    lengths = [200] + [2] * 50 + [200]
    requests = np.repeat(np.arange(len(lengths)), lengths)
    n = requests.shape[0]
    ids = np.argsort(rng.random((n, 2, 80)), axis=2)[:, :, :4].astype(np.uint16)
    ids[::5, 1, 3] = 80  # some sentinels
    return Trace.from_arrays(ids, n_experts=80, request_ids=requests)


def brute_force(trace: Trace, plan_batches: list[list[int]]) -> tuple[list[int], list[int]]:
    """Requests and Σ distinct experts per layer, from Python sets, per batch."""
    ids = trace.expert_ids.tolist()
    n_exp = trace.n_experts.tolist()
    requests = [0] * trace.n_layers
    unique = [0] * trace.n_layers
    for rows in plan_batches:
        for layer in range(trace.n_layers):
            seen: set[int] = set()
            for row in rows:
                routed = [e for e in ids[row][layer] if e != n_exp[layer]]
                requests[layer] += len(routed)
                seen.update(routed)
            unique[layer] += len(seen)
    return requests, unique


def stream_dict(trace: Trace, sizes: tuple[int, ...], policy: str, chunk: int) -> dict:
    return analyze_stream(trace, sizes, policy, chunk_tokens=chunk).to_dict()


@pytest.mark.parametrize("policy", POLICIES)
def test_streaming_equals_in_memory_for_every_policy(policy: str) -> None:
    for seed in range(2):
        trace = make_trace(seed, n_tokens=100)
        want = moeprof.analyze(trace, SIZES, policy=policy).to_dict()
        for chunk in (1, 3, 7, 50, 10_000):
            assert stream_dict(trace, SIZES, policy, chunk) == want, (seed, chunk)


@pytest.mark.parametrize("policy", POLICIES)
def test_counts_match_python_sets(policy: str) -> None:
    trace = make_trace(11)
    batching = get_policy(policy)
    result = analyze_stream(trace, SIZES, policy, chunk_tokens=5)
    for plan, row in zip(batching.plans(trace, list(SIZES)), result.results):
        batches = [plan.rows(b).tolist() for b in range(plan.n_batches)]
        requests, unique = brute_force(trace, batches)
        assert [layer.requests for layer in row.layers] == requests
        assert [layer.unique for layer in row.layers] == unique


def test_decode_steps_whose_rows_lie_in_different_chunks() -> None:
    trace = far_apart_decode_trace()
    want = moeprof.analyze(trace, (2, 4, 16), policy="decode").to_dict()
    for chunk in (1, 7, 64, 199):
        assert stream_dict(trace, (2, 4, 16), "decode", chunk) == want
    # The case is real: step 0 holds row 0 and a row hundreds of rows later.
    plan = get_policy("decode").plan(trace, 2)
    assert int(plan.rows(0).max()) - int(plan.rows(0).min()) > 100


def test_no_sentinel_trace_uses_the_closed_form_in_both_paths() -> None:
    trace = make_trace(3, sentinel_rate=0.0, n_experts=(64, 64))
    want = moeprof.analyze(trace, SIZES, policy="decode").to_dict()
    assert stream_dict(trace, SIZES, "decode", 4) == want


def test_merge_is_associative_over_shard_like_ranges() -> None:
    """Ranges mapped independently (as on separate workers) and merged in another grouping give
    the same partial counts as one pass."""
    trace = make_trace(5)
    plans = get_policy("decode").plans(trace, [3, 8])
    indexes = [plan_index(p, trace.n_tokens) for p in plans]
    cuts = [0, 17, 40, 41, 100, trace.n_tokens]
    parts = [
        map_range(a, b, np.array(trace.expert_ids[a:b]), trace.n_experts, indexes)
        for a, b in zip(cuts[:-1], cuts[1:])
    ]
    left = parts[0]
    for p in parts[1:]:
        left = merge(left, p, indexes, trace.top_k)
    right = parts[-1]
    for p in reversed(parts[:-1]):
        right = merge(p, right, indexes, trace.top_k)
    whole = map_range(0, trace.n_tokens, np.array(trace.expert_ids), trace.n_experts, indexes)
    for got in (left, right):
        assert np.array_equal(got.requests, whole.requests)
        for a, b in zip(got.plans, whole.plans):
            assert np.array_equal(a.unique, b.unique)
            assert a.open_ids.size == 0
            assert np.array_equal(a.hist_rows, b.hist_rows)
            assert np.array_equal(a.hist_counts, b.hist_counts)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    n_tokens=st.integers(1, 60),
    top_k=st.integers(1, 4),
    chunk=st.integers(1, 20),
    policy=st.sampled_from(("tokens", "decode", "recorded")),
    batch=st.integers(1, 9),
)
def test_property_stream_matches_sets(
    seed: int, n_tokens: int, top_k: int, chunk: int, policy: str, batch: int
) -> None:
    trace = make_trace(seed, n_tokens=max(n_tokens, 3), top_k=top_k, n_requests=5)
    result = analyze_stream(trace, [batch], policy, chunk_tokens=chunk)
    plan = get_policy(policy).plans(trace, [batch])[0]
    batches = [plan.rows(b).tolist() for b in range(plan.n_batches)]
    requests, unique = brute_force(trace, batches)
    row = result.results[0]
    assert [layer.requests for layer in row.layers] == requests
    assert [layer.unique for layer in row.layers] == unique
    assert result.to_dict() == moeprof.analyze(trace, [batch], policy=policy).to_dict()


def test_several_shards_equal_the_concatenated_trace(tmp_path: Path) -> None:
    trace = make_trace(9, n_tokens=150)
    cuts = [0, 40, 41, 150]
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        keep = np.zeros(trace.n_tokens, dtype=bool)
        keep[a:b] = True
        trace.without_tokens(~keep).save(tmp_path / f"part-{i}.moe")
    shards = open_shards(tmp_path)
    merged = shards.to_trace()
    for policy in POLICIES:
        want = moeprof.analyze(merged, (1, 4, 8), policy=policy).to_dict()
        for chunk in (1, 6, 39, 500):
            got = analyze_stream(shards, (1, 4, 8), policy, chunk_tokens=chunk).to_dict()
            assert got == want, (policy, chunk)


CACHE_STRATEGIES = ("naive", "dedup", "lru", "lfu", "static", "belady")


@pytest.mark.parametrize("policy", ("decode", "tokens", "serve"))
@pytest.mark.parametrize("phase", ("all", "decode"))
def test_cache_per_layer_streaming_equals_in_memory(policy: str, phase: str) -> None:
    trace = make_trace(21)
    for warm, count in ((False, "batch"), (True, "access")):
        kw = {"policy": policy, "phase": phase, "warm": warm, "count": count}
        want = simulate_cache(trace, CACHE_STRATEGIES, [0, 2, 5], [1, 4], **kw).to_dict()
        got = simulate_cache(
            InMemory(trace), CACHE_STRATEGIES, [0, 2, 5], [1, 4], stream=True, **kw
        ).to_dict()
        assert got == want, kw


def _without_timings(doc: dict) -> dict:
    for row in doc["results"]:
        row.pop("schedule_seconds")
        row.pop("decision_seconds")
    return doc


def test_schedule_from_shards_equals_in_memory(tmp_path: Path) -> None:
    trace = make_trace(4, n_tokens=120, n_requests=10)
    for i, (a, b) in enumerate(((0, 50), (50, 120))):
        keep = np.zeros(trace.n_tokens, dtype=bool)
        keep[a:b] = True
        trace.without_tokens(~keep).save(tmp_path / f"s{i}.moe")
    shards = open_shards(tmp_path)
    admissions = ("fifo", "random", "affinity", "oracle", "group")
    want = schedule(shards.to_trace(), [2, 4], admissions, cache=("lru", 3)).to_dict()
    got = schedule(shards, [2, 4], admissions, cache=("lru", 3)).to_dict()
    assert _without_timings(got) == _without_timings(want)


def test_default_rule() -> None:
    e = np.array([256] * 61)
    assert default_chunk_tokens(1000, 61, e) == 0  # small: in memory
    chunk = default_chunk_tokens(200_000, 61, e)  # 390 MB of bitsets: streamed
    assert chunk > 0 and chunk * 61 * 4 * 8 <= 64 << 20


def test_cli_streaming_output_is_identical(tmp_path: Path, run_cli) -> None:
    trace = make_trace(2)
    path = tmp_path / "t.moe"
    trace.save(path)
    outs = []
    for chunk in ("0", "7"):
        out = tmp_path / f"{chunk}.json"
        res = run_cli(
            "analyze", path, "-b", "1,4", "-p", "decode", "--chunk-tokens", chunk, "--json", out
        )
        assert res.exit_code == 0, res.stderr
        outs.append(json.loads(out.read_text()))
    assert outs[0] == outs[1]


def test_cli_several_paths_and_a_glob(tmp_path: Path, run_cli) -> None:
    trace = make_trace(6, n_tokens=90)
    for i, (a, b) in enumerate(((0, 30), (30, 90))):
        keep = np.zeros(trace.n_tokens, dtype=bool)
        keep[a:b] = True
        trace.without_tokens(~keep).save(tmp_path / f"run-{i}.moe")
    docs = []
    for args in (
        [tmp_path / "run-0.moe", tmp_path / "run-1.moe"],
        [str(tmp_path / "run-*.moe")],
        [tmp_path],
    ):
        out = tmp_path / "out.json"
        res = run_cli("analyze", *args, "--chunk-tokens", "4", "--json", out, "--force")
        assert res.exit_code == 0, res.stderr
        doc = json.loads(out.read_text())
        doc["trace"].pop("path")
        docs.append(doc)
    assert docs[0] == docs[1] == docs[2]


@pytest.mark.parametrize("verb", ("analyze", "cache", "schedule"))
def test_negative_chunk_tokens_is_one_line_exit_2(tmp_path: Path, run_cli, verb: str) -> None:
    path = tmp_path / "t.moe"
    make_trace(1).save(path)
    out = tmp_path / "o.json"
    res = run_cli(verb, path, "--chunk-tokens", "-1", "--json", out)
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and "chunk" in res.stderr
    assert not out.exists()


def test_cli_cache_and_schedule_stream_identically(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "t.moe"
    make_trace(8).save(path)
    for verb, extra in (
        ("cache", ["-C", "0,2", "-b", "1,4"]),
        ("schedule", ["-b", "2", "-a", "fifo,affinity"]),
    ):
        docs = []
        for chunk in ("0", "5"):
            out = tmp_path / f"{verb}{chunk}.json"
            res = run_cli(verb, path, *extra, "--chunk-tokens", chunk, "--json", out)
            assert res.exit_code == 0, res.stderr
            doc = json.loads(out.read_text())
            if verb == "schedule":
                _without_timings(doc)
            docs.append(doc)
        assert docs[0] == docs[1], verb


def test_a_window_maps_its_rows_as_the_whole_index_does() -> None:
    """A task given windows of the plans' indexes (its rows' batches only) returns the partial
    the whole indexes give, for ranges whose decode steps reach far outside them."""
    trace = far_apart_decode_trace()
    plans = get_policy("decode").plans(trace, [2, 16])
    indexes = [plan_index(p, trace.n_tokens) for p in plans]
    for a, b in ((0, 1), (150, 260), (201, 301), (300, trace.n_tokens)):
        windows = [index.window(a, b) for index in indexes]
        for index, window in zip(indexes, windows):
            batches = index.batch_of_row[a:b]
            assert window.batch_offset == batches.min()
            assert len(window.first_row) == batches.max() - batches.min() + 1
            assert np.array_equal(window.batches_of(a, b), batches)
        ids = np.array(trace.expert_ids[a:b])
        got = map_range(a, b, ids, trace.n_experts, windows)
        want = map_range(a, b, ids, trace.n_experts, indexes)
        assert np.array_equal(got.requests, want.requests)
        for g, w in zip(got.plans, want.plans):
            for field in ("unique", "open_ids", "open_bits", "open_keys", "hist_rows"):
                assert np.array_equal(getattr(g, field), getattr(w, field)), field
        with pytest.raises(MoeprofError, match="outside the plan index"):
            windows[0].batches_of(a, b + 1)

"""moeprof.cache against a brute-force per-batch simulation with Python sets and dicts, written
here apart from moeprof.strategies (docs/cache.md, "Semantics")."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from conftest import plan_rows, random_trace

import moeprof
from moeprof.cache import capacity_for_memory, select_phase, simulate_cache
from moeprof.errors import MoeprofError
from moeprof.report.results import validate_results
from moeprof.trace import Trace

CACHED = ("lru", "lfu", "static", "belady")


def batch_requests(trace: Trace, batches: list[list[int]]) -> list[list[list[int]]]:
    """requests[b][l]: the experts of batch b at layer l in issue order (row, then slot)."""
    ids = trace.expert_ids.tolist()
    sentinel = [int(e) for e in trace.n_experts]
    return [
        [
            [e for row in rows for e in ids[row][layer] if e != sentinel[layer]]
            for layer in range(trace.n_layers)
        ]
        for rows in batches
    ]


def reference_loads(
    trace: Trace,
    batches: list[list[int]],
    strategy: str,
    capacity: int,
    *,
    budget: str = "per-layer",
    count: str = "batch",
    warm: bool = False,
    unit: str = "experts",
    profile: Trace | None = None,
) -> list[int]:
    """Loads per layer, one step at a time: a step is (batch, layer); per-layer budget runs each
    layer alone with `capacity` experts, the global budget one pool of (layer, expert) blocks over
    steps (b, 0..L-1), sized capacity*L blocks or capacity*sum(bytes) bytes."""
    n_layers = trace.n_layers
    req = batch_requests(trace, batches)
    source = trace if profile is None else profile
    popularity = Counter(
        (layer, e)
        for row in source.expert_ids.tolist()
        for layer in range(n_layers)
        for e in row[layer]
        if e != int(source.n_experts[layer])
    )
    sizes = [int(b) for b in trace.expert_bytes]
    loads = [0] * n_layers
    if budget == "per-layer":
        pools = [[layer] for layer in range(n_layers)]
        weight = {layer: 1 for layer in range(n_layers)}
        size = capacity
    else:
        pools = [list(range(n_layers))]
        weight = {layer: sizes[layer] if unit == "bytes" else 1 for layer in range(n_layers)}
        size = capacity * (sum(sizes) if unit == "bytes" else n_layers)
    for layers in pools:
        steps = [(b, layer) for b in range(len(batches)) for layer in layers]
        blocks_of = [{(layer, e) for e in req[b][layer]} for b, layer in steps]
        # static: the most requested blocks of the pool (ties: lower (layer, expert)), taken
        # while they fit.
        every = sorted(
            ((layer, e) for layer in layers for e in range(int(trace.n_experts[layer]))),
            key=lambda blk: (-popularity[blk], blk),
        )
        keep: set[tuple[int, int]] = set()
        used_static = 0
        for blk in every:
            if used_static + weight[blk[0]] > size:
                break
            keep.add(blk)
            used_static += weight[blk[0]]
        retained: set[tuple[int, int]] = set()
        seen: set[tuple[int, int]] = set()
        last: dict[tuple[int, int], int] = {}
        uses: Counter[tuple[int, int]] = Counter()
        clock = 0
        for s, (b, layer) in enumerate(steps):
            counts = Counter(req[b][layer])
            for e, n in counts.items():
                blk = (layer, e)
                if blk not in retained and (blk in seen or not warm):
                    loads[layer] += n if count == "access" else 1
                seen.add(blk)
                uses[blk] += 1
            for e in req[b][layer]:
                last[(layer, e)] = clock
                clock += 1
            pool = retained | blocks_of[s]
            if strategy == "lru":
                ranked = sorted(pool, key=lambda blk: -last[blk])
            elif strategy == "lfu":
                ranked = sorted(pool, key=lambda blk: (-uses[blk], -last[blk]))
            elif strategy == "static":
                ranked = sorted(blk for blk in pool if blk in keep)
            else:
                nxt = {
                    blk: next((t for t in range(s + 1, len(steps)) if blk in blocks_of[t]), None)
                    for blk in pool
                }
                ranked = sorted(
                    (blk for blk in pool if nxt[blk] is not None), key=lambda blk: (nxt[blk], blk)
                )
            retained, used = set(), 0
            for blk in ranked:
                if used + weight[blk[0]] <= size:
                    retained.add(blk)
                    used += weight[blk[0]]
    return loads


def row_of(result, strategy: str, batch_size: int, cap: int) -> dict:
    doc = result.to_dict()
    return next(
        r
        for r in doc["results"]
        if r["strategy"] == strategy and r["batch_size"] == batch_size and r["cache_experts"] == cap
    )


def layer_loads(row: dict) -> list[int]:
    return [layer["loads"] for layer in row["layers"]]


@pytest.mark.parametrize("seed", range(24))
def test_every_strategy_matches_the_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    trace = random_trace(rng, n_tokens=int(rng.integers(5, 40)), n_layers=int(rng.integers(1, 4)))
    policy = ["tokens", "decode"][seed % 2]
    budget = ["per-layer", "global"][(seed // 2) % 2]
    count = ["batch", "access"][(seed // 4) % 2]
    warm = bool((seed // 8) % 2)
    unit = "bytes" if budget == "global" and seed % 3 == 0 else "experts"
    caps = [0, 1, 2, 3, 5]
    sizes = [1, int(rng.integers(2, 6))]
    result = simulate_cache(
        trace,
        CACHED,
        caps,
        sizes,
        policy,
        budget=budget,
        count=count,
        warm=warm,
        capacity_unit=unit,
    )
    for plan in moeprof.batching.get_policy(policy).plans(trace, sizes):
        batches = plan_rows(plan)
        for strategy in CACHED:
            for cap in caps:
                want = reference_loads(
                    trace,
                    batches,
                    strategy,
                    cap,
                    budget=budget,
                    count=count,
                    warm=warm,
                    unit=unit,
                )
                got = row_of(result, strategy, plan.batch_size, cap)
                assert layer_loads(got) == want, (strategy, cap, plan.batch_size)
                assert got["loads"] == sum(want)


def _fields_check(trace: Trace, result, policy: str, count: str) -> None:
    """Every derived field of every row from the per-layer counts, written out again."""
    doc = result.to_dict()
    sizes = [int(b) for b in trace.expert_bytes]
    for plan in moeprof.batching.get_policy(policy).plans(trace, result.settings["batch_sizes"]):
        req = batch_requests(trace, plan_rows(plan))
        requests = [sum(len(req[b][layer]) for b in range(len(req))) for layer in range(len(sizes))]
        unique = [
            sum(len(set(req[b][layer])) for b in range(len(req))) for layer in range(len(sizes))
        ]
        tokens = sum(len(rows) for rows in plan_rows(plan))
        rows = [r for r in doc["results"] if r["batch_size"] == plan.batch_size]
        dedup = next(r for r in rows if r["strategy"] == "dedup")
        naive = next(r for r in rows if r["strategy"] == "naive")
        assert layer_loads(naive) == requests
        assert layer_loads(dedup) == unique
        lru = {r["cache_experts"]: r["loads"] for r in rows if r["strategy"] == "lru"}
        bel = {r["cache_experts"]: r["loads"] for r in rows if r["strategy"] == "belady"}
        for r in rows:
            assert [x["requests"] for x in r["layers"]] == requests
            assert [x["unique"] for x in r["layers"]] == unique
            lookups = (
                sum(requests) if count == "access" or r["strategy"] == "naive" else sum(unique)
            )
            assert r["hit_rate"] == pytest.approx(1 - r["loads"] / lookups)
            by = sum(n * b for n, b in zip(layer_loads(r), sizes))
            assert r["bytes_loaded"] == by
            assert r["bytes_per_token"] == pytest.approx(by / tokens)
            assert r["savings_vs_naive"] == pytest.approx(1 - r["loads"] / sum(requests))
            assert r["savings_vs_dedup"] == pytest.approx(1 - r["loads"] / sum(unique))
            if r["strategy"] in ("naive", "dedup"):
                continue
            c = r["cache_experts"]
            if lru[c] == bel[c]:
                assert r["gap_captured"] is None
            else:
                assert r["gap_captured"] == pytest.approx((lru[c] - r["loads"]) / (lru[c] - bel[c]))


@pytest.mark.parametrize("seed", range(6))
def test_rows_fields_and_references(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    trace = random_trace(rng, n_tokens=30)
    policy = ["tokens", "decode"][seed % 2]
    count = ["batch", "access"][(seed // 2) % 2]
    result = simulate_cache(
        trace, ("naive", "dedup", *CACHED), [0, 1, 4], [1, 3], policy, count=count
    )
    _fields_check(trace, result, policy, count)
    validate_results(result.to_dict())


@pytest.mark.parametrize("policy", ["tokens", "decode"])
def test_zero_capacity_is_dedup_and_analyze(policy: str) -> None:
    rng = np.random.default_rng(7)
    trace = random_trace(rng, n_tokens=50, n_layers=3)
    sizes = [1, 2, 4, 8]
    result = simulate_cache(trace, ("dedup", *CACHED), [0], sizes, policy)
    analysed = moeprof.analyze(trace, sizes, policy=policy)
    for a in analysed.results:
        want = [layer.unique for layer in a.layers]
        for strategy in ("dedup", *CACHED):
            assert layer_loads(row_of(result, strategy, a.batch_size, 0)) == want


def test_capacity_of_every_expert_leaves_first_uses_only() -> None:
    rng = np.random.default_rng(3)
    trace = random_trace(rng, n_tokens=40, n_layers=2, n_experts=[8, 16], top_k=2)
    result = simulate_cache(trace, CACHED, [16, 40], [1, 4], "decode")
    first = [
        len({e for row in trace.expert_ids.tolist() for e in row[layer]} - {int(n)})
        for layer, n in enumerate(trace.n_experts)
    ]
    for r in result.to_dict()["results"]:
        assert layer_loads(r) == first, r["strategy"]


@pytest.mark.parametrize("seed", range(8))
def test_monotone_in_capacity_and_belady_is_the_bound(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    trace = random_trace(rng, n_tokens=int(rng.integers(20, 60)))
    caps = list(range(0, 10))
    result = simulate_cache(trace, CACHED, caps, [1, 2, 5], ["tokens", "decode"][seed % 2])
    doc = result.to_dict()
    for b in result.settings["batch_sizes"]:
        for name in ("lru", "belady"):
            loads = [row_of(result, name, b, c)["loads"] for c in caps]
            assert loads == sorted(loads, reverse=True), name
        for c in caps:
            bel = layer_loads(row_of(result, "belady", b, c))
            for r in doc["results"]:
                if r["batch_size"] == b and r["cache_experts"] == c:
                    assert all(x <= y for x, y in zip(bel, layer_loads(r))), r["strategy"]


def test_access_counting_at_batch_size_one_is_batch_counting() -> None:
    rng = np.random.default_rng(11)
    trace = random_trace(rng, n_tokens=40)
    by_batch = simulate_cache(trace, CACHED, [0, 2], [1], "decode", count="batch").to_dict()
    by_access = simulate_cache(trace, CACHED, [0, 2], [1], "decode", count="access").to_dict()
    assert [r["loads"] for r in by_batch["results"]] == [r["loads"] for r in by_access["results"]]


def _phased_trace() -> Trace:
    rng = np.random.default_rng(5)
    base = random_trace(rng, n_tokens=48, n_layers=2, with_steps=False)
    phase = (base.positions >= 3).astype(np.int64)  # the first 3 tokens of a request: prefill
    return Trace.from_arrays(
        base.expert_ids,
        n_experts=base.n_experts,
        request_ids=base.request_ids,
        positions=base.positions,
        phase=phase,
        expert_bytes=base.expert_bytes,
    )


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_phase_keeps_only_its_rows(phase: str) -> None:
    trace = _phased_trace()
    code = 1 if phase == "decode" else 0
    keep = [i for i, p in enumerate(trace.phase.tolist()) if p == code]
    sub = Trace.from_arrays(
        trace.expert_ids[keep],
        n_experts=trace.n_experts,
        request_ids=trace.request_ids[keep],
        positions=trace.positions[keep],
        expert_bytes=trace.expert_bytes,
    )
    result = simulate_cache(trace, CACHED, [0, 1, 3], [2], "decode", phase=phase)
    assert result.settings["tokens_simulated"] == len(keep)
    plan = moeprof.plan_batches(sub, "decode", 2)
    for strategy in CACHED:
        for cap in (0, 1, 3):
            want = reference_loads(sub, plan_rows(plan), strategy, cap)
            assert layer_loads(row_of(result, strategy, 2, cap)) == want


def test_phase_without_phases() -> None:
    rng = np.random.default_rng(6)
    trace = random_trace(rng, n_tokens=20)
    assert select_phase(trace, "decode") is trace
    with pytest.raises(MoeprofError, match="no phases"):
        simulate_cache(trace, CACHED, [1], [2], "decode", phase="prefill")


def test_popularity_from_another_trace() -> None:
    rng = np.random.default_rng(8)
    trace = random_trace(rng, n_tokens=40, n_layers=2, n_experts=[8, 8], top_k=2)
    other = random_trace(rng, n_tokens=30, n_layers=2, n_experts=[8, 8], top_k=2)
    result = simulate_cache(trace, ["static"], [1, 2, 3], [2], "tokens", popularity_from=other)
    plan = moeprof.plan_batches(trace, "tokens", 2)
    for cap in (1, 2, 3):
        want = reference_loads(trace, plan_rows(plan), "static", cap, profile=other)
        assert layer_loads(row_of(result, "static", 2, cap)) == want
    odd = random_trace(rng, n_tokens=10, n_layers=2, n_experts=[8, 16], top_k=2)
    with pytest.raises(MoeprofError, match="same layer layout"):
        simulate_cache(trace, ["static"], [1], [2], "tokens", popularity_from=odd)


def test_working_sets_and_gaps() -> None:
    rng = np.random.default_rng(9)
    trace = random_trace(rng, n_tokens=45, n_layers=2)
    result = simulate_cache(trace, CACHED, [0, 2], [3], "decode")
    plan = moeprof.plan_batches(trace, "decode", 3)
    req = batch_requests(trace, plan_rows(plan))
    for ws in result.working_sets:
        widths = sorted(len(set(req[b][ws.layer])) for b in range(len(req)))
        assert ws.mean == pytest.approx(sum(widths) / len(widths))
        assert ws.max == widths[-1]
        assert ws.p95 == widths[math.ceil(0.95 * len(widths)) - 1]
    for gap in result.gaps:
        lookups = sum(len(set(req[b][layer])) for b in range(len(req)) for layer in range(2))
        assert gap.lru_loads == row_of(result, "lru", 3, gap.cache_experts)["loads"]
        assert gap.belady_loads == row_of(result, "belady", 3, gap.cache_experts)["loads"]
        assert gap.gap_points == pytest.approx(100 * (gap.lru_loads - gap.belady_loads) / lookups)


def test_capacity_for_memory_by_hand() -> None:
    trace = moeprof.synthesize(
        n_experts=8,
        top_k=2,
        n_layers=3,
        n_requests=6,
        tokens_per_request=10,
        seed=2,
        expert_bytes=[1000, 2000, 3000],
    )
    plans = [moeprof.plan_batches(trace, "decode", b) for b in (1, 4)]
    widest = [
        max(len(set(r[layer])) for plan in plans for r in batch_requests(trace, plan_rows(plan)))
        for layer in range(3)
    ]
    working = sum(w * b for w, b in zip(widest, (1000, 2000, 3000)))
    fit = capacity_for_memory(trace, working + 6000 * 3 + 5999, [1, 4], "decode")
    assert fit.cache_experts == 3 and fit.working_set_bytes == working
    with pytest.raises(MoeprofError, match="cannot hold one batch"):
        capacity_for_memory(trace, working - 1, [1, 4], "decode")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategies": ["nope"]}, "unknown strategy"),
        ({"capacities": [-1]}, "cache_experts must be 0 or more"),
        ({"capacities": ["2"]}, "cache_experts must be 0 or more"),
        ({"budget": "pooled"}, "budget must be one of"),
        ({"count": "tokens"}, "count must be one of"),
        ({"phase": "both"}, "phase must be one of"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    rng = np.random.default_rng(1)
    trace = random_trace(rng, n_tokens=10)
    args = {"strategies": CACHED, "capacities": [1], "batch_sizes": [2], "policy": "tokens"}
    args.update(kwargs)
    with pytest.raises(MoeprofError, match=match):
        simulate_cache(trace, **args)


@pytest.mark.parametrize("policy", ["tokens", "decode"])
def test_replay_copies_exactly_the_loads_the_cache_simulation_counts(policy: str) -> None:
    """Issue 11's promise: `moeprof replay --strategies S --cache-experts C` copies what
    `moeprof cache` counts, for every caching strategy in the registry (CPU backend)."""
    from moeprof.replay import replay
    from moeprof.strategies import REGISTRY

    caching = [name for name, s in REGISTRY.items() if s.uses_cache]
    assert {"lru", "lfu", "static", "belady", "lfuda", "s3fifo", "arc"} <= set(caching)
    trace = moeprof.synthesize(
        n_experts=12, top_k=3, n_layers=2, n_requests=6, tokens_per_request=10, zipf=0.9,
        locality=0.4, seed=21,
    )  # fmt: skip
    for capacity in (0, 2, 5):
        counted = simulate_cache(trace, caching, [capacity], [1, 4], policy)
        loads = {(r.strategy, r.batch_size): r.loads for r in counted.rows}
        doc = replay(
            trace, device="cpu", strategies=caching, batch_sizes=[1, 4], policy=policy,
            cache_experts=capacity, expert_bytes=1024, calibrate=False,
        ).to_dict()  # fmt: skip
        for row in doc["results"]:
            for run in row["replay"]["strategies"]:
                assert run["copies"] == loads[run["strategy"], row["batch_size"]], (
                    policy, capacity, run["strategy"], row["batch_size"]
                )  # fmt: skip

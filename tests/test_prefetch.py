"""Prefetch scoring against a brute-force reference written here with Python sets over the plan's
rows (no code shared with moeprof.prefetch or the retention loop), edge cases on hand-made
traces, and bad input."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from conftest import plan_rows, random_trace

import moeprof
from moeprof.batching import BatchPlan, get_policy
from moeprof.errors import MoeprofError
from moeprof.prefetch import (
    PREDICTORS,
    BlockWalk,
    PrefetchRow,
    residency,
    score_plan,
    score_prefetch,
)
from moeprof.strategies import get_strategy
from moeprof.strategies.retaining import RetainingStrategy
from moeprof.strategies.retention import layer_sequence
from moeprof.strategies.schedule import distinct_per_batch
from moeprof.trace import Trace

FIELDS = ("needed", "predicted", "hits", "loads", "critical_loads", "wasted", "wasted_bytes")


# ---------------------------------------------------------------------- the reference


def ref_retained(
    needed: list[set[int]], last: list[dict[int, int]], rule: str | None, cap: int, keep: set[int]
) -> list[set[int]]:
    """The set each rule retains at the boundary before every batch (docs/cache.md semantics):
    lru by last request, lfu by batches used (ties: more recent), belady by soonest next use
    (ties: lower id; never used again: dropped), static: a fixed set, each once first used."""
    retained: set[int] = set()
    uses: Counter[int] = Counter()
    recent: dict[int, int] = {}
    out = []
    for b, need in enumerate(needed):
        out.append(set(retained))
        if rule is None:
            continue
        for e in need:
            uses[e] += 1
            recent[e] = last[b][e]
        pool = retained | need
        if rule == "lru":
            ranked = sorted(pool, key=lambda e: -recent[e])
        elif rule == "lfu":
            ranked = sorted(pool, key=lambda e: (-uses[e], -recent[e]))
        elif rule == "belady":

            def nxt(e: int, b: int = b) -> int | None:
                return next((t for t in range(b + 1, len(needed)) if e in needed[t]), None)

            ranked = sorted((e for e in pool if nxt(e) is not None), key=lambda e: (nxt(e), e))
        else:
            ranked = sorted(e for e in pool if e in keep)
        retained = set(ranked[:cap])
    return out


def reference(
    trace: Trace,
    plan: BatchPlan,
    predictor: str,
    m: int,
    *,
    train: Trace | None = None,
    strategy: str | None = None,
    cap: int = 0,
    profile: Trace | None = None,
    split: bool = False,
) -> tuple[int, list[dict[str, int]]]:
    """(first scored batch, per-layer counts) by direct simulation over the plan's rows.
    `split`: another predictor scored alongside learns, so without `train` every predictor is
    scored on the second half of the batches."""
    batches = plan_rows(plan)
    ids = trace.expert_ids.tolist()
    req = trace.request_ids.tolist()
    n_exp = trace.n_experts.tolist()
    learned = split or predictor in ("prev-layer", "popular")
    if train is not None:
        train_tokens = train.expert_ids.tolist()
        first = 0
    elif learned:
        first = len(batches) // 2
        train_tokens = [ids[r] for rows in batches[:first] for r in rows]
    else:
        first = 0
        train_tokens = []
    batch_of = {r: b for b, rows in enumerate(batches) for r in rows}
    profile_ids = (profile or trace).expert_ids.tolist()
    out = []
    needed_prev: list[set[int]] = []
    for layer in range(trace.n_layers):
        sentinel = n_exp[layer]
        needed: list[set[int]] = []
        last: list[dict[int, int]] = []
        clock = 0
        for rows in batches:
            need: set[int] = set()
            seen: dict[int, int] = {}
            for r in rows:
                for e in ids[r][layer]:
                    clock += 1
                    if e != sentinel:
                        need.add(e)
                        seen[e] = clock
            needed.append(need)
            last.append(seen)
        everywhere = Counter(e for row in profile_ids for e in row[layer] if e != sentinel)
        keep = set(sorted(everywhere, key=lambda e: (-everywhere[e], e))[:cap])
        retained = ref_retained(needed, last, strategy, cap, keep)
        # What the predictor learned.
        popular_counts = Counter(e for row in train_tokens for e in row[layer] if e != sentinel)
        popular = sorted(popular_counts, key=lambda e: (-popular_counts[e], e))[:m]
        co: Counter[tuple[int, int]] = Counter()
        if layer > 0:
            for row in train_tokens:
                for a in row[layer - 1]:
                    for c in row[layer]:
                        if a != n_exp[layer - 1] and c != sentinel:
                            co[(a, c)] += 1
        counts = dict.fromkeys(FIELDS, 0)
        for b in range(first, len(batches)):
            rows = batches[b]
            if predictor == "prev-token":
                votes: Counter[int] = Counter()
                for request in {req[r] for r in rows}:
                    r0 = min(r for r in rows if req[r] == request)
                    p = r0 - 1
                    if p >= 0 and req[p] == request and batch_of.get(p, len(batches)) < b:
                        votes.update(e for e in ids[p][layer] if e != sentinel)
                pred = set(sorted(votes, key=lambda e: (-votes[e], e))[:m])
            elif predictor == "prev-layer":
                pred = set()
                if layer > 0 and rows:
                    score: Counter[int] = Counter()
                    for a in needed_prev[b]:
                        for c in range(sentinel):
                            score[c] += co[(a, c)]
                    good = [c for c in score if score[c] > 0]
                    pred = set(sorted(good, key=lambda c: (-score[c], c))[:m])
            else:
                pred = set(popular) if rows else set()
            need, kept = needed[b], retained[b]
            counts["needed"] += len(need)
            counts["predicted"] += len(pred)
            counts["hits"] += len(pred & need)
            counts["loads"] += len(need - kept)
            counts["critical_loads"] += len(need - kept - pred)
            counts["wasted"] += len(pred - need - kept)
        counts["wasted_bytes"] = counts["wasted"] * int(trace.expert_bytes[layer])
        out.append(counts)
        needed_prev = needed
    return first, out


def check_rows(
    trace: Trace,
    plan: BatchPlan,
    rows: tuple[PrefetchRow, ...],
    m: int,
    train: Trace | None = None,
    profile: Trace | None = None,
) -> None:
    split = any(row.predictor in ("prev-layer", "popular") for row in rows)
    for row in rows:
        first, want = reference(
            trace,
            plan,
            row.predictor,
            m,
            train=train,
            strategy=row.strategy,
            cap=row.cache_experts,
            profile=profile,
            split=split,
        )
        where = (row.predictor, row.strategy, row.cache_experts, plan.policy, plan.batch_size)
        assert row.first_batch == first, where
        assert row.n_batches == plan.n_batches - first
        assert row.tokens == sum(len(r) for r in plan_rows(plan)[first:])
        for layer, (got, ref) in enumerate(zip(row.layers, want)):
            assert got.layer == layer
            assert {f: getattr(got, f) for f in FIELDS} == ref, (where, layer)
            assert got.recall == (ref["hits"] / ref["needed"] if ref["needed"] else None)
            assert got.precision == (ref["hits"] / ref["predicted"] if ref["predicted"] else None)
        total = {f: sum(r[f] for r in want) for f in FIELDS}
        assert {f: getattr(row.total, f) for f in FIELDS} == total, where


# ---------------------------------------------------------------------- against the reference

CACHES = (("lru", "lfu", "static", "belady"), (0, 1, 3))


@pytest.mark.parametrize("policy", ["tokens", "decode", "recorded"])
@pytest.mark.parametrize("seed", range(6))
def test_random_traces_match_the_reference(policy: str, seed: int) -> None:
    rng = np.random.default_rng(1100 + seed)
    trace = random_trace(rng, sentinel_rate=0.15)
    m = int(rng.integers(1, 6))
    for plan in get_policy(policy).plans(trace, [1, 3, 8]):
        rows = score_plan(trace, plan, PREDICTORS, m, strategies=CACHES[0], cache_experts=CACHES[1])
        assert len(rows) == len(PREDICTORS) * 4 * 3
        check_rows(trace, plan, rows, m)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("locality", [0.0, 0.5, 0.9])
def test_synthetic_traces_match_the_reference(seed: int, locality: float) -> None:
    trace = moeprof.synthesize(
        n_experts=12,
        top_k=3,
        n_layers=3,
        n_requests=6,
        tokens_per_request=14,
        length_spread=0.6,
        zipf=0.8,
        locality=locality,
        seed=seed,
    )
    train = moeprof.synthesize(
        n_experts=12, top_k=2, n_layers=3, n_requests=4, tokens_per_request=10, seed=seed + 50
    )
    cases: tuple[tuple[int, str, int, dict[str, Trace]], ...] = (
        (1, "decode", 4, {}),
        (3, "tokens", 5, {"train": train}),
        (7, "decode", 1, {"train": train, "popularity_from": train}),
        (2, "decode", 3, {"popularity_from": train}),
    )
    for m, policy, b, kw in cases:
        plan = moeprof.plan_batches(trace, policy, b)
        rows = score_plan(
            trace, plan, PREDICTORS, m, strategies=CACHES[0], cache_experts=(0, 2, 5), **kw
        )
        check_rows(trace, plan, rows, m, kw.get("train"), kw.get("popularity_from"))


def test_without_a_cache_nothing_is_retained() -> None:
    trace = moeprof.synthesize(n_experts=8, top_k=2, n_layers=3, n_requests=5, locality=0.4)
    plan = moeprof.plan_batches(trace, "decode", 3)
    rows = score_plan(trace, plan, PREDICTORS, 3)
    assert [r.strategy for r in rows] == [None] * 3
    for row in rows:
        assert row.total.loads == row.total.needed
        assert row.total.critical_loads == row.total.needed - row.total.hits
        assert row.total.wasted == row.total.predicted - row.total.hits
    check_rows(trace, plan, rows, 3)


def test_residency_is_the_set_retained_before_each_batch() -> None:
    for seed in range(10):
        trace = random_trace(np.random.default_rng(1200 + seed), n_tokens=40, sentinel_rate=0.1)
        plan = moeprof.plan_batches(trace, "decode", 3)
        for layer in range(trace.n_layers):
            n_exp = int(trace.n_experts[layer])
            distinct = distinct_per_batch(trace, plan, layer)
            seq = layer_sequence(distinct, n_exp)
            for name in ("lru", "lfu", "belady", "static"):
                for cap in (0, 1, 2, 5):
                    strategy = get_strategy(name)
                    assert isinstance(strategy, RetainingStrategy)
                    kept = strategy.retention(seq, cap)
                    spans = residency(BlockWalk.of(seq), kept)
                    steps = np.repeat(np.arange(plan.n_batches), n_exp)
                    blocks = np.tile(np.arange(n_exp), plan.n_batches)
                    got = spans.retained(steps, blocks).reshape(plan.n_batches, n_exp)
                    needed, last = needed_and_recency(trace, plan, layer)
                    ref = ref_retained(needed, last, name, cap, static_set(trace, layer, cap))
                    for b in range(plan.n_batches):
                        assert set(np.flatnonzero(got[b]).tolist()) == ref[b], (name, cap, b)


def needed_and_recency(
    trace: Trace, plan: BatchPlan, layer: int
) -> tuple[list[set[int]], list[dict[int, int]]]:
    ids = trace.expert_ids.tolist()
    sentinel = int(trace.n_experts[layer])
    needed, last, clock = [], [], 0
    for rows in plan_rows(plan):
        seen: dict[int, int] = {}
        for r in rows:
            for e in ids[r][layer]:
                clock += 1
                if e != sentinel:
                    seen[e] = clock
        needed.append(set(seen))
        last.append(seen)
    return needed, last


def static_set(trace: Trace, layer: int, cap: int) -> set[int]:
    sentinel = int(trace.n_experts[layer])
    c = Counter(e for row in trace.expert_ids[:, layer].tolist() for e in row if e != sentinel)
    return set(sorted(c, key=lambda e: (-c[e], e))[:cap])


# ---------------------------------------------------------------------- edge cases


def tiny(ids: list, n_experts: int | list[int], requests: list[int]) -> Trace:
    return Trace.from_arrays(
        np.asarray(ids), n_experts=n_experts, request_ids=requests, expert_bytes=100
    )


def test_first_tokens_predict_nothing() -> None:
    # Four one-token requests: no token has a previous one.
    trace = tiny([[[0, 1]], [[1, 2]], [[2, 3]], [[0, 3]]], 4, [0, 1, 2, 3])
    for b, needed in ((1, 8), (2, 6), (4, 4)):
        (row,) = score_prefetch(trace, ["prev-token"], 2, batch_sizes=[b]).rows
        assert (row.total.predicted, row.total.hits, row.total.needed) == (0, 0, needed)
        assert row.total.recall == 0.0 and row.total.precision is None
        assert row.trained_on == "none" and row.first_batch == 0


def test_prev_token_counts_votes_and_caps_at_m() -> None:
    # Three requests decoding together (B = 3). Previous tokens: [0,1], [1,2], [1,3] -> votes
    # 1:3, 0:1, 2:1, 3:1 -> m = 2 keeps 1 and 0 (the tie to the lower id).
    ids = [[[0, 1]], [[4, 5]], [[1, 2]], [[4, 0]], [[1, 3]], [[5, 1]]]
    trace = tiny(ids, 6, [0, 0, 1, 1, 2, 2])
    plan = moeprof.plan_batches(trace, "decode", 3)
    (row,) = score_plan(trace, plan, ["prev-token"], 2)
    # Batch 0 needs {0, 1, 2, 3}, batch 1 {4, 5, 0, 1}; predicted {0, 1}.
    assert (row.total.predicted, row.total.hits, row.total.needed) == (2, 2, 4 + 4)
    check_rows(trace, plan, (row,), 2)


def test_prev_token_ignores_previous_tokens_in_the_same_batch() -> None:
    # One request, prefill-style chunks of 4: only a chunk's first token has a previous token
    # known before the batch (the last token of the chunk before).
    ids = [[[i % 5, (i + 1) % 5]] for i in range(8)]
    trace = tiny(ids, 5, [0] * 8)
    plan = moeprof.plan_batches(trace, "tokens", 4)
    (row,) = score_plan(trace, plan, ["prev-token"], 5)
    assert row.total.predicted == 2  # batch 1: row 3's experts {3, 4}
    check_rows(trace, plan, (row,), 5)


def test_layer_zero_has_no_prev_layer_prediction() -> None:
    trace = moeprof.synthesize(n_experts=6, top_k=2, n_layers=3, n_requests=4, seed=3)
    (row,) = score_prefetch(trace, ["prev-layer"], 3, batch_sizes=[2], train=trace).rows
    assert row.layers[0].predicted == 0 and row.layers[0].precision is None
    assert row.layers[0].recall == 0.0
    assert all(layer.predicted > 0 for layer in row.layers[1:])
    assert row.trained_on == "train trace" and row.first_batch == 0


def test_empty_batches_and_sentinel_slots() -> None:
    # Layer 1 routes nothing for rows 2-3 (sentinel 4), so decode batch 1 (B = 2) needs nothing
    # there; a hand-made plan adds a batch without tokens, which nothing is predicted for.
    ids = [[[0, 1], [2, 3]], [[1, 2], [0, 4]], [[0, 1], [4, 4]], [[3, 2], [4, 4]]]
    trace = tiny(ids, [4, 4], [0, 1, 0, 1])
    plan = moeprof.plan_batches(trace, "decode", 2)
    rows = score_plan(
        trace, plan, PREDICTORS, 2, train=trace, strategies=["lru"], cache_experts=[1]
    )
    check_rows(trace, plan, rows, 2, train=trace)
    by = {r.predictor: r for r in rows}
    assert by["popular"].layers[1].needed == 3  # batch 0: {2, 3, 0}; batch 1: none
    order = np.asarray([0, 1, 2, 3])
    gap = BatchPlan("decode", 2, order, np.asarray([0, 2, 2, 4]))
    rows = score_plan(trace, gap, PREDICTORS, 2, train=trace)
    check_rows(trace, gap, rows, 2, train=trace)
    popular = next(r for r in rows if r.predictor == "popular")
    assert popular.total.predicted == 2 * 2 * 2  # two batches with tokens, two layers, m = 2


def test_m_larger_than_the_expert_count() -> None:
    trace = moeprof.synthesize(n_experts=5, top_k=2, n_layers=2, n_requests=6, seed=9)
    plan = moeprof.plan_batches(trace, "decode", 4)
    rows = score_plan(trace, plan, PREDICTORS, 50, strategies=["belady"], cache_experts=[2, 9])
    check_rows(trace, plan, rows, 50)
    popular = next(r for r in rows if r.predictor == "popular")
    assert popular.total.recall == 1.0 or popular.total.predicted < 5 * 2 * popular.n_batches
    assert all(r.total.predicted <= 5 * 2 * r.n_batches for r in rows)


def test_layers_with_different_expert_counts() -> None:
    rng = np.random.default_rng(77)
    trace = random_trace(rng, n_tokens=50, n_layers=3, n_experts=[4, 9, 6], sentinel_rate=0.2)
    train = random_trace(rng, n_tokens=30, n_layers=3, n_experts=[4, 9, 6])
    plan = moeprof.plan_batches(trace, "decode", 4)
    rows = score_plan(
        trace, plan, PREDICTORS, 3, train=train, strategies=["lru"], cache_experts=[2]
    )
    check_rows(trace, plan, rows, 3, train=train)


def test_perfect_locality_gives_full_prev_token_recall_after_first_tokens() -> None:
    # Every request keeps its first token's experts; B = all requests, so only batch 0 holds
    # first tokens, and with a learned predictor alongside only the second half is scored.
    trace = moeprof.synthesize(
        n_experts=16, top_k=2, n_layers=4, n_requests=4, tokens_per_request=12, locality=1.0
    )
    plan = moeprof.plan_batches(trace, "decode", 4)
    rows = score_plan(trace, plan, ["prev-token", "popular"], 8)
    prev = rows[0]
    assert prev.first_batch == 6 and prev.trained_on == "none"
    assert prev.total.recall == 1.0 and prev.total.precision == 1.0
    assert all(layer.recall == 1.0 for layer in prev.layers)
    assert rows[1].trained_on == "first half"
    # Capped below the union of the requests' experts, recall drops.
    capped = score_plan(trace, plan, ["prev-token", "popular"], 2)[0].total.recall
    assert capped is not None and capped < 1.0


def test_result_document() -> None:
    trace = moeprof.synthesize(n_experts=8, top_k=2, n_layers=2, n_requests=4, seed=2)
    result = score_prefetch(
        trace,
        ["popular", "prev-token"],
        2,
        batch_sizes=[4, 1],
        strategies=["belady", "lru"],
        cache_experts=[2, 0],
    )
    assert result.predictors == ("prev-token", "popular")
    assert result.trained_on == "first half"
    doc = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert doc["prefetch_experts"] == 2 and doc["policy"] == "decode"
    keys = [
        (r["batch_size"], r["predictor"], r["strategy"], r["cache_experts"]) for r in doc["rows"]
    ]
    assert keys == [
        (b, p, s, c)
        for b in (1, 4)
        for p in ("prev-token", "popular")
        for s in ("lru", "belady")
        for c in (0, 2)
    ]
    row = doc["rows"][0]
    assert set(row) == {
        "predictor", "batch_size", "policy", "prefetch_experts", "strategy", "cache_experts",
        "trained_on", "first_batch", "n_batches", "tokens", *FIELDS, "recall", "precision",
        "layers",
    }  # fmt: skip
    assert set(row["layers"][0]) == {"layer", *FIELDS, "recall", "precision"}
    assert row["recall"] == result.rows[0].total.recall


# ---------------------------------------------------------------------- bad input


@pytest.fixture
def trace() -> Trace:
    return moeprof.synthesize(n_experts=8, top_k=2, n_layers=2, n_requests=3, seed=4)


@pytest.mark.parametrize("m", [0, -1, 1.5, True, "2", None])
def test_bad_prefetch_experts(trace: Trace, m: object) -> None:
    with pytest.raises(MoeprofError, match=r"^prefetch_experts must be 1 or more, got "):
        score_prefetch(trace, ["popular"], m)  # type: ignore[arg-type]


def test_bad_predictors(trace: Trace) -> None:
    with pytest.raises(MoeprofError, match=r"unknown prefetch predictor 'next-token'; choose"):
        score_prefetch(trace, ["prev-token", "next-token"], 2)
    with pytest.raises(MoeprofError, match=r"no prefetch predictors given"):
        score_prefetch(trace, [], 2)
    with pytest.raises(MoeprofError, match=r"predictors must be a list of names, not the text"):
        score_prefetch(trace, "popular", 2)


def test_train_trace_of_another_layout(trace: Trace) -> None:
    other = moeprof.synthesize(n_experts=8, top_k=2, n_layers=3, n_requests=3)
    with pytest.raises(MoeprofError, match=r"^train trace has another layout: 3 MoE layers"):
        score_prefetch(trace, ["prev-layer"], 2, train=other)
    other = moeprof.synthesize(n_experts=6, top_k=2, n_layers=2, n_requests=3)
    with pytest.raises(MoeprofError, match=r"experts 6 each, this trace has 2 with 8 each"):
        score_prefetch(trace, ["popular"], 2, train=other)
    with pytest.raises(MoeprofError, match=r"^popularity_from trace has another layout"):
        score_prefetch(trace, ["popular"], 2, strategies=["static"], cache_experts=[1],
                       popularity_from=other)  # fmt: skip


def test_bad_caches(trace: Trace) -> None:
    with pytest.raises(MoeprofError, match=r"strategy 'dedup' keeps no cache between batches"):
        score_prefetch(trace, ["popular"], 2, strategies=["dedup"], cache_experts=[1])
    with pytest.raises(MoeprofError, match=r"unknown strategy 'fifo'"):
        score_prefetch(trace, ["popular"], 2, strategies=["fifo"], cache_experts=[1])
    with pytest.raises(MoeprofError, match=r"cache_experts needs a caching strategy"):
        score_prefetch(trace, ["popular"], 2, cache_experts=[1])
    with pytest.raises(MoeprofError, match=r"strategies need cache_experts"):
        score_prefetch(trace, ["popular"], 2, strategies=["lru"])
    with pytest.raises(MoeprofError, match=r"cache_experts must be 0 or more, got -1"):
        score_prefetch(trace, ["popular"], 2, strategies=["lru"], cache_experts=[-1])
    with pytest.raises(MoeprofError, match=r"unknown policy 'fifo'"):
        score_prefetch(trace, ["popular"], 2, policy="fifo")

"""Residency strategies: every schedule against a brute-force reference written apart from
moeprof.strategies (conftest.reference_loads), the LRU's issue order and slot reuse, slot
sizing from counts alone, and the registry."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cpu_replay, plan_rows, random_trace, reference_loads, strategy_entry

import moeprof
from moeprof.analyze import expert_masks, unique_per_batch
from moeprof.errors import MoeprofError
from moeprof.strategies import (
    BASELINE,
    REGISTRY,
    STRATEGIES,
    CountedLoads,
    LayerSchedule,
    check_cache_experts,
    check_strategies,
    get_strategy,
    strategy_help,
)
from moeprof.strategies.dedup import DedupStrategy
from moeprof.trace import Trace

SEEDS = range(8)
CAPACITIES = (0, 1, 3)


def items(ls: LayerSchedule, batch: int) -> list[tuple[int, bool, int]]:
    lo, hi = int(ls.ptr[batch]), int(ls.ptr[batch + 1])
    return list(zip(ls.expert[lo:hi].tolist(), ls.copy[lo:hi].tolist(), ls.tokens[lo:hi].tolist()))


def traces(seed: int) -> Trace:
    return random_trace(np.random.default_rng(500 + seed), sentinel_rate=0.15)


@pytest.mark.parametrize("policy", ["tokens", "decode"])
@pytest.mark.parametrize("seed", SEEDS)
def test_schedules_match_the_reference(policy: str, seed: int) -> None:
    trace = traces(seed)
    layers = list(range(trace.n_layers))
    for b in (1, 3, 7):
        plan = moeprof.plan_batches(trace, policy, b)
        batches = plan_rows(plan)
        for name in STRATEGIES:
            for capacity in CAPACITIES if get_strategy(name).uses_cache else (0,):
                sched = get_strategy(name).schedule(trace, plan, layers, capacity)
                assert sched.n_batches == len(batches)
                for layer, ls in zip(layers, sched.layers):
                    want = reference_loads(trace, batches, name, layer, capacity)
                    got = [items(ls, i) for i in range(plan.n_batches)]
                    assert got == want, (name, b, capacity, layer)


@pytest.mark.parametrize("policy", ["tokens", "decode"])
def test_lru_issues_every_hit_before_any_miss(policy: str) -> None:
    both = 0  # batches holding hits and misses: where the order can go wrong
    for seed in SEEDS:
        trace = traces(seed)
        plan = moeprof.plan_batches(trace, policy, 3)
        sched = get_strategy("lru").schedule(trace, plan, range(trace.n_layers), 2)
        for ls in sched.layers:
            for b in range(plan.n_batches):
                copies = [copy for _, copy, _ in items(ls, b)]
                first_miss = copies.index(True) if True in copies else len(copies)
                assert not any(copies[:first_miss]) and all(copies[first_miss:]), copies
                both += 0 < first_miss < len(copies)
    assert both > 10


@pytest.mark.parametrize("policy", ["tokens", "decode"])
def test_lru_hits_read_the_slot_their_expert_was_copied_into(policy: str) -> None:
    """Slots as the device would hold them: a hit's slot still holds its expert; a miss never
    overwrites an expert cached at the batch's start, nor another item of its batch."""
    capacity = 2
    for seed in SEEDS:
        trace = traces(seed)
        plan = moeprof.plan_batches(trace, policy, 3)
        batches = plan_rows(plan)
        sched = get_strategy("lru").schedule(trace, plan, range(trace.n_layers), capacity)
        for layer, ls in enumerate(sched.layers):
            holds: dict[int, int] = {}  # slot -> expert it holds
            slot_of: dict[int, int] = {}  # expert -> slot it was last copied into
            cached: set[int] = set()  # experts the reference keeps after each batch
            cache_order: list[int] = []
            for b in range(plan.n_batches):
                lo, hi = int(ls.ptr[b]), int(ls.ptr[b + 1])
                slots = ls.slot[lo:hi].tolist()
                assert len(set(slots)) == len(slots)
                assert all(0 <= s < ls.n_slots for s in slots)
                protected = {slot_of[e] for e in cached}
                for (e, copy, _), s in zip(items(ls, b), slots):
                    if copy:
                        assert s not in protected, (seed, layer, b, e)
                        holds[s] = e
                        slot_of[e] = s
                    else:
                        assert holds.get(s) == e and slot_of[e] == s, (seed, layer, b, e)
                # The reference's cache after the batch: recency by last request.
                rows = batches[b]
                sentinel = int(trace.n_experts[layer])
                for row in rows:
                    for e in trace.expert_ids[row, layer].tolist():
                        if e != sentinel:
                            if e in cache_order:
                                cache_order.remove(e)
                            cache_order.append(e)
                cache_order = cache_order[-capacity:] if capacity else []
                cached = set(cache_order)


def test_lru_without_cache_is_dedup_and_with_room_for_all_copies_each_once() -> None:
    trace = traces(3)
    plan = moeprof.plan_batches(trace, "tokens", 2)
    layers = list(range(trace.n_layers))
    dedup = get_strategy("dedup").schedule(trace, plan, layers)
    lru0 = get_strategy("lru").schedule(trace, plan, layers, 0)
    assert [ls.copies for ls in lru0.layers] == [ls.copies for ls in dedup.layers]
    big = get_strategy("lru").schedule(trace, plan, layers, int(trace.n_experts.max()))
    for layer, ls in zip(layers, big.layers):
        routed = set(trace.expert_ids[:, layer].ravel().tolist()) - {int(trace.n_experts[layer])}
        assert ls.copies == len(routed)


@pytest.mark.parametrize("seed", range(6))
def test_slots_needed_from_counts_match_schedules_and_reference(seed: int) -> None:
    trace = random_trace(np.random.default_rng(100 + seed))
    layers = list(range(trace.n_layers))
    for policy in ("tokens", "decode"):
        plan = moeprof.plan_batches(trace, policy, 3)
        batches = plan_rows(plan)
        counted = CountedLoads(
            requests=np.array(
                [lr.requests for lr in moeprof.analyze(trace, [3], policy).results[0].layers]
            ),
            unique_per_batch=unique_per_batch(expert_masks(trace), plan),
        )
        requests = [
            sum(len(b) for b in reference_loads(trace, batches, "naive", layer)) for layer in layers
        ]
        widest = [
            max([len(b) for b in reference_loads(trace, batches, "dedup", layer)] + [1])
            for layer in layers
        ]
        want = {
            "naive": [min(4, max(r, 1)) for r in requests],
            "dedup": widest,
            # Every strategy that keeps experts: the kept ones plus one batch's widest set.
            **{
                n: [w + 2 for w in widest]
                for n in ("lru", "lfu", "static", "belady", "lfuda", "s3fifo", "arc")
            },
        }
        assert set(want) == set(STRATEGIES)
        for name in STRATEGIES:
            strat = get_strategy(name)
            sched = strat.schedule(trace, plan, layers, cache_experts=2)
            assert [ls.n_slots for ls in sched.layers] == want[name], name
            assert strat.slots_needed(counted, 2) == want[name], name
            total = max(want[name]) if strat.shared_slots else sum(want[name])
            assert strat.total_slots(counted, 2) == sched.total_slots() == total, name


def test_counted_copies_come_from_the_counts() -> None:
    trace = traces(1)
    plan = moeprof.plan_batches(trace, "tokens", 4)
    layers = list(range(trace.n_layers))
    row = moeprof.analyze(trace, [4]).results[0]
    counted = CountedLoads(
        requests=np.array([lr.requests for lr in row.layers]),
        unique_per_batch=unique_per_batch(expert_masks(trace), plan),
    )
    naive, dedup, lru = (get_strategy(n) for n in ("naive", "dedup", "lru"))
    assert naive.counted_copies(counted, naive.schedule(trace, plan, layers)) == row.requests
    assert dedup.counted_copies(counted, dedup.schedule(trace, plan, layers)) == row.unique
    misses = sum(
        copy
        for layer in layers
        for batch in reference_loads(trace, plan_rows(plan), "lru", layer, 1)
        for _, copy, _ in batch
    )
    assert lru.counted_copies(counted, lru.schedule(trace, plan, layers, 1)) == misses


@pytest.mark.parametrize("policy", ["tokens", "decode"])
def test_cpu_replay_copies_exactly_the_counted_loads_of_every_caching_strategy(
    policy: str,
) -> None:
    """Replay (CPU backend) copies, per layer, what the reference counts, for every registered
    strategy that keeps experts, and says its copies match its counted copies."""
    caching = [n for n in STRATEGIES if get_strategy(n).uses_cache]
    assert {"lru", "lfu", "static", "belady", "lfuda", "s3fifo", "arc"} <= set(caching)
    for seed in range(3):
        trace = random_trace(np.random.default_rng(900 + seed), n_tokens=40, sentinel_rate=0.1)
        for capacity in (1, 3):
            doc = cpu_replay(
                trace, strategies=caching, batch_sizes=[3], policy=policy, cache_experts=capacity
            ).to_dict()
            row = doc["results"][0]
            batches = plan_rows(moeprof.plan_batches(trace, policy, 3))
            for name in caching:
                want = [
                    sum(
                        copy
                        for batch in reference_loads(trace, batches, name, layer, capacity)
                        for _, copy, _ in batch
                    )
                    for layer in range(trace.n_layers)
                ]
                entry = strategy_entry(row, name)
                assert entry["layer_copies"] == want, (name, seed, capacity)
                assert entry["copies_match_counted"], name


# ---------------------------------------------------------------------- registry


def test_registry_names_in_run_order() -> None:
    assert (
        STRATEGIES
        == tuple(REGISTRY)
        == (
            "naive",
            "dedup",
            "lru",
            "lfu",
            "static",
            "belady",
            "lfuda",
            "s3fifo",
            "arc",
        )
    )
    assert BASELINE == STRATEGIES[0] == "naive"
    for name, strat in REGISTRY.items():
        assert strat.name == name and strat.help and strat.counted_basis
    assert [s.uses_cache for s in REGISTRY.values()] == [False, False] + [True] * 7
    assert [s.shared_slots for s in REGISTRY.values()] == [True, True] + [False] * 7


def test_check_strategies() -> None:
    assert check_strategies(["lru", "naive", "lru"]) == ("naive", "lru")
    with pytest.raises(
        MoeprofError, match=r"unknown strategy 'warp'; choose from naive, dedup, lru"
    ):
        check_strategies(["naive", "warp"])
    with pytest.raises(MoeprofError, match="no strategies given; choose from naive, dedup, lru"):
        check_strategies([])
    with pytest.raises(MoeprofError, match="strategies must be a list of names, not the text"):
        check_strategies("naive,dedup")
    with pytest.raises(MoeprofError, match="unknown strategy 'warp'"):
        get_strategy("warp")


@pytest.mark.parametrize("bad", [-1, True, 1.5, "2"])
def test_check_cache_experts(bad: object) -> None:
    assert check_cache_experts(0) == 0 and check_cache_experts(np.int64(3)) == 3
    with pytest.raises(MoeprofError, match=r"cache_experts must be 0 or more, got "):
        check_cache_experts(bad)


def test_help_lists_every_strategy() -> None:
    text = strategy_help()
    for strat in REGISTRY.values():
        assert f"{strat.name} ({strat.help})" in text
    assert text.index("naive") < text.index("dedup") < text.index("lru")


class CopyTwice(DedupStrategy):
    """A strategy added for the test: dedup's copies, each issued twice."""

    name = "twice"
    help = "every distinct expert copied twice"
    counted_basis = "twice analyze unique"

    def layer_schedule(self, trace, plan, layer, cache_experts):  # type: ignore[no-untyped-def]
        once = super().layer_schedule(trace, plan, layer, cache_experts)
        index = np.repeat(np.arange(once.expert.shape[0]), 2)
        return LayerSchedule(
            layer=layer,
            ptr=once.ptr * 2,
            expert=once.expert[index],
            slot=once.slot[index],
            copy=once.copy[index],
            tokens=once.tokens[index],
            n_slots=once.n_slots,
        )

    def counted_copies(self, counted, schedule):  # type: ignore[no-untyped-def]
        return 2 * int(counted.unique_per_batch.sum())


def test_a_registered_strategy_is_validated_helped_and_replayed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Adding a strategy is a class and a registry entry: validation, help and replay (slot
    sizing, counted copies, results) pick it up with no other change."""
    with pytest.raises(MoeprofError, match="unknown strategy 'twice'"):
        check_strategies(["twice"])
    monkeypatch.setitem(REGISTRY, "twice", CopyTwice())
    assert check_strategies(["twice", "naive"]) == ("naive", "twice")
    assert "twice (every distinct expert copied twice)" in strategy_help()
    with pytest.raises(
        MoeprofError,
        match="choose from naive, dedup, lru, lfu, static, belady, lfuda, s3fifo, arc, twice",
    ):
        get_strategy("thrice")
    trace = moeprof.synthesize(n_layers=2, n_requests=3, tokens_per_request=10, seed=2)
    doc = cpu_replay(trace, strategies=["dedup", "twice"], batch_sizes=[4]).to_dict()
    row = doc["results"][0]
    twice, dedup = strategy_entry(row, "twice"), strategy_entry(row, "dedup")
    assert twice["copies"] == 2 * dedup["copies"] == 2 * row["unique"]
    assert twice["copies_match_counted"] and twice["counted_basis"] == "twice analyze unique"
    assert twice["vs_naive"]["reason"] == "naive was not replayed at this batch size"

"""The retention simulation against a brute-force reference written separately with Python sets,
compiled and as plain Python, plus the properties the cache semantics promise."""

from __future__ import annotations

import numpy as np
import pytest

from moeprof.errors import MoeprofError
from moeprof.strategies import retention
from moeprof.strategies.retention import (
    NEVER,
    RULE_BELADY,
    RULE_LFU,
    RULE_LRU,
    RULE_STATIC,
    AccessSequence,
    retain,
)

RULES = {"lru": RULE_LRU, "lfu": RULE_LFU, "belady": RULE_BELADY, "static": RULE_STATIC}


def reference_loads(
    steps: list[list[tuple[int, int]]],
    rule: str,
    capacity: int,
    weight: list[int],
    keep: set[int],
    warm: bool,
) -> list[bool]:
    """steps: per step, (block, recency) of its distinct blocks. Returns the load flag of every
    item in order. Plain sets and sorted(); no code shared with the simulation."""
    retained: set[int] = set()
    seen: set[int] = set()
    last: dict[int, int] = {}
    uses: dict[int, int] = {}
    out: list[bool] = []
    for s, items in enumerate(steps):
        for b, r in items:
            out.append(b not in retained and (b in seen or not warm))
            seen.add(b)
            last[b] = r
            uses[b] = uses.get(b, 0) + 1
        pool = retained | {b for b, _ in items}

        def next_use(b: int, s: int = s) -> int | None:
            return next(
                (t for t in range(s + 1, len(steps)) if b in {x for x, _ in steps[t]}), None
            )

        if rule == "lru":
            ranked = sorted(pool, key=lambda b: -last[b])
        elif rule == "lfu":
            ranked = sorted(pool, key=lambda b: (-uses[b], -last[b]))
        elif rule == "belady":
            ranked = sorted(
                (b for b in pool if next_use(b) is not None), key=lambda b: (next_use(b), b)
            )
        else:
            ranked = sorted(b for b in pool if b in keep)
        retained, used = set(), 0
        for b in ranked:
            if used + weight[b] <= capacity:
                retained.add(b)
                used += weight[b]
    return out


def random_steps(rng: np.random.Generator) -> tuple[list[list[tuple[int, int]]], int]:
    n_blocks = int(rng.integers(1, 12))
    popularity = rng.dirichlet(np.full(n_blocks, 0.5))
    steps, position = [], 0
    for _ in range(int(rng.integers(0, 25))):
        width = int(rng.integers(0, min(n_blocks, 6) + 1))
        chosen = rng.choice(n_blocks, size=width, replace=False, p=popularity) if width else []
        items = [(int(b), position + i) for i, b in enumerate(rng.permutation(chosen))]
        position += width
        steps.append(sorted(items))
    return steps, n_blocks


def big_steps(rng: np.random.Generator) -> tuple[list[list[tuple[int, int]]], int]:
    """Wider steps over up to 64 blocks, skewed, so rankings and queues run long."""
    n_blocks = int(rng.integers(8, 65))
    popularity = rng.dirichlet(np.full(n_blocks, 0.3))
    steps, position = [], 0
    for _ in range(int(rng.integers(20, 80))):
        width = int(rng.integers(1, min(n_blocks, 40) + 1))
        chosen = rng.choice(n_blocks, size=width, replace=False, p=popularity)
        items = [(int(b), position + i) for i, b in enumerate(rng.permutation(chosen))]
        position += width
        steps.append(sorted(items))
    return steps, n_blocks


def as_sequence(steps: list[list[tuple[int, int]]], weight: list[int]) -> AccessSequence:
    ptr = np.cumsum([0] + [len(s) for s in steps]).astype(np.int64)
    return AccessSequence(
        ptr=ptr,
        block=np.array([b for s in steps for b, _ in s], dtype=np.int64),
        recency=np.array([r for s in steps for _, r in s], dtype=np.int64),
        requests=np.ones(int(ptr[-1]), dtype=np.int64),
        weight=np.array(weight, dtype=np.int64),
    )


def run(seq: AccessSequence, rule: int, capacity: int, keep: np.ndarray, warm: bool, py: bool):
    if not py:
        return retain(seq, rule, capacity, warm=warm, keep_set=keep)
    load, dropped = retention.retain_loop(
        seq.ptr, seq.block, seq.recency, seq.weight, keep, rule, capacity, warm
    )
    return retention.Retention(load=load, dropped_after=dropped)


@pytest.mark.parametrize("py", [False, True], ids=["compiled", "python"])
def test_every_rule_matches_the_reference(py: bool) -> None:
    rng = np.random.default_rng(7)
    for trial in range(150 if not py else 60):
        steps, n_blocks = random_steps(rng)
        weighted = trial % 3 == 0
        weight = [int(w) for w in rng.integers(1, 4, n_blocks)] if weighted else [1] * n_blocks
        capacity = int(rng.integers(0, sum(weight) + 2))
        warm = bool(rng.integers(0, 2))
        seq = as_sequence(steps, weight)
        counts = np.bincount(seq.block, minlength=n_blocks)
        keep_ids = sorted(range(n_blocks), key=lambda b: (-counts[b], b))[:capacity]
        keep = np.zeros(n_blocks, dtype=bool)
        keep[keep_ids] = True
        for name, rule in RULES.items():
            got = run(seq, rule, capacity, keep, warm, py)
            want = reference_loads(steps, name, capacity, weight, set(keep_ids), warm)
            assert got.load.tolist() == want, (trial, name, capacity, warm, steps)


def test_every_rule_matches_the_reference_on_wide_steps() -> None:
    """Up to 64 blocks and 40 per step: every way the loop ranks (keep all, select by passes
    where few are kept or few dropped, quickselect otherwise, sort by weight) runs."""
    rng = np.random.default_rng(13)
    for trial in range(30):
        steps, n_blocks = big_steps(rng)
        weighted = trial % 5 == 0
        weight = [int(w) for w in rng.integers(1, 4, n_blocks)] if weighted else [1] * n_blocks
        seq = as_sequence(steps, weight)
        counts = np.bincount(seq.block, minlength=n_blocks)
        for capacity in sorted({0, 1, 5, 9, 12, 20, n_blocks // 2, n_blocks - 3, n_blocks}):
            keep_ids = sorted(range(n_blocks), key=lambda b: (-counts[b], b))[:capacity]
            keep = np.zeros(n_blocks, dtype=bool)
            keep[keep_ids] = True
            for name, rule in RULES.items():
                got = retain(seq, rule, capacity, keep_set=keep).load.tolist()
                want = reference_loads(steps, name, capacity, weight, set(keep_ids), False)
                assert got == want, (trial, name, capacity)


def test_belady_is_a_lower_bound_and_capacity_never_hurts_lru_or_belady() -> None:
    rng = np.random.default_rng(11)
    for _ in range(80):
        steps, n_blocks = random_steps(rng)
        seq = as_sequence(steps, [1] * n_blocks)
        keep = np.zeros(n_blocks, dtype=bool)
        previous = {RULE_LRU: None, RULE_BELADY: None}
        for capacity in range(n_blocks + 2):
            loads = {r: retain(seq, r, capacity, keep_set=keep).loads for r in RULES.values()}
            assert loads[RULE_BELADY] == min(loads.values()), loads
            for rule in previous:
                if previous[rule] is not None:
                    assert loads[rule] <= previous[rule]
                previous[rule] = loads[rule]


def test_capacity_zero_loads_every_item_and_room_for_all_leaves_first_uses() -> None:
    rng = np.random.default_rng(3)
    for _ in range(40):
        steps, n_blocks = random_steps(rng)
        seq = as_sequence(steps, [1] * n_blocks)
        first_uses = len({b for s in steps for b, _ in s})
        for rule in (RULE_LRU, RULE_LFU, RULE_BELADY):
            assert retain(seq, rule, 0).loads == seq.block.shape[0]  # C = 0 is dedup
            assert retain(seq, rule, n_blocks).loads == first_uses
            assert retain(seq, rule, n_blocks, warm=True).loads == 0


def test_dropped_after_replays_the_residency() -> None:
    """Rebuild the device's contents from load and dropped_after alone: a block is loaded
    exactly when it is not resident, and what stays between steps fits the capacity."""
    rng = np.random.default_rng(5)
    for _ in range(60):
        steps, n_blocks = random_steps(rng)
        seq = as_sequence(steps, [1] * n_blocks)
        capacity = int(rng.integers(0, n_blocks + 1))
        for rule in RULES.values():
            keep = np.arange(n_blocks) < capacity
            got = retain(seq, rule, capacity, keep_set=keep)
            resident: set[int] = set()
            for s in range(seq.n_steps):
                lo, hi = int(seq.ptr[s]), int(seq.ptr[s + 1])
                for i in range(lo, hi):
                    b = int(seq.block[i])
                    assert bool(got.load[i]) == (b not in resident)
                    resident.add(b)
                gone = {int(seq.block[i]) for i in np.flatnonzero(got.dropped_after == s)}
                assert gone <= resident
                resident -= gone
                assert len(resident) <= capacity
            stayed = {int(seq.block[i]) for i in np.flatnonzero(got.dropped_after == NEVER)}
            assert stayed == resident


def test_refusals() -> None:
    seq = as_sequence([[(0, 0)]], [1])
    with pytest.raises(MoeprofError, match="capacity must be 0 or more"):
        retain(seq, RULE_LRU, -1)

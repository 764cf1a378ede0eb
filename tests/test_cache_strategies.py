"""lfuda, s3fifo and arc against plain-Python references written apart from moeprof
(conftest.QUEUE_REFERENCES), compiled and as plain Python, plus the properties every retention
rule promises: never fewer loads than Belady, C = 0 is dedup, room for every block leaves only
first uses, and load/dropped_after describe a residency that fits the capacity."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import QUEUE_REFERENCES
from test_retention import as_sequence, big_steps, random_steps

from moeprof.errors import MoeprofError
from moeprof.strategies import get_strategy
from moeprof.strategies.arc import arc_loop
from moeprof.strategies.lfuda import lfuda_loop
from moeprof.strategies.retention import NEVER, RULE_BELADY, AccessSequence, retain, visit_order
from moeprof.strategies.s3fifo import s3fifo_loop, small_size

NAMES = tuple(QUEUE_REFERENCES)
WEIGHTED = ("lfuda", "s3fifo")  # arc refuses blocks of different weights


def python_run(name: str, seq: AccessSequence, capacity: int, warm: bool) -> np.ndarray:
    """The loop as plain Python (what runs where numba is missing)."""
    if name == "lfuda":
        load, _ = lfuda_loop(seq.ptr, seq.block, seq.recency, seq.weight, capacity, warm)
    elif name == "s3fifo":
        load, _ = s3fifo_loop(
            seq.ptr, visit_order(seq), seq.block, seq.weight, capacity, small_size(capacity), warm
        )
    else:
        load, _ = arc_loop(seq.ptr, visit_order(seq), seq.block, seq.n_blocks, capacity, warm)
    return load


def reference(
    name: str, steps: list[list[tuple[int, int]]], capacity: int, weight: list[int], warm: bool
) -> list[bool]:
    cache = QUEUE_REFERENCES[name](capacity, weight)
    seen: set[int] = set()
    out = []
    for items in steps:
        loaded = cache.step(items)
        out += [b in loaded and (b in seen or not warm) for b, _ in items]
        seen |= {b for b, _ in items}
    return out


@pytest.mark.parametrize("py", [False, True], ids=["compiled", "python"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_the_reference_on_small_sequences(name: str, py: bool) -> None:
    rng = np.random.default_rng(17)
    for trial in range(200 if not py else 80):
        steps, n_blocks = random_steps(rng)
        weighted = name in WEIGHTED and trial % 3 == 0
        weight = [int(w) for w in rng.integers(1, 4, n_blocks)] if weighted else [1] * n_blocks
        capacity = int(rng.integers(0, sum(weight) + 2))
        warm = bool(rng.integers(0, 2))
        seq = as_sequence(steps, weight)
        if py:
            got = python_run(name, seq, capacity, warm).tolist()
        else:
            got = get_strategy(name).retention(seq, capacity, warm=warm).load.tolist()  # type: ignore[attr-defined]
        assert got == reference(name, steps, capacity, weight, warm), (trial, capacity, steps)


@pytest.mark.parametrize("name", NAMES)
def test_matches_the_reference_on_wide_sequences(name: str) -> None:
    rng = np.random.default_rng(23)
    for _ in range(25):
        steps, n_blocks = big_steps(rng)
        seq = as_sequence(steps, [1] * n_blocks)
        for capacity in sorted({0, 1, 3, 9, n_blocks // 2, n_blocks - 1}):
            got = get_strategy(name).retention(seq, capacity).load.tolist()  # type: ignore[attr-defined]
            assert got == reference(name, steps, capacity, [1] * n_blocks, False), capacity


def test_properties_against_belady_dedup_and_first_uses() -> None:
    rng = np.random.default_rng(29)
    for trial in range(120):
        steps, n_blocks = random_steps(rng) if trial % 2 else big_steps(rng)
        seq = as_sequence(steps, [1] * n_blocks)
        n_items = seq.block.shape[0]
        first_uses = len({b for s in steps for b, _ in s})
        for capacity in range(0, n_blocks + 2, max(1, n_blocks // 8)):
            bound = retain(seq, RULE_BELADY, capacity).loads
            for name in NAMES:
                loads = get_strategy(name).retention(seq, capacity).loads  # type: ignore[attr-defined]
                assert bound <= loads <= n_items, (name, capacity)
        for name in NAMES:
            strategy = get_strategy(name)
            assert strategy.retention(seq, 0).loads == n_items  # type: ignore[attr-defined]
            assert strategy.retention(seq, n_blocks).loads == first_uses  # type: ignore[attr-defined]
            assert strategy.retention(seq, n_blocks, warm=True).loads == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", NAMES)
def test_dropped_after_replays_a_residency_within_capacity(name: str) -> None:
    """Rebuild the device's contents from load and dropped_after alone (what replay's slot
    assignment reads): a block loads exactly when not resident; what stays fits."""
    rng = np.random.default_rng(31)
    for trial in range(80):
        steps, n_blocks = random_steps(rng) if trial % 2 else big_steps(rng)
        weighted = name in WEIGHTED and trial % 4 == 1
        weight = [int(w) for w in rng.integers(1, 4, n_blocks)] if weighted else [1] * n_blocks
        seq = as_sequence(steps, weight)
        capacity = int(rng.integers(0, sum(weight) + 1))
        got = get_strategy(name).retention(seq, capacity)  # type: ignore[attr-defined]
        resident: set[int] = set()
        for s in range(seq.n_steps):
            for i in range(int(seq.ptr[s]), int(seq.ptr[s + 1])):
                b = int(seq.block[i])
                assert bool(got.load[i]) == (b not in resident), (trial, s, b)
                resident.add(b)
            gone = {int(seq.block[i]) for i in np.flatnonzero(got.dropped_after == s)}
            assert gone <= resident
            resident -= gone
            assert sum(weight[b] for b in resident) <= capacity
        stayed = {int(seq.block[i]) for i in np.flatnonzero(got.dropped_after == NEVER)}
        assert stayed == resident


def test_refusals() -> None:
    seq = as_sequence([[(0, 0), (1, 1)]], [1, 2])
    for name in NAMES:
        with pytest.raises(MoeprofError, match="capacity must be 0 or more"):
            get_strategy(name).retention(seq, -1)  # type: ignore[attr-defined]
    with pytest.raises(MoeprofError, match=r"^arc: blocks of different sizes"):
        get_strategy("arc").retention(seq, 2)  # type: ignore[attr-defined]
    assert get_strategy("s3fifo").retention(seq, 2).loads == 2  # type: ignore[attr-defined]


def test_s3fifo_small_queue_share() -> None:
    assert [small_size(c) for c in (0, 1, 8, 9, 10, 11, 16, 32)] == [0, 1, 1, 1, 1, 2, 2, 4]

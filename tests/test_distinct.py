"""Distinct experts per batch (moeprof.strategies.schedule.distinct_per_batch) against a
per-batch Python dictionary, on both of its sorting paths."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_trace

import moeprof.strategies.schedule as schedule
from moeprof.batching import get_policy
from moeprof.trace import Trace


def _reference(trace: Trace, order: np.ndarray, starts: np.ndarray, layer: int):
    """(batch, expert) -> [requests, position of the last one], positions counted over the
    layer's routed requests in the plan's row order, slot by slot."""
    sentinel = int(trace.n_experts[layer])
    out: dict[tuple[int, int], list[int]] = {}
    position = 0
    for b in range(len(starts) - 1):
        for row in order[starts[b] : starts[b + 1]]:
            for e in trace.expert_ids[row, layer].tolist():
                if e == sentinel:
                    continue
                entry = out.setdefault((b, e), [0, -1])
                entry[0] += 1
                entry[1] = position
                position += 1
    return out


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_distinct_per_batch_matches_a_dictionary(
    monkeypatch: pytest.MonkeyPatch, packed: bool, seed: int
) -> None:
    if not packed:
        monkeypatch.setattr(schedule, "_PACKED_LIMIT", 0)  # the argsort path
    rng = np.random.default_rng(seed)
    trace = random_trace(rng)
    for policy, size in (("tokens", 1), ("tokens", 3), ("decode", 2), ("recorded", 1)):
        plan = get_policy(policy).plan(trace, size)
        for layer in range(trace.n_layers):
            got = schedule.distinct_per_batch(trace, plan, layer)
            want = _reference(trace, plan.order, plan.starts, layer)
            batch = np.repeat(np.arange(plan.n_batches), np.diff(got.ptr))
            rows = {
                (int(b), int(e)): [int(t), int(u)]
                for b, e, t, u in zip(batch, got.expert, got.tokens, got.last_use)
            }
            assert rows == want
            keys = list(zip(batch.tolist(), got.expert.tolist()))
            assert keys == sorted(keys)  # sorted by (batch, expert)

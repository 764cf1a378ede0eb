"""``naive``: one copy per (token, expert) request, in row order, through a small ring of slots
shared by all layers."""

from __future__ import annotations

import numpy as np

from moeprof.batching import BatchPlan
from moeprof.strategies.base import CountedLoads, Strategy
from moeprof.strategies.schedule import LayerSchedule, Schedule, batch_ptr, requests_in_order
from moeprof.trace import Trace

NAIVE_RING_SLOTS = 4  # naive copies cycle through this many slots (copy ahead of compute)


class NaiveStrategy(Strategy):
    name = "naive"
    help = "a copy per (token, expert) request"
    counted_basis = "analyze requests"

    def layer_schedule(
        self, trace: Trace, plan: BatchPlan, layer: int, cache_experts: int
    ) -> LayerSchedule:
        batch, expert = requests_in_order(trace, plan, layer)
        n = expert.shape[0]
        return LayerSchedule(
            layer=layer,
            ptr=batch_ptr(batch, plan.n_batches),
            expert=expert,
            slot=np.arange(n, dtype=np.int64) % NAIVE_RING_SLOTS,
            copy=np.ones(n, dtype=bool),
            tokens=np.ones(n, dtype=np.int64),
            n_slots=min(NAIVE_RING_SLOTS, max(n, 1)),
        )

    def slots_needed(self, counted: CountedLoads, cache_experts: int) -> list[int]:
        return [min(NAIVE_RING_SLOTS, max(int(r), 1)) for r in counted.requests]

    def counted_copies(self, counted: CountedLoads, schedule: Schedule) -> int:
        return int(counted.requests.sum())

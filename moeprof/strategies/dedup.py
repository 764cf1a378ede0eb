"""``dedup``: one copy per distinct expert of the batch (ascending id); slot = rank in the batch,
slots shared by all layers."""

from __future__ import annotations

import numpy as np

from moeprof.batching import BatchPlan
from moeprof.strategies.base import CountedLoads, Strategy
from moeprof.strategies.schedule import LayerSchedule, Schedule, distinct_per_batch
from moeprof.trace import Trace


class DedupStrategy(Strategy):
    name = "dedup"
    help = "a copy per distinct expert of the batch"
    counted_basis = "analyze unique"

    def layer_schedule(
        self, trace: Trace, plan: BatchPlan, layer: int, cache_experts: int
    ) -> LayerSchedule:
        distinct = distinct_per_batch(trace, plan, layer)
        n = distinct.expert.shape[0]
        batch = np.repeat(np.arange(plan.n_batches), np.diff(distinct.ptr))
        rank = np.arange(n, dtype=np.int64) - distinct.ptr[batch]
        return LayerSchedule(
            layer=layer,
            ptr=distinct.ptr,
            expert=distinct.expert,
            slot=rank,
            copy=np.ones(n, dtype=bool),
            tokens=distinct.tokens,
            n_slots=distinct.widest,
        )

    def slots_needed(self, counted: CountedLoads, cache_experts: int) -> list[int]:
        return counted.widest

    def counted_copies(self, counted: CountedLoads, schedule: Schedule) -> int:
        return int(counted.unique_per_batch.sum())

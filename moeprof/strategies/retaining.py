"""The base of every strategy that keeps experts on the device between batches (lru, lfu,
static, belady, ...): dedup's copies, minus the experts its rule retained. One retention
simulation (:mod:`moeprof.strategies.retention`) serves `moeprof cache`'s counts and
`moeprof replay`'s copies, so a replay copies exactly the loads the cache simulation counts.

A subclass sets ``name``, ``help``, ``cache_label`` and its rule: either ``rule`` (a rule code
of the shared loop) or its own :meth:`retention`.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from moeprof.batching import BatchPlan
from moeprof.strategies.base import CountedLoads, Strategy
from moeprof.strategies.retention import NEVER, AccessSequence, Retention, layer_sequence, retain
from moeprof.strategies.schedule import (
    LayerSchedule,
    Schedule,
    distinct_per_batch,
    expert_requests,
)
from moeprof.trace import Trace


class RetainingStrategy(Strategy):
    uses_cache = True
    shared_slots = False
    rule: ClassVar[int]  # the shared loop's rule code (retention.RULE_*)
    counted_basis = "cache simulation"

    def retention(
        self,
        seq: AccessSequence,
        capacity: int,
        *,
        warm: bool = False,
        popularity: np.ndarray | None = None,
    ) -> Retention:
        """Which items of `seq` load, keeping up to `capacity` (summed block weights) between
        steps. ``popularity`` (int64 [n_blocks]): requests per block over a profile, for rules
        that use one (default: the sequence's own requests)."""
        return retain(seq, self.rule, capacity, warm=warm)

    def layer_schedule(
        self, trace: Trace, plan: BatchPlan, layer: int, cache_experts: int
    ) -> LayerSchedule:
        distinct = distinct_per_batch(trace, plan, layer)
        seq = layer_sequence(distinct, int(trace.n_experts[layer]))
        # Popularity over the whole trace, even when only its first batches are replayed.
        kept = self.retention(seq, cache_experts, popularity=expert_requests(trace, layer))
        n_slots = cache_experts + distinct.widest  # survivors + the batch's misses never overflow
        slot = assign_slots(seq, kept, n_slots)
        # Issue hits before misses inside a batch so compute can start while misses are copied.
        order = np.lexsort((distinct.expert, kept.load, seq.step_of_item))
        return LayerSchedule(
            layer=layer,
            ptr=distinct.ptr,
            expert=distinct.expert[order],
            slot=slot[order],
            copy=kept.load[order],
            tokens=distinct.tokens[order],
            n_slots=n_slots,
        )

    def slots_needed(self, counted: CountedLoads, cache_experts: int) -> list[int]:
        return [w + cache_experts for w in counted.widest]

    def counted_copies(self, counted: CountedLoads, schedule: Schedule) -> int:
        # The simulation is the count: tests check it against independent references.
        return schedule.copies


def assign_slots(seq: AccessSequence, kept: Retention, n_slots: int) -> np.ndarray:
    """Device slot of every item: a load takes a free slot, a hit reads its block's slot, and a
    block's slot is freed at the end of the step after which the rule dropped it."""
    slot = np.empty(seq.block.shape[0], dtype=np.int64)
    slot_of = np.full(seq.n_blocks, -1, dtype=np.int64)
    free = list(range(n_slots - 1, -1, -1))
    gone = np.flatnonzero((kept.dropped_after >= 0) & (kept.dropped_after != NEVER))
    gone = gone[np.argsort(kept.dropped_after[gone], kind="stable")]
    gone_ptr = np.searchsorted(kept.dropped_after[gone], np.arange(seq.n_steps + 1))
    blocks = seq.block.tolist()
    loads = kept.load.tolist()
    for s in range(seq.n_steps):
        for i in range(int(seq.ptr[s]), int(seq.ptr[s + 1])):
            b = blocks[i]
            if loads[i]:
                slot_of[b] = free.pop()
            slot[i] = slot_of[b]
        for i in gone[gone_ptr[s] : gone_ptr[s + 1]].tolist():
            free.append(int(slot_of[blocks[i]]))
    return slot

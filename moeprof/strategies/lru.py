"""``lru``: dedup's experts, but each layer keeps the ``C`` most recently used experts on the
device across batches, and a hit is not copied.

Recency inside a batch follows each expert's last request (row order, then top-k slot);
eviction happens when the batch is done, so a batch's experts never evict one another. Each
layer owns ``C + max distinct per batch`` slots.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from moeprof.batching import BatchPlan
from moeprof.strategies.base import CountedLoads, Strategy
from moeprof.strategies.schedule import LayerSchedule, Schedule, distinct_per_batch
from moeprof.trace import Trace


class LruStrategy(Strategy):
    name = "lru"
    help = "dedup, keeping each layer's most recently used experts on the device"
    uses_cache = True
    cache_label = "LRU"
    shared_slots = False
    counted_basis = "LRU simulation"

    def layer_schedule(
        self, trace: Trace, plan: BatchPlan, layer: int, cache_experts: int
    ) -> LayerSchedule:
        """Simulate the layer's LRU cache over the batches; one pass, per batch (not per
        token)."""
        distinct = distinct_per_batch(trace, plan, layer)
        ptr = distinct.ptr
        n_batches = plan.n_batches
        n = distinct.expert.shape[0]
        n_slots = cache_experts + distinct.widest  # survivors + the batch's misses never overflow
        slot = np.empty(n, dtype=np.int64)
        copy = np.empty(n, dtype=bool)
        cache: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recent first
        free = list(range(n_slots - 1, -1, -1))
        experts = distinct.expert.tolist()
        last_use = distinct.last_use
        for b in range(n_batches):
            lo, hi = int(ptr[b]), int(ptr[b + 1])
            if lo == hi:
                continue
            for i in (lo + np.argsort(last_use[lo:hi], kind="stable")).tolist():
                e = experts[i]
                s = cache.get(e)
                if s is None:
                    s = free.pop()
                    cache[e] = s
                    copy[i] = True
                else:
                    cache.move_to_end(e)
                    copy[i] = False
                slot[i] = s
            while len(cache) > cache_experts:
                free.append(cache.popitem(last=False)[1])
        # Issue hits before misses inside a batch so compute can start while misses are copied.
        batch = np.repeat(np.arange(n_batches), np.diff(ptr))
        order = np.lexsort((distinct.expert, copy, batch))
        return LayerSchedule(
            layer=layer,
            ptr=ptr,
            expert=distinct.expert[order],
            slot=slot[order],
            copy=copy[order],
            tokens=distinct.tokens[order],
            n_slots=n_slots,
        )

    def slots_needed(self, counted: CountedLoads, cache_experts: int) -> list[int]:
        return [w + cache_experts for w in counted.widest]

    def counted_copies(self, counted: CountedLoads, schedule: Schedule) -> int:
        # The simulation is the count: tests check it against a request-by-request reference.
        return schedule.copies

"""``lfuda``: LFU with dynamic aging (docs/cache.md). Each retained block has a priority
``K = uses + L``: ``uses`` counts the steps (batches) that used it since it was last loaded (its
load counts 1; a dropped block starts again from 1), and ``L``, the cache's age, is read whenever
the block is used. After each step the blocks of (retained ∪ this step's) are ranked by ``K``
(ties: the more recent last request) and taken in that order while they fit the capacity; ``L``
then becomes the highest ``K`` among the blocks dropped at that boundary (unchanged if none were
dropped; it starts at 0). Aging lets blocks that were popular long ago leave, which plain
``lfu`` keeps forever. Parameters: none beyond the capacity. Weights: any (blocks of bytes are
taken in rank order while they fit, like the shared rules).
"""

from __future__ import annotations

import numpy as np

from moeprof.strategies.retaining import RetainingStrategy
from moeprof.strategies.retention import (
    NEVER,
    AccessSequence,
    Retention,
    check_capacity,
    run_loop,
)


def lfuda_loop(
    ptr: np.ndarray,
    block: np.ndarray,
    recency: np.ndarray,
    weight: np.ndarray,
    capacity: int,
    warm: bool,
) -> tuple[np.ndarray, np.ndarray]:
    n_items = block.shape[0]
    n_steps = ptr.shape[0] - 1
    n_blocks = weight.shape[0]
    load = np.zeros(n_items, dtype=np.bool_)
    dropped = np.full(n_items, -1, dtype=np.int64)
    cached = np.zeros(n_blocks, dtype=np.bool_)
    seen = np.zeros(n_blocks, dtype=np.bool_)
    last = np.zeros(n_blocks, dtype=np.int64)
    uses = np.zeros(n_blocks, dtype=np.int64)
    priority = np.zeros(n_blocks, dtype=np.int64)
    last_item = np.zeros(n_blocks, dtype=np.int64)
    cache = np.empty(n_blocks, dtype=np.int64)
    n_cache = 0
    cand = np.empty(n_blocks, dtype=np.int64)
    age = 0
    for s in range(n_steps):
        m = 0
        for j in range(n_cache):
            cand[m] = cache[j]
            m += 1
        total = 0
        for i in range(ptr[s], ptr[s + 1]):
            b = block[i]
            if cached[b]:
                uses[b] += 1
            else:
                if seen[b] or not warm:
                    load[i] = True
                uses[b] = 1
                cand[m] = b
                m += 1
            priority[b] = uses[b] + age
            seen[b] = True
            last[b] = recency[i]
            last_item[b] = i
        for j in range(m):
            total += weight[cand[j]]
        n_cache = 0
        if total <= capacity:  # all fit: nothing dropped, the age stays
            for j in range(m):
                cache[n_cache] = cand[j]
                n_cache += 1
                cached[cand[j]] = True
            continue
        # Rank by (priority, last request), highest first: two stable sorts.
        by_last = np.argsort(-last[cand[:m]], kind="mergesort")
        ranked = by_last[np.argsort(-priority[cand[:m]][by_last], kind="mergesort")]
        used = 0
        for j in range(m):
            b = cand[ranked[j]]
            cached[b] = False
            if used + weight[b] <= capacity:
                used += weight[b]
                cache[n_cache] = b
                n_cache += 1
                cached[b] = True
        top_dropped = -1
        for j in range(m):
            b = cand[j]
            if not cached[b]:
                dropped[last_item[b]] = s
                top_dropped = max(top_dropped, priority[b])
        age = top_dropped
    for j in range(n_cache):
        dropped[last_item[cache[j]]] = NEVER
    return load, dropped


class LfudaStrategy(RetainingStrategy):
    name = "lfuda"
    help = "dedup, keeping the experts used most since loaded, aged by the last drop (LFUDA)"
    cache_label = "LFUDA"
    counted_basis = "LFUDA simulation"

    def retention(
        self,
        seq: AccessSequence,
        capacity: int,
        *,
        warm: bool = False,
        popularity: np.ndarray | None = None,
    ) -> Retention:
        check_capacity(capacity)
        return run_loop(
            lfuda_loop,
            np.asarray(seq.ptr, dtype=np.int64),
            np.asarray(seq.block, dtype=np.int64),
            np.asarray(seq.recency, dtype=np.int64),
            np.asarray(seq.weight, dtype=np.int64),
            int(capacity),
            bool(warm),
        )

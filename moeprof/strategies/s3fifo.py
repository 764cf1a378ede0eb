"""``s3fifo``: S3-FIFO (Yang et al., SOSP 2023) at batch granularity (docs/cache.md).

Three FIFO queues: *small* (a share of 10% of the capacity, rounded up: C = 8 holds 1 block,
16 holds 2, 32 holds 4), *main* (the rest) and a *ghost* queue of block ids dropped from small,
remembering as many blocks as main holds (C − small; none at C ≤ 1). Each resident block has a
2-bit use counter (0..3).

A step's blocks, in the order of their last request: a retained block (in small or main) is a
hit and its counter goes up by 1 (once per step, capped at 3); any other block is a load and
enters with counter 0, at the head of main if the ghost remembers it (it leaves the ghost), else
at the head of small. Nothing leaves during the step, so a step's blocks never evict one
another. At the boundary, while small + main hold more than the capacity: if small holds more
than its share (or main is empty) its tail block is examined: used again since it entered
(counter >= 1) it moves to main's head with its counter cleared, else it is dropped and its id
enters the ghost (the ghost's oldest ids fall out beyond its size); otherwise main's tail block
is examined: a counter above 0 is decremented and the block reinserted at main's head, a counter
of 0 drops it. Weights: any (queues and the ghost measure summed block weights, as the paper
measures bytes).
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
    visit_order,
)

SMALL_SHARE = 0.1  # of the capacity, rounded up (the paper's default)
MAX_USES = 3  # the 2-bit counter


def s3fifo_loop(
    ptr: np.ndarray,
    order: np.ndarray,
    block: np.ndarray,
    weight: np.ndarray,
    capacity: int,
    small_size: int,
    warm: bool,
) -> tuple[np.ndarray, np.ndarray]:
    n_items = block.shape[0]
    n_steps = ptr.shape[0] - 1
    n_blocks = weight.shape[0]
    load = np.zeros(n_items, dtype=np.bool_)
    dropped = np.full(n_items, -1, dtype=np.int64)
    queue = np.zeros(n_blocks, dtype=np.int64)  # 0: not resident, 1: small, 2: main
    uses = np.zeros(n_blocks, dtype=np.int64)
    seen = np.zeros(n_blocks, dtype=np.bool_)
    last_item = np.zeros(n_blocks, dtype=np.int64)
    ghost_at = np.full(n_blocks, -1, dtype=np.int64)  # the block's live ghost entry
    # Queues as arrays written at the head and read at the tail, never wrapped: small and the
    # ghost take at most one entry per load; main one per load, promotion or reinsertion (each
    # reinsertion spends a use counted on a hit).
    small = np.empty(n_items + 1, dtype=np.int64)
    main = np.empty(3 * n_items + 1, dtype=np.int64)
    ghost = np.empty(n_items + 1, dtype=np.int64)
    s_head = s_tail = m_head = m_tail = g_head = g_tail = 0
    used_small = used_main = used_ghost = 0
    ghost_size = capacity - small_size
    for s in range(n_steps):
        for k in range(ptr[s], ptr[s + 1]):
            i = order[k]
            b = block[i]
            if queue[b] != 0:
                uses[b] = min(uses[b] + 1, MAX_USES)
            else:
                if seen[b] or not warm:
                    load[i] = True
                uses[b] = 0
                if ghost_at[b] >= 0:  # remembered: straight to main
                    ghost_at[b] = -1
                    used_ghost -= weight[b]
                    main[m_head] = b
                    m_head += 1
                    queue[b] = 2
                    used_main += weight[b]
                else:
                    small[s_head] = b
                    s_head += 1
                    queue[b] = 1
                    used_small += weight[b]
            seen[b] = True
            last_item[b] = i
        while used_small + used_main > capacity:
            if used_small > small_size or used_main == 0:
                b = small[s_tail]
                s_tail += 1
                used_small -= weight[b]
                if uses[b] >= 1:  # used again while in small: promoted
                    uses[b] = 0
                    main[m_head] = b
                    m_head += 1
                    queue[b] = 2
                    used_main += weight[b]
                else:
                    queue[b] = 0
                    dropped[last_item[b]] = s
                    ghost[g_head] = b
                    ghost_at[b] = g_head
                    g_head += 1
                    used_ghost += weight[b]
                    while used_ghost > ghost_size:
                        g = ghost[g_tail]
                        if ghost_at[g] == g_tail:  # else a stale entry: the block left the ghost
                            ghost_at[g] = -1
                            used_ghost -= weight[g]
                        g_tail += 1
            else:
                b = main[m_tail]
                m_tail += 1
                if uses[b] > 0:
                    uses[b] -= 1
                    main[m_head] = b
                    m_head += 1
                else:
                    queue[b] = 0
                    used_main -= weight[b]
                    dropped[last_item[b]] = s
    for b in range(n_blocks):
        if queue[b] != 0:
            dropped[last_item[b]] = NEVER
    return load, dropped


def small_size(capacity: int) -> int:
    """Small queue's share of the capacity: 10%, rounded up."""
    return -(-capacity // 10)


class S3FifoStrategy(RetainingStrategy):
    name = "s3fifo"
    help = "dedup, with S3-FIFO: a small probation FIFO, a main FIFO and a ghost queue"
    cache_label = "S3-FIFO"
    counted_basis = "S3-FIFO simulation"

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
            s3fifo_loop,
            np.asarray(seq.ptr, dtype=np.int64),
            visit_order(seq),
            np.asarray(seq.block, dtype=np.int64),
            np.asarray(seq.weight, dtype=np.int64),
            int(capacity),
            small_size(int(capacity)),
            bool(warm),
        )

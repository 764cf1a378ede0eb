"""``arc``: ARC, the adaptive replacement cache (Megiddo and Modha, FAST 2003), at batch
granularity (docs/cache.md).

Resident blocks are in T1 (used in one step since they entered) or T2 (in two or more); the
ghost lists B1 and B2 remember ids dropped from T1 and T2. ``p``, T1's target size, starts at 0
and adapts (a real number, as in the paper). A step's blocks, in the order of their last
request: a resident block is a hit and moves to T2's most recent end; a block in B1 is a load,
``p = min(C, p + max(1, |B2| / |B1|))``, and it enters T2; in B2, a load,
``p = max(0, p - max(1, |B1| / |B2|))``, into T2; any other block is a load into T1's most recent
end. Nothing leaves during the step, so a step's blocks never evict one another. At the
boundary, while |T1| + |T2| > C: T1's least recent block moves to B1 if T1 is non-empty and
holds more than ``p`` (or T2 is empty), else T2's least recent moves to B2 (the paper's
tie-break for a request found in B2 is left out: a boundary has no single request). Then the
ghosts are trimmed, least recent first: B1 until |T1| + |B1| <= C, B2 until all four lists hold
at most 2C. Weights: unit only (a pool sized in bytes is refused; ARC's sizes are counts).
"""

from __future__ import annotations

import numpy as np

from moeprof.errors import MoeprofError
from moeprof.strategies.retaining import RetainingStrategy
from moeprof.strategies.retention import (
    NEVER,
    AccessSequence,
    Retention,
    check_capacity,
    run_loop,
    visit_order,
)

T1, T2, B1, B2 = 1, 2, 3, 4  # where a block is (0: nowhere)


def arc_loop(
    ptr: np.ndarray,
    order: np.ndarray,
    block: np.ndarray,
    n_blocks: int,
    capacity: int,
    warm: bool,
) -> tuple[np.ndarray, np.ndarray]:
    n_items = block.shape[0]
    n_steps = ptr.shape[0] - 1
    load = np.zeros(n_items, dtype=np.bool_)
    dropped = np.full(n_items, -1, dtype=np.int64)
    where = np.zeros(n_blocks, dtype=np.int64)
    at = np.zeros(n_blocks, dtype=np.int64)  # the block's live entry in its list
    seen = np.zeros(n_blocks, dtype=np.bool_)
    last_item = np.zeros(n_blocks, dtype=np.int64)
    # Lists as arrays appended at the most recent end, read from the least recent; an entry
    # whose block has moved since is stale and skipped. T2 takes one entry per hit or ghost hit,
    # the others one per load.
    t1 = np.empty(n_items + 1, dtype=np.int64)
    t2 = np.empty(2 * n_items + 1, dtype=np.int64)
    b1 = np.empty(n_items + 1, dtype=np.int64)
    b2 = np.empty(n_items + 1, dtype=np.int64)
    t1_head = t1_tail = t2_head = t2_tail = b1_head = b1_tail = b2_head = b2_tail = 0
    n_t1 = n_t2 = n_b1 = n_b2 = 0
    p = 0.0
    cap = float(capacity)
    for s in range(n_steps):
        for k in range(ptr[s], ptr[s + 1]):
            i = order[k]
            b = block[i]
            w = where[b]
            if w == T1 or w == T2:
                if w == T1:
                    n_t1 -= 1
                else:
                    n_t2 -= 1
            else:
                if seen[b] or not warm:
                    load[i] = True
                if w == B1:
                    p = min(cap, p + max(1.0, n_b2 / n_b1))
                    n_b1 -= 1
                elif w == B2:
                    p = max(0.0, p - max(1.0, n_b1 / n_b2))
                    n_b2 -= 1
            if w == 0:
                t1[t1_head] = b
                at[b] = t1_head
                t1_head += 1
                where[b] = T1
                n_t1 += 1
            else:
                t2[t2_head] = b
                at[b] = t2_head
                t2_head += 1
                where[b] = T2
                n_t2 += 1
            seen[b] = True
            last_item[b] = i
        while n_t1 + n_t2 > capacity:
            if n_t1 > 0 and (n_t1 > p or n_t2 == 0):
                b = t1[t1_tail]
                t1_tail += 1
                while where[b] != T1 or at[b] != t1_tail - 1:
                    b = t1[t1_tail]
                    t1_tail += 1
                n_t1 -= 1
                b1[b1_head] = b
                at[b] = b1_head
                b1_head += 1
                where[b] = B1
                n_b1 += 1
            else:
                b = t2[t2_tail]
                t2_tail += 1
                while where[b] != T2 or at[b] != t2_tail - 1:
                    b = t2[t2_tail]
                    t2_tail += 1
                n_t2 -= 1
                b2[b2_head] = b
                at[b] = b2_head
                b2_head += 1
                where[b] = B2
                n_b2 += 1
            dropped[last_item[b]] = s
        while n_t1 + n_b1 > capacity:
            b = b1[b1_tail]
            b1_tail += 1
            if where[b] == B1 and at[b] == b1_tail - 1:
                where[b] = 0
                n_b1 -= 1
        while n_t1 + n_t2 + n_b1 + n_b2 > 2 * capacity:
            b = b2[b2_tail]
            b2_tail += 1
            if where[b] == B2 and at[b] == b2_tail - 1:
                where[b] = 0
                n_b2 -= 1
    for b in range(n_blocks):
        if where[b] == T1 or where[b] == T2:
            dropped[last_item[b]] = NEVER
    return load, dropped


class ArcStrategy(RetainingStrategy):
    name = "arc"
    help = "dedup, with ARC: recent and frequent lists sized by ghost hits"
    cache_label = "ARC"
    counted_basis = "ARC simulation"

    def retention(
        self,
        seq: AccessSequence,
        capacity: int,
        *,
        warm: bool = False,
        popularity: np.ndarray | None = None,
    ) -> Retention:
        check_capacity(capacity)
        if seq.weight.size and (int(seq.weight.min()) != 1 or int(seq.weight.max()) != 1):
            raise MoeprofError(
                "arc: blocks of different sizes (a pool sized in bytes) are not supported; "
                "size the pool in experts"
            )
        return run_loop(
            arc_loop,
            np.asarray(seq.ptr, dtype=np.int64),
            visit_order(seq),
            np.asarray(seq.block, dtype=np.int64),
            seq.n_blocks,
            int(capacity),
            bool(warm),
        )

"""``static``: a fixed set is ever retained: the most requested experts (ties: lower id) of a
profile (by default the trace itself, or another trace: profile on one workload, serve another),
as many as fit the capacity; each stays once first loaded."""

from __future__ import annotations

import numpy as np

from moeprof.strategies.retaining import RetainingStrategy
from moeprof.strategies.retention import RULE_STATIC, AccessSequence, Retention, retain


def top_blocks(popularity: np.ndarray, weight: np.ndarray, capacity: int) -> np.ndarray:
    """The fixed set: blocks by requests (most first, ties to the lower id), taken while their
    weights fit `capacity`. bool [n_blocks]."""
    order = np.lexsort((np.arange(popularity.shape[0]), -np.asarray(popularity, dtype=np.int64)))
    fits = np.cumsum(weight[order]) <= capacity
    keep = np.zeros(popularity.shape[0], dtype=bool)
    keep[order[fits]] = True
    return keep


class StaticStrategy(RetainingStrategy):
    name = "static"
    help = "dedup, keeping a fixed set: the most requested experts of a profile"
    cache_label = "static"
    rule = RULE_STATIC

    def retention(
        self,
        seq: AccessSequence,
        capacity: int,
        *,
        warm: bool = False,
        popularity: np.ndarray | None = None,
    ) -> Retention:
        if popularity is None:
            popularity = np.bincount(seq.block, weights=seq.requests, minlength=seq.n_blocks)
        keep = top_blocks(np.asarray(popularity, dtype=np.int64), seq.weight, capacity)
        return retain(seq, self.rule, capacity, warm=warm, keep_set=keep)

"""``lru``: dedup's experts, but each layer keeps the ``C`` most recently used experts on the
device across batches, and a hit is not copied.

Recency inside a batch follows each expert's last request (row order, then top-k slot);
eviction happens when the batch is done, so a batch's experts never evict one another. Each
layer owns ``C + max distinct per batch`` slots.
"""

from __future__ import annotations

from moeprof.strategies.retaining import RetainingStrategy
from moeprof.strategies.retention import RULE_LRU


class LruStrategy(RetainingStrategy):
    name = "lru"
    help = "dedup, keeping each layer's most recently used experts on the device"
    cache_label = "LRU"
    rule = RULE_LRU
    counted_basis = "LRU simulation"

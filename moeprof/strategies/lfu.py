"""``lfu``: keeps the experts used in the most batches so far (the current batch counts); ties go
to the more recently used."""

from __future__ import annotations

from moeprof.strategies.retaining import RetainingStrategy
from moeprof.strategies.retention import RULE_LFU


class LfuStrategy(RetainingStrategy):
    name = "lfu"
    help = "dedup, keeping the experts used in the most batches so far"
    cache_label = "LFU"
    rule = RULE_LFU

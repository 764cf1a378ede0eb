"""``belady``: keeps the experts needed soonest (next batch that uses them; never = dropped).
It reads the future, so no engine can run it: it is the bound. Per layer (experts of one size)
no strategy that retains as many experts loads fewer (docs/cache.md)."""

from __future__ import annotations

from moeprof.strategies.retaining import RetainingStrategy
from moeprof.strategies.retention import RULE_BELADY


class BeladyStrategy(RetainingStrategy):
    name = "belady"
    help = "the bound: keeps the experts needed soonest, reading the future"
    cache_label = "Belady"
    rule = RULE_BELADY

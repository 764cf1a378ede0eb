"""Expert residency strategies: what each copies host->device per batch and layer, and the
device slots it needs. Shared by replay and its reports.

One class per strategy (``naive``, ``dedup``, ``lru``, ``lfu``, ``static``, ``belady``, ``lfuda``,
``s3fifo``, ``arc``, one module each; the caching ones share :mod:`moeprof.strategies.retaining`) in a registry
(:mod:`moeprof.strategies.registry`), in run order. Definitions: docs/replay.md, "What is
replayed".
"""

from __future__ import annotations

from moeprof.strategies.base import CountedLoads, Strategy
from moeprof.strategies.registry import (
    BASELINE,
    DEFAULT_STRATEGIES,
    REGISTRY,
    STRATEGIES,
    check_cache_experts,
    check_strategies,
    get_strategy,
    strategy_help,
)
from moeprof.strategies.schedule import LayerSchedule, Schedule

__all__ = [
    "BASELINE",
    "DEFAULT_STRATEGIES",
    "REGISTRY",
    "STRATEGIES",
    "CountedLoads",
    "LayerSchedule",
    "Schedule",
    "Strategy",
    "check_cache_experts",
    "check_strategies",
    "get_strategy",
    "strategy_help",
]

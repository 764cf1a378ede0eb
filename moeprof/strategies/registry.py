"""The residency strategies by name, in run order: adding one is a class in its own module
plus a line here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moeprof.errors import MoeprofError, check_names, is_whole_number
from moeprof.strategies.arc import ArcStrategy
from moeprof.strategies.base import Strategy
from moeprof.strategies.belady import BeladyStrategy
from moeprof.strategies.dedup import DedupStrategy
from moeprof.strategies.lfu import LfuStrategy
from moeprof.strategies.lfuda import LfudaStrategy
from moeprof.strategies.lru import LruStrategy
from moeprof.strategies.naive import NaiveStrategy
from moeprof.strategies.s3fifo import S3FifoStrategy
from moeprof.strategies.static import StaticStrategy

# Run order: the baseline first, the one the others are compared with.
REGISTRY: dict[str, Strategy] = {
    s.name: s
    for s in (
        NaiveStrategy(),
        DedupStrategy(),
        LruStrategy(),
        LfuStrategy(),
        StaticStrategy(),
        BeladyStrategy(),
        LfudaStrategy(),
        S3FifoStrategy(),
        ArcStrategy(),
    )
}
STRATEGIES = tuple(REGISTRY)
# What replay runs unless told: the baseline, per-batch dedup, and the classic cache.
DEFAULT_STRATEGIES = ("naive", "dedup", "lru")
BASELINE = NaiveStrategy.name  # savings are measured against it (results' "vs_naive")


def get_strategy(name: str) -> Strategy:
    strategy = REGISTRY.get(name)
    if strategy is None:
        raise MoeprofError(f"unknown strategy {name!r}; choose from {', '.join(REGISTRY)}")
    return strategy


def check_strategies(names: Sequence[str]) -> tuple[str, ...]:
    """Known, distinct strategy names in run order; a MoeprofError names the first unknown."""
    return check_names(
        names, tuple(REGISTRY), param="strategies", plural="strategies", singular="strategy"
    )


def check_cache_experts(cache_experts: Any) -> int:
    whole = is_whole_number(cache_experts)
    if not whole or cache_experts < 0:
        raise MoeprofError(f"cache_experts must be 0 or more, got {cache_experts!r}")
    return int(cache_experts)


def strategy_help() -> str:
    """`--strategies` help: every registered strategy with its few words, in run order."""
    listed = ", ".join(f"{s.name} ({s.help})" for s in REGISTRY.values())
    return f"Comma-separated, run in this order: {listed}."

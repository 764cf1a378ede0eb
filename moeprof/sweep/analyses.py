"""The analyses a sweep can run: one registry entry each (docs/sweep.md, "Analyses").

An entry names its settings (each with a checker for one value) and a `run(trace, settings,
batch_sizes)` that calls the library once and returns one flat dict of metrics per batch size.
A new analysis is one `Analysis` here plus its line in `REGISTRY`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from moeprof.batching import POLICIES
from moeprof.errors import MoeprofError
from moeprof.trace import Trace

Metrics = dict[str, Any]
# A checker returns a problem with one setting value (None: the value is fine).
Checker = Callable[[Any], "str | None"]


def _one_of(allowed: Sequence[str]) -> Checker:
    def check(value: Any) -> str | None:
        return None if value in allowed else f"must be one of {', '.join(allowed)}"

    return check


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _capacity(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return None
    if isinstance(value, str):
        from moeprof.cache import capacity_from_spelling

        try:  # the spelling alone (top-k and expert counts come with the trace)
            capacity_from_spelling(value, 1, 1)
            return None
        except MoeprofError:
            pass
    return "must be a cache size: a whole number (4), a multiple of top-k (2k) or a share (25%)"


def resolve_capacity(value: int | str, trace: Trace) -> int:
    """A `cache_experts` value -> C experts per layer ('2k' = 2 * top_k, '25%' of the fewest
    experts any layer has), as `moeprof cache --cache-experts` reads it (docs/cache.md)."""
    if isinstance(value, int):
        return value
    from moeprof.cache import capacity_from_spelling

    return capacity_from_spelling(value, trace.top_k, int(trace.n_experts.min()))


def _cache_strategy_names() -> tuple[str, ...]:
    from moeprof.cache import REFERENCES
    from moeprof.strategies.registry import REGISTRY as STRATEGIES

    return REFERENCES + tuple(n for n, s in STRATEGIES.items() if s.uses_cache)


@dataclass(frozen=True)
class Analysis:
    name: str
    help: str
    settings: Mapping[str, Checker]  # besides batch_sizes, which every analysis takes
    defaults: Mapping[str, Any]
    run: Callable[[Trace, Mapping[str, Any], list[int]], dict[int, Metrics]]


_ANALYZE_METRICS = (
    "n_batches", "tokens", "requests", "unique", "memory_savings", "bandwidth_savings",
    "bytes_requested", "bytes_unique", "bytes_saved", "max_reuse_factor", "max_reuse_layer",
    "mean_reuse_factor", "uniform_unique", "uniform_memory_savings",
)  # fmt: skip


def _run_analyze(trace: Trace, settings: Mapping[str, Any], sizes: list[int]) -> dict[int, Metrics]:
    from moeprof.analyze import analyze

    result = analyze(trace, sizes, policy=settings["policy"])
    return {r.batch_size: {m: getattr(r, m) for m in _ANALYZE_METRICS} for r in result.results}


_CACHE_METRICS = (
    "pool", "n_batches", "tokens", "requests", "unique", "loads", "bytes_loaded", "hit_rate",
    "bytes_per_token", "savings_vs_naive", "savings_vs_dedup",
)  # fmt: skip


def _run_cache(trace: Trace, settings: Mapping[str, Any], sizes: list[int]) -> dict[int, Metrics]:
    from moeprof.cache import simulate_cache

    capacity = resolve_capacity(settings["cache_experts"], trace)
    result = simulate_cache(
        trace,
        [settings["strategy"]],
        [capacity],
        sizes,
        settings["policy"],
        budget=settings["budget"],
        count=settings["count"],
        warm=settings["warm"],
    )
    out: dict[int, Metrics] = {}
    for row in result.rows:
        if row.strategy == settings["strategy"] and row.cache_experts == capacity:
            out[row.batch_size] = {"cache_experts_resolved": capacity} | {
                m: getattr(row, m) for m in _CACHE_METRICS
            }
    return out


def _lazy_one_of(names: Callable[[], Sequence[str]]) -> Checker:
    return lambda value: _one_of(names())(value)


REGISTRY: dict[str, Analysis] = {
    a.name: a
    for a in (
        Analysis(
            "analyze",
            "dedup savings per batch size (moeprof analyze)",
            {"policy": _one_of(POLICIES)},
            {"policy": "tokens"},
            _run_analyze,
        ),
        Analysis(
            "cache",
            "loads and hit rate of one caching strategy at one capacity (moeprof cache)",
            {
                "strategy": _lazy_one_of(_cache_strategy_names),
                "cache_experts": _capacity,
                "policy": _one_of(POLICIES),
                "budget": _one_of(("per-layer", "global")),
                "count": _one_of(("batch", "access")),
                "warm": _boolean,
            },
            {"policy": "decode", "budget": "per-layer", "count": "batch", "warm": False},
            _run_cache,
        ),
    )
}

"""The analyses a sweep can run: one registry entry each (docs/sweep.md, "Analyses").

An entry names its settings (each with a checker for one value) and a `run(trace, settings,
batch_sizes)` that calls the library once and returns one flat dict of metrics per batch size.
A new analysis is one `Analysis` here plus its line in `REGISTRY`; its `headline` metric is
what the sweep report (`moeprof.sweep.summary`) averages into patterns and plots.
"""

from __future__ import annotations

import re
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


def _optional(check: Checker) -> Checker:
    """`check`, where None (the setting left out) is fine too."""
    return lambda value: None if value is None else check(value)


def _whole(lowest: int) -> Checker:
    def check(value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= lowest
        return None if ok else f"must be a whole number, {lowest} or more"

    return check


def _layer_list(value: Any) -> str | None:
    """MoE layers to replay: one index (3) or comma-separated indices as text ("0,12,24")."""
    if _whole(0)(value) is None:
        return None
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", value):
        return None
    return 'must be a MoE layer index (3) or comma-separated indices ("0,12,24")'


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
    # The metric the sweep report averages into patterns and plots (a share, 0..1), and its words.
    headline: tuple[str, str] = ("", "")


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


def chosen_strategy(settings: Mapping[str, Any]) -> str:
    """The cache's strategy: `strategies` (the documented name of the axis) or its older
    spelling `strategy`; exactly one of them."""
    given = [settings.get(k) for k in ("strategies", "strategy") if settings.get(k) is not None]
    if len(given) != 1:
        raise MoeprofError(
            "cache needs strategies (one caching strategy per experiment; strategy is the same "
            "setting's older name)"
            if not given
            else "cache takes strategies or strategy, not both"
        )
    return str(given[0])


def _run_cache(trace: Trace, settings: Mapping[str, Any], sizes: list[int]) -> dict[int, Metrics]:
    from moeprof.cache import simulate_cache

    strategy = chosen_strategy(settings)
    capacity = resolve_capacity(settings["cache_experts"], trace)
    result = simulate_cache(
        trace,
        [strategy],
        [capacity],
        sizes,
        settings["policy"],
        budget=settings["budget"],
        count=settings["count"],
        warm=settings["warm"],
    )
    out: dict[int, Metrics] = {}
    for row in result.rows:
        if row.strategy == strategy and row.cache_experts == capacity:
            out[row.batch_size] = {"cache_experts_resolved": capacity} | {
                m: getattr(row, m) for m in _CACHE_METRICS
            }
    return out


_REPLAY_RUN_METRICS = (
    "copies", "counted_copies", "hits", "bytes_copied", "bytes_copied_full_size", "seconds",
    "wall_seconds", "gbps",
)  # fmt: skip


def _replay_layers(value: int | str | None) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return [value]
    return [int(part) for part in value.split(",")]


def _run_replay(trace: Trace, settings: Mapping[str, Any], sizes: list[int]) -> dict[int, Metrics]:
    """One strategy replayed on the CPU backend (host copies): copies and bytes are exact and
    equal `moeprof.replay`'s; seconds and GB/s are this machine's memory, measured anew."""
    from moeprof.replay import replay

    capacity = resolve_capacity(settings["cache_experts"], trace)
    result = replay(
        trace,
        device="cpu",
        strategies=[settings["strategies"]],
        batch_sizes=sizes,
        policy=settings["policy"],
        cache_experts=capacity,
        max_batches=settings["max_batches"],
        layers=_replay_layers(settings["layers"]),
        expert_bytes=settings["expert_bytes"],
        # The peak-rate calibration copies 256 MiB per call: a sweep row keeps GB/s without it.
        calibrate=False,
    )
    replayed = list(result.info["layers"])
    block = dict(zip(replayed, result.info["expert_bytes_replayed"]))
    out: dict[int, Metrics] = {}
    for counted in result.analysis.results:
        (run,) = result.runs_for(counted.batch_size)
        # naive issues one copy per (token, expert) request: the baseline, counted.
        naive_bytes = sum(lr.requests * block[lr.layer] for lr in counted.layers)
        out[counted.batch_size] = {
            "cache_experts_resolved": capacity,
            "layers_replayed": len(replayed),
            "block_bytes": max(block.values()),
            "n_batches": run.n_batches,
            "batches_total": result.batches_total.get(counted.batch_size, run.n_batches),
            "tokens": counted.tokens,
            "requests": counted.requests,
            "unique": counted.unique,
            "naive_bytes": naive_bytes,
            "savings_vs_naive": 1.0 - run.bytes_copied / naive_bytes if naive_bytes else None,
        } | {m: getattr(run, m) for m in _REPLAY_RUN_METRICS}
    return out


def _replay_strategy_names() -> tuple[str, ...]:
    from moeprof.strategies.registry import REGISTRY as STRATEGIES

    return tuple(STRATEGIES)


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
            ("memory_savings", "memory savings"),
        ),
        Analysis(
            "cache",
            "loads and hit rate of one caching strategy at one capacity (moeprof cache)",
            {
                "strategies": _optional(_lazy_one_of(_cache_strategy_names)),
                "strategy": _optional(_lazy_one_of(_cache_strategy_names)),  # the older name
                "cache_experts": _capacity,
                "policy": _one_of(POLICIES),
                "budget": _one_of(("per-layer", "global")),
                "count": _one_of(("batch", "access")),
                "warm": _boolean,
            },
            {
                "strategies": None,
                "strategy": None,
                "policy": "decode",
                "budget": "per-layer",
                "count": "batch",
                "warm": False,
            },
            _run_cache,
            ("hit_rate", "hit rate"),
        ),
        Analysis(
            "replay",
            "one strategy's expert copies replayed on the CPU backend (moeprof replay --device cpu)",
            {
                "strategies": _lazy_one_of(_replay_strategy_names),
                "cache_experts": _capacity,
                "policy": _one_of(POLICIES),
                "expert_bytes": _optional(_whole(1)),
                "max_batches": _optional(_whole(1)),
                "layers": _optional(_layer_list),
            },
            {
                "cache_experts": 0,
                "policy": "tokens",
                "expert_bytes": None,
                "max_batches": None,
                "layers": None,
            },
            _run_replay,
            ("savings_vs_naive", "bytes saved against naive"),
        ),
    )
}

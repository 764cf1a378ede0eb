"""What an expert cache would save on a trace: loads, bytes and hit rates of every cache strategy
x capacity x batch size, against the two references (naive, dedup) and the Belady bound.

Pure analysis: arrays in, dataclasses out. The retention model is the one
:mod:`moeprof.strategies.retention` simulates (docs/cache.md, "Semantics"): batches run in the
order the batching policy gives; all distinct experts of a batch are on the device while it runs;
``cache_experts = C`` experts per layer are *retained* between batches on top of that working set;
a *load* is a distinct expert of a batch that was not retained at the boundary before it. Every
strategy is the registry's own object (:mod:`moeprof.strategies`), so `moeprof replay` copies
exactly the loads counted here.

Switches (docs/cache.md, "Switches"): ``budget`` (one retained set per layer, or one pool of
(layer, expert) blocks for all layers holding the same memory as C per layer), ``count`` (loads
per batch, or per access: every request of an expert not retained is a load), ``warm`` (first
uses are not loads), ``phase`` (which rows are simulated) and ``popularity_from`` (static's
profile from another trace).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from moeprof._version import __version__
from moeprof.analyze import masks_from_ids, unique_per_batch
from moeprof.batching import BatchPlan, check_batch_sizes, get_policy
from moeprof.errors import MoeprofError
from moeprof.strategies import REGISTRY, check_cache_experts, check_strategies
from moeprof.strategies.retaining import RetainingStrategy
from moeprof.strategies.retention import (
    AccessSequence,
    global_sequence,
    layer_sequence,
    map_threads,
)
from moeprof.strategies.schedule import Distinct, distinct_per_batch, expert_requests
from moeprof.stream import TraceSource, as_source, source_summary
from moeprof.trace import PHASE_DECODE, PHASE_PREFILL, Trace, ids_placeholder, out_of_range_id

BUDGETS = ("per-layer", "global")
COUNTS = ("batch", "access")
PHASES = ("all", "decode", "prefill")
CAPACITY_UNITS = ("experts", "bytes")
# The two references every row is compared with: no cache at all, per request or per batch.
REFERENCES = ("naive", "dedup")
# The strategies the gap is measured between: the classic policy and the bound.
GAP_FROM, GAP_TO = "lru", "belady"
DEFAULT_CACHE_STRATEGIES = ("lru", "lfu", "static", "belady")
WORKING_SET_PERCENTILE = 95


# ---------------------------------------------------------------------- results


@dataclass(frozen=True)
class CacheLayer:
    layer: int
    model_layer: int
    requests: int  # (token, expert) requests at this layer
    unique: int  # distinct experts summed over batches (dedup's loads, cold)
    loads: int


@dataclass(frozen=True)
class CacheRow:
    """One strategy at one batch size and capacity."""

    strategy: str
    batch_size: int
    policy: str
    cache_experts: int  # C: experts retained per layer (references: 0)
    cache_spelling: str  # how C was asked for ("4", "2k", "25%", "24GiB")
    budget: str
    pool: int  # what the rule may retain: C (per layer), C*L blocks or C*sum(bytes) (global)
    n_batches: int
    tokens: int
    requests: int
    unique: int
    loads: int
    bytes_loaded: int | None  # None: some layer's expert size is unknown
    hit_rate: float  # 1 - loads / lookups (lookups: unique, or requests when counting accesses)
    bytes_per_token: float | None
    savings_vs_naive: float
    savings_vs_dedup: float
    gap_captured: float | None  # (lru - loads) / (lru - belady); None when the gap is 0
    link_seconds_per_token: float | None
    link_tokens_per_second: float | None
    layers: tuple[CacheLayer, ...]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = [asdict(layer) for layer in self.layers]
        for key in ("link_seconds_per_token", "link_tokens_per_second"):
            if out[key] is None:
                del out[key]
        return out


@dataclass(frozen=True)
class WorkingSet:
    """Distinct experts per batch at one layer: what the device holds besides the cache."""

    batch_size: int
    layer: int
    model_layer: int
    n_batches: int
    mean: float
    p95: int  # nearest rank: the smallest count at least 95% of batches stay within
    max: int


@dataclass(frozen=True)
class GapRow:
    """LRU against the Belady bound at one batch size and capacity."""

    batch_size: int
    cache_experts: int
    lru_loads: int
    belady_loads: int
    lru_hit_rate: float
    belady_hit_rate: float
    gap_loads: int
    gap_points: float  # 100 * (belady_hit_rate - lru_hit_rate)
    captured: dict[str, float | None]  # strategy -> share of the gap it captures


@dataclass(frozen=True)
class CacheResult:
    trace: dict[str, Any]
    settings: dict[str, Any]
    rows: tuple[CacheRow, ...]
    working_sets: tuple[WorkingSet, ...]
    gaps: tuple[GapRow, ...]

    def to_dict(self) -> dict[str, Any]:
        """The ``kind: "cache"`` results document (docs/cache.md, "Results JSON")."""
        return {
            "kind": "cache",
            "moeprof_version": __version__,
            "trace": self.trace,
            "cache": self.settings,
            "results": [r.to_dict() for r in self.rows],
            "working_sets": [asdict(w) for w in self.working_sets],
            "gaps": [asdict(g) for g in self.gaps],
        }


# ---------------------------------------------------------------------- inputs


_WHOLE = re.compile(r"[0-9]{1,9}")
_TOP_K = re.compile(r"([0-9]{1,6})k")
_SHARE = re.compile(r"([0-9]{1,3}(?:\.[0-9]{1,6})?)%")


def capacity_from_spelling(item: str, top_k: int, n_experts: int) -> int:
    """One cache size as users spell it -> C experts per layer: a whole number ('4'), a
    multiple of top-k ('2k' = 2 * top_k) or a share of a layer's experts ('25%' =
    floor(0.25 * n_experts)); docs/cache.md."""
    spelled = item.strip().lower()
    if spelled.startswith("-"):
        raise MoeprofError(f"cache_experts {item!r}: a cache size must be 0 or more")
    if _WHOLE.fullmatch(spelled):
        return int(spelled)
    if m := _TOP_K.fullmatch(spelled):
        return int(m.group(1)) * top_k
    if m := _SHARE.fullmatch(spelled):
        share = float(m.group(1))
        if share > 100:
            raise MoeprofError(f"cache_experts {item!r}: a share must be at most 100%")
        return math.floor(share * n_experts / 100 + 1e-9)
    raise MoeprofError(
        f"cache_experts {item!r} is not a cache size: a whole number (4), a multiple of "
        "top-k (2k) or a share of the layer's experts (25%)"
    )


def _choice(value: Any, allowed: Sequence[str], name: str) -> str:
    if value not in allowed:
        raise MoeprofError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return str(value)


def phase_rows(trace: Trace, phase: str) -> np.ndarray | None:
    """The rows of `trace` in `phase` ('all', 'decode', 'prefill'), in stored order; None when
    that is every row. A trace without phases is all decode. Reads only the phase column."""
    _choice(phase, PHASES, "phase")
    if phase == "all":
        return None
    if trace.phase is None:
        if phase == "prefill":
            raise MoeprofError(
                "phase 'prefill': the trace records no phases, so all its rows count as decode"
            )
        return None
    keep = np.flatnonzero(trace.phase == (PHASE_DECODE if phase == "decode" else PHASE_PREFILL))
    if keep.size == 0:
        raise MoeprofError(f"phase {phase!r}: the trace has no {phase} rows")
    return None if keep.size == trace.n_tokens else keep


def _rows_of(trace: Trace, keep: np.ndarray, expert_ids: np.ndarray) -> Trace:
    """`trace`'s rows `keep` with `expert_ids` for them. A subset of request-major rows stays
    request-major: no check needs repeating."""

    def rows(arr: np.ndarray | None) -> np.ndarray | None:
        return None if arr is None else np.ascontiguousarray(arr[keep])

    return Trace(
        expert_ids=expert_ids,
        request_ids=np.ascontiguousarray(trace.request_ids[keep]),
        positions=np.ascontiguousarray(trace.positions[keep]),
        n_experts=trace.n_experts,
        expert_bytes=trace.expert_bytes,
        gate_weights=rows(trace.gate_weights),
        steps=rows(trace.steps),
        phase=rows(trace.phase),
        token_ids=rows(trace.token_ids),
        meta=trace.meta,
    )


def select_phase(trace: Trace, phase: str) -> Trace:
    """The rows of `trace` in `phase` (:func:`phase_rows`) as a trace."""
    keep = phase_rows(trace, phase)
    if keep is None:
        return trace
    return _rows_of(trace, keep, np.ascontiguousarray(trace.expert_ids[keep]))


def select_phase_rows(columns: Trace, phase: str) -> tuple[Trace, np.ndarray | None]:
    """:func:`select_phase` of a trace's per-token columns only (its expert ids are not read:
    they may be a placeholder), and the rows kept (None: all)."""
    keep = phase_rows(columns, phase)
    if keep is None:
        return columns, None
    placeholder = ids_placeholder(
        keep.size, columns.n_layers, columns.top_k, columns.expert_ids.dtype
    )
    return _rows_of(columns, keep, placeholder), keep


def requests_per_expert(trace: Trace) -> list[np.ndarray]:
    """Requests of each expert over the whole trace, per layer (static's profile)."""
    return [expert_requests(trace, layer) for layer in range(trace.n_layers)]


def _check_profile(trace: Trace, profile: Trace) -> None:
    same = profile.n_layers == trace.n_layers and np.array_equal(profile.n_experts, trace.n_experts)
    if not same:
        raise MoeprofError(
            f"popularity_from has {profile.n_layers} MoE layers of "
            f"{_experts_text(profile.n_experts)} experts; the trace has {trace.n_layers} of "
            f"{_experts_text(trace.n_experts)}: a profile must have the same layer layout"
        )


def _experts_text(n_experts: np.ndarray) -> str:
    values = sorted({int(x) for x in n_experts})
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def cache_strategies(names: Iterable[str]) -> tuple[str, ...]:
    """Known strategy names, in run order: the registry's caching strategies and the two
    references; a MoeprofError names the first that is neither."""
    chosen = check_strategies(list(names))
    for name in chosen:
        if name not in REFERENCES and not REGISTRY[name].uses_cache:
            raise MoeprofError(f"strategy {name!r} keeps no cache; choose from {_cache_names()}")
    return chosen


def _cache_names() -> str:
    return ", ".join(n for n, s in REGISTRY.items() if s.uses_cache or n in REFERENCES)


def _percentile_nearest_rank(values: np.ndarray, q: int) -> int:
    if values.size == 0:
        return 0
    ordered = np.sort(values)
    rank = -(-q * values.size // 100)  # ceil(q * n / 100), exact in integers
    return int(ordered[max(rank, 1) - 1])


def _ratio(part: float, whole: float) -> float:
    return float(part) / float(whole) if whole else 0.0


# ---------------------------------------------------------------------- memory


def widest_working_sets(
    trace: Trace | TraceSource,
    batch_sizes: Sequence[int],
    policy: str,
    keep: np.ndarray | None = None,
    columns: Trace | None = None,
) -> np.ndarray:
    """Per layer, the most distinct experts one batch uses, over every batch size given
    (int64 [L]): what the device holds for the running batch whatever the cache keeps.

    One layer's bitsets at a time; `keep` (rows) and `columns` (their per-token columns, as
    :func:`select_phase_rows` gives) restrict it to some rows."""
    source = as_source(trace)
    if columns is None:
        columns = source.columns()
    plans = get_policy(policy).plans(columns, check_batch_sizes(batch_sizes))
    widest = np.zeros(source.n_layers, dtype=np.int64)
    for layer in range(source.n_layers):
        ids = source.layer_ids(layer)
        if keep is not None:
            ids = ids[keep]
        one = ids[:, None, :]
        problem = out_of_range_id(one, source.n_experts[layer : layer + 1])
        if problem:
            raise MoeprofError(problem)
        masks = masks_from_ids(one, source.n_experts[layer : layer + 1])
        for plan in plans:
            per_batch = unique_per_batch(masks, plan)
            widest[layer] = max(int(widest[layer]), int(per_batch.max(initial=0)))
    return widest


@dataclass(frozen=True)
class MemoryFit:
    memory_bytes: int
    cache_experts: int  # C per layer that fits (at most the widest layer's expert count)
    all_experts_fit: bool  # the memory holds every expert of every layer
    working_set_bytes: int  # sum_l widest_l * bytes_l
    bytes_per_cached_expert: int  # sum_l bytes_l: one more retained expert in every layer
    widest: tuple[int, ...]


def capacity_for_memory(
    trace: Trace | TraceSource,
    memory_bytes: int,
    batch_sizes: Sequence[int],
    policy: str,
    *,
    phase: str = "all",
) -> MemoryFit:
    """C per layer that `memory_bytes` of device memory holds under the per-layer budget: each
    layer keeps C retained experts plus its widest batch's working set,
    C = floor((memory - sum_l W_l * bytes_l) / sum_l bytes_l)."""
    source = as_source(trace)
    if not bool((source.expert_bytes > 0).all()):
        raise MoeprofError(
            "memory_bytes needs every layer's expert size, and the trace does not record them "
            "(set them when importing or recording)"
        )
    if memory_bytes <= 0:
        raise MoeprofError(f"memory_bytes must be positive, got {memory_bytes}")
    columns, keep = select_phase_rows(source.columns(), phase)
    widest = widest_working_sets(source, batch_sizes, policy, keep, columns)
    sizes = [int(b) for b in source.expert_bytes]
    working = sum(int(w) * b for w, b in zip(widest.tolist(), sizes))
    per_expert = sum(sizes)
    if memory_bytes < working:
        from moeprof.formatting import human_bytes

        raise MoeprofError(
            f"{human_bytes(memory_bytes)} cannot hold one batch's working set: the widest batch "
            f"needs {human_bytes(working)} ({working:,} bytes) of experts across the "
            f"{source.n_layers} MoE layers before any expert is cached"
        )
    # Beyond every expert of the widest layer more room retains nothing more.
    fits = (int(memory_bytes) - working) // per_expert
    return MemoryFit(
        memory_bytes=int(memory_bytes),
        cache_experts=min(fits, int(source.n_experts.max())),
        all_experts_fit=fits >= int(source.n_experts.max()),
        working_set_bytes=working,
        bytes_per_cached_expert=per_expert,
        widest=tuple(int(w) for w in widest),
    )


# ---------------------------------------------------------------------- simulation


@dataclass(frozen=True)
class _Plan:
    """One batch size's sequences, built once and shared by every strategy and capacity."""

    seqs: tuple[AccessSequence, ...]  # one per layer, or one global pool
    layer_of_item: tuple[np.ndarray, ...]  # per sequence: the MoE layer of each item
    popularity: tuple[np.ndarray, ...]  # per sequence: static's profile per block


def _counts(
    load: np.ndarray,
    seq: AccessSequence,
    layer_of_item: np.ndarray | None,
    n_layers: int,
    access: bool,
) -> np.ndarray:
    """Loads per layer (int64 [L]) from one sequence's load flags; `layer_of_item` None: the
    sequence is one layer's (no per-item array needed)."""
    if layer_of_item is None:
        loaded = int(seq.requests[load].sum()) if access else int(np.count_nonzero(load))
        return np.array([loaded], dtype=np.int64)
    weights = seq.requests[load] if access else None
    return np.bincount(layer_of_item[load], weights=weights, minlength=n_layers).astype(np.int64)


def _simulate_one(
    strategy: RetainingStrategy,
    capacity: int,
    warm: bool,
    n_layers: int,
    access: bool,
    job: tuple[AccessSequence, np.ndarray | None, np.ndarray],
) -> np.ndarray:
    """Loads per layer of one sequence (a layer, or the global pool) under one strategy."""
    seq, layer_of_item, popularity = job
    kept = strategy.retention(seq, capacity, warm=warm, popularity=popularity)
    return _counts(kept.load, seq, layer_of_item, n_layers, access)


@dataclass(frozen=True)
class _Counts:
    """One batch size's counts that every row of it shares."""

    batch_size: int
    policy: str
    n_batches: int
    tokens: int
    requests: np.ndarray  # int64 [L]
    unique: np.ndarray  # int64 [L]
    naive: np.ndarray  # int64 [L]: the naive reference's loads
    dedup: np.ndarray  # int64 [L]: the dedup reference's loads
    lookups: np.ndarray  # int64 [L]: the hit rate's denominator
    budget: str
    capacity_unit: str
    ebytes: tuple[int, ...]
    bytes_known: bool
    model_layers: tuple[int, ...]
    spellings: Mapping[int, str]
    link_gbps: float | None

    def row(self, name: str, cap: int, per_layer: np.ndarray, gap: float | None) -> CacheRow:
        n_layers = len(self.ebytes)
        loads = int(per_layer.sum())
        # Python ints: byte products cannot overflow.
        bytes_loaded = (
            sum(int(n) * b for n, b in zip(per_layer.tolist(), self.ebytes))
            if self.bytes_known
            else None
        )
        per_token = None if bytes_loaded is None else bytes_loaded / self.tokens
        link_s = None
        if self.link_gbps is not None and per_token is not None:
            link_s = per_token / (float(self.link_gbps) * 1e9)
        return CacheRow(
            strategy=name,
            batch_size=self.batch_size,
            policy=self.policy,
            cache_experts=cap,
            cache_spelling=self.spellings.get(cap, str(cap)),
            budget=self.budget,
            pool=_pool(cap, self.budget, self.capacity_unit, n_layers, self.ebytes),
            n_batches=self.n_batches,
            tokens=self.tokens,
            requests=int(self.requests.sum()),
            unique=int(self.unique.sum()),
            loads=loads,
            bytes_loaded=bytes_loaded,
            # naive looks up every request whatever the counting.
            hit_rate=1.0
            - _ratio(loads, int((self.requests if name == "naive" else self.lookups).sum())),
            bytes_per_token=per_token,
            savings_vs_naive=1.0 - _ratio(loads, int(self.naive.sum())),
            savings_vs_dedup=1.0 - _ratio(loads, int(self.dedup.sum())),
            gap_captured=gap,
            link_seconds_per_token=link_s,
            link_tokens_per_second=(1.0 / link_s) if link_s else None,
            layers=tuple(
                CacheLayer(
                    layer=i,
                    model_layer=self.model_layers[i],
                    requests=int(self.requests[i]),
                    unique=int(self.unique[i]),
                    loads=int(per_layer[i]),
                )
                for i in range(n_layers)
            ),
        )


@dataclass(frozen=True)
class CacheSettings:
    """:func:`simulate_cache`'s arguments, checked (:func:`check_cache_settings`)."""

    chosen: tuple[str, ...]  # the strategies asked for, in run order
    simulated: tuple[str, ...]  # the caching strategies run: those asked for and the gap's two
    caps: tuple[int, ...]  # C, sorted and distinct
    sizes: tuple[int, ...]
    policy: str
    budget: str
    count: str
    warm: bool
    phase: str
    capacity_unit: str
    spellings: dict[int, str]
    link_gbps: float | None
    popularity_from: Trace | None

    def profile(self) -> list[np.ndarray] | None:
        """static's profile per layer from ``popularity_from`` (None: from the trace itself)."""
        return None if self.popularity_from is None else requests_per_expert(self.popularity_from)


def check_cache_settings(
    source: TraceSource,
    strategies: Sequence[str],
    capacities: Sequence[int],
    batch_sizes: Sequence[int],
    policy: str,
    *,
    budget: str,
    count: str,
    warm: bool,
    phase: str,
    popularity_from: Trace | None,
    capacity_unit: str,
    capacity_spellings: Mapping[int, str] | None,
    link_gbps: float | None,
) -> CacheSettings:
    """Every argument of :func:`simulate_cache` checked against `source` (one MoeprofError for
    the first wrong one); reads no expert ids."""
    get_policy(policy)
    sizes = check_batch_sizes(batch_sizes)
    budget = _choice(budget, BUDGETS, "budget")
    count = _choice(count, COUNTS, "count")
    capacity_unit = _choice(capacity_unit, CAPACITY_UNITS, "capacity_unit")
    chosen = cache_strategies(strategies)
    if isinstance(capacities, (str, bytes)):
        raise MoeprofError(f"capacities must be whole numbers, not the text {capacities!r}")
    caps = sorted({check_cache_experts(c) for c in capacities})
    if not caps:
        raise MoeprofError("no capacities given")
    if link_gbps is not None and not (isinstance(link_gbps, (int, float)) and link_gbps > 0):
        raise MoeprofError(f"link_gbps must be a positive number, got {link_gbps!r}")
    if source.n_tokens == 0:
        raise MoeprofError("the trace is empty (no tokens)")
    bytes_known = bool((source.expert_bytes > 0).all())
    if budget == "global" and capacity_unit == "bytes" and not bytes_known:
        raise MoeprofError("capacity_unit 'bytes' needs every layer's expert size")
    if popularity_from is not None:
        _check_profile(source.columns(), popularity_from)
    simulated = tuple(
        n for n in REGISTRY if REGISTRY[n].uses_cache and (n in chosen or n in (GAP_FROM, GAP_TO))
    )
    return CacheSettings(
        chosen=tuple(chosen),
        simulated=simulated,
        caps=tuple(caps),
        sizes=tuple(sizes),
        policy=policy,
        budget=budget,
        count=count,
        warm=bool(warm),
        phase=phase,
        capacity_unit=capacity_unit,
        spellings={int(k): str(v) for k, v in (capacity_spellings or {}).items()},
        link_gbps=link_gbps,
        popularity_from=popularity_from,
    )


def simulate_cache(
    trace: Trace | TraceSource,
    strategies: Sequence[str] = DEFAULT_CACHE_STRATEGIES,
    capacities: Sequence[int] = (0, 1, 2, 4),
    batch_sizes: Sequence[int] = (1, 8),
    policy: str = "decode",
    *,
    budget: str = "per-layer",
    count: str = "batch",
    warm: bool = False,
    phase: str = "all",
    popularity_from: Trace | None = None,
    capacity_unit: str = "experts",
    capacity_spellings: Mapping[int, str] | None = None,
    link_gbps: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    stream: bool = False,
) -> CacheResult:
    """Loads of each strategy x capacity x batch size on `trace` (docs/cache.md).

    ``capacities``: C, experts each layer retains between batches. With ``budget="global"`` one
    pool of (layer, expert) blocks serves every layer with the same memory: C*L blocks
    (``capacity_unit="experts"``) or C*sum(expert bytes) bytes (``"bytes"``, blocks weighing their
    layer's expert size; then Belady is a heuristic where layers' sizes differ).
    ``capacity_spellings`` names how each C was asked for (the results say it).
    ``link_gbps`` adds a projection of each row's link time per token. ``on_progress(done,
    total)`` is called after each simulation.

    `trace` may be shards (:mod:`moeprof.shards`). ``stream=True`` with the per-layer budget reads
    one layer's expert ids at a time (memory: one layer and the plans, docs/scale.md); the
    results are identical. A global pool spans every layer, so it is simulated in memory.
    """
    source = as_source(trace)
    settings = check_cache_settings(
        source,
        strategies,
        capacities,
        batch_sizes,
        policy,
        budget=budget,
        count=count,
        warm=warm,
        phase=phase,
        popularity_from=popularity_from,
        capacity_unit=capacity_unit,
        capacity_spellings=capacity_spellings,
        link_gbps=link_gbps,
    )
    if stream and settings.budget == "per-layer":
        return _streamed(source, settings, on_progress)
    sub = select_phase(source.to_trace(), phase)
    profile = settings.profile() or requests_per_expert(sub)
    counted = _in_memory_counts(
        sub,
        get_policy(policy),
        list(settings.sizes),
        settings.simulated,
        settings.caps,
        settings.warm,
        settings.count,
        settings.budget,
        settings.capacity_unit,
        profile,
        on_progress,
    )
    return _result(source, settings, counted, sub.n_tokens)


def _streamed(
    source: TraceSource,
    settings: CacheSettings,
    on_progress: Callable[[int, int], None] | None,
) -> CacheResult:
    """The per-layer budget one layer at a time, in this process: each layer's ids are read once
    and serve every batch size, strategy and capacity (layers are independent under this
    budget)."""
    columns, keep, plans = layer_plans(
        source.columns(), settings.policy, settings.sizes, settings.phase
    )
    profile = settings.profile()
    n_layers = source.n_layers
    total = n_layers * len(plans) * len(settings.simulated) * len(settings.caps)
    per_layer: list[LayerCounts] = []
    for layer in range(n_layers):
        ids = source.layer_ids(layer)
        per_layer.append(
            count_layer(
                layer,
                ids if keep is None else ids[keep],
                columns,
                plans,
                settings.simulated,
                settings.caps,
                warm=settings.warm,
                count=settings.count,
                popularity=None if profile is None else profile[layer],
            )
        )
        del ids
        if on_progress is not None:
            on_progress(total * (layer + 1) // n_layers, total)
    return layers_result(source, settings, columns, plans, per_layer)


def layer_plans(
    columns: Trace, policy: str, sizes: Sequence[int], phase: str
) -> tuple[Trace, np.ndarray | None, list[BatchPlan]]:
    """What every layer of the per-layer budget shares: the per-token columns of the simulated
    rows, those rows (None: all) and each batch size's plan of them."""
    selected, keep = select_phase_rows(columns, phase)
    return selected, keep, get_policy(policy).plans(selected, list(sizes))


@dataclass(frozen=True)
class LayerCounts:
    """One MoE layer's counts under the per-layer budget, per plan (what a layer task returns;
    picklable)."""

    layer: int
    requests: np.ndarray  # int64 [n_plans]
    unique: np.ndarray  # int64 [n_plans]
    naive: np.ndarray  # int64 [n_plans]
    dedup: np.ndarray  # int64 [n_plans]
    working_sets: tuple[WorkingSet, ...]  # one per plan
    loads: dict[str, dict[int, np.ndarray]]  # strategy -> C -> int64 [n_plans]


def count_layer(
    layer: int,
    ids: np.ndarray,
    columns: Trace,
    plans: Sequence[BatchPlan],
    simulated: Sequence[str],
    caps: Sequence[int],
    *,
    warm: bool,
    count: str,
    popularity: np.ndarray | None,
) -> LayerCounts:
    """Every batch size, strategy and capacity of one layer under the per-layer budget, from
    that layer's expert ids [T, K] of the simulated rows (`columns`' rows). ``popularity``:
    static's profile of this layer (None: the layer's own requests)."""
    n_plans = len(plans)
    one = layer_trace(columns, ids, layer)
    problem = out_of_range_id(one.expert_ids, one.n_experts)
    if problem:
        raise MoeprofError(problem)
    n_exp = int(columns.n_experts[layer])
    if popularity is None:
        popularity = expert_requests(one, 0)
    requests = np.zeros(n_plans, dtype=np.int64)
    unique, naive, dedup = np.zeros_like(requests), np.zeros_like(requests), np.zeros_like(requests)
    working: list[WorkingSet] = []
    loads = {name: {cap: np.zeros(n_plans, dtype=np.int64) for cap in caps} for name in simulated}

    def run(job: tuple[str, int, AccessSequence, None, np.ndarray]) -> int:
        name, cap, seq, item_layer, popularity = job
        strategy = REGISTRY[name]
        assert isinstance(strategy, RetainingStrategy)
        counted = _simulate_one(
            strategy, cap, warm, 1, count == "access", (seq, item_layer, popularity)
        )
        return int(counted[0])

    # One plan at a time: a plan's sequence (one item per distinct expert per batch, up to T·k
    # at batch size 1) is freed before the next plan's is built.
    for p, plan in enumerate(plans):
        d = distinct_per_batch(one, plan, 0)
        r, u, nv, dd = _reference_counts([d], warm)
        requests[p], unique[p], naive[p], dedup[p] = r[0], u[0], nv[0], dd[0]
        (ws,) = _working_sets([d], plan.batch_size, [int(columns.moe_layer_indices[layer])])
        working.append(replace(ws, layer=layer))
        seq = layer_sequence(d, n_exp)
        del d
        jobs = [(name, cap, seq, None, popularity) for name in simulated for cap in caps]
        for job, counted in zip(jobs, map_threads(run, jobs)):  # simulations side by side
            loads[job[0]][job[1]][p] = counted
        del seq, jobs
    del one
    return LayerCounts(layer, requests, unique, naive, dedup, tuple(working), loads)


def layers_result(
    source: TraceSource,
    settings: CacheSettings,
    columns: Trace,
    plans: Sequence[BatchPlan],
    per_layer: Sequence[LayerCounts],
) -> CacheResult:
    """The :class:`CacheResult` from every layer's counts (in any order), as
    :func:`simulate_cache` returns it."""
    by_layer = sorted(per_layer, key=lambda c: c.layer)
    if [c.layer for c in by_layer] != list(range(source.n_layers)):
        raise MoeprofError(f"counts of layers {[c.layer for c in by_layer]} for {source.n_layers}")

    def stacked(field: str, p: int) -> np.ndarray:
        return np.array([int(getattr(c, field)[p]) for c in by_layer], dtype=np.int64)

    counted = [
        _PlanCounts(
            plan.batch_size,
            plan.policy,
            plan.n_batches,
            int(plan.batch_tokens.sum()),
            stacked("requests", p),
            stacked("unique", p),
            stacked("naive", p),
            stacked("dedup", p),
            [c.working_sets[p] for c in by_layer],
            {
                name: {
                    cap: np.array([int(c.loads[name][cap][p]) for c in by_layer], dtype=np.int64)
                    for cap in settings.caps
                }
                for name in settings.simulated
            },
        )
        for p, plan in enumerate(plans)
    ]
    return _result(source, settings, counted, columns.n_tokens)


def _result(
    source: TraceSource,
    settings: CacheSettings,
    counted: Sequence[_PlanCounts],
    tokens_simulated: int,
) -> CacheResult:
    expert_bytes = source.expert_bytes
    bytes_known = bool((expert_bytes > 0).all())
    ebytes = [int(b) for b in expert_bytes]
    weights_differ = len(set(ebytes)) > 1
    budget, capacity_unit, count = settings.budget, settings.capacity_unit, settings.count
    chosen, simulated, caps = settings.chosen, settings.simulated, settings.caps
    spellings, link_gbps, popularity_from = (
        settings.spellings,
        settings.link_gbps,
        settings.popularity_from,
    )
    model_layers = source.columns().moe_layer_indices
    rows: list[CacheRow] = []
    working_sets: list[WorkingSet] = []
    gaps: list[GapRow] = []
    for plan_counts in counted:
        working_sets += plan_counts.working_sets
        ctx = _Counts(
            batch_size=plan_counts.batch_size,
            policy=plan_counts.policy,
            n_batches=plan_counts.n_batches,
            tokens=plan_counts.tokens,
            requests=plan_counts.requests,
            unique=plan_counts.unique,
            naive=plan_counts.naive,
            dedup=plan_counts.dedup,
            lookups=plan_counts.requests if count == "access" else plan_counts.unique,
            budget=budget,
            capacity_unit=capacity_unit,
            ebytes=tuple(ebytes),
            bytes_known=bytes_known,
            model_layers=tuple(model_layers),
            spellings=spellings,
            link_gbps=link_gbps,
        )
        rows += _plan_rows(ctx, plan_counts.loads_of, chosen, simulated, caps, gaps)

    result_settings = {
        "strategies": list(chosen),
        "capacities": [{"cache_experts": c, "spelling": spellings.get(c, str(c))} for c in caps],
        "batch_sizes": list(settings.sizes),
        "policy": settings.policy,
        "budget": budget,
        "capacity_unit": capacity_unit,
        "count": count,
        "lookups": "requests" if count == "access" else "unique",
        "warm": settings.warm,
        "phase": settings.phase,
        "tokens_simulated": tokens_simulated,
        "popularity_from": None
        if popularity_from is None
        else str((popularity_from.meta.get("model") or {}).get("id") or "another trace"),
        "belady_is_bound": not (budget == "global" and capacity_unit == "bytes" and weights_differ),
        "link_gbps": None if link_gbps is None else float(link_gbps),
    }
    return CacheResult(
        trace=source_summary(source),
        settings=result_settings,
        rows=tuple(rows),
        working_sets=tuple(working_sets),
        gaps=tuple(gaps),
    )


@dataclass
class _PlanCounts:
    """One batch size's counts, however they were gathered (all layers at once, or one by one)."""

    batch_size: int
    policy: str
    n_batches: int
    tokens: int
    requests: np.ndarray  # int64 [L]
    unique: np.ndarray  # int64 [L]
    naive: np.ndarray  # int64 [L]
    dedup: np.ndarray  # int64 [L]
    working_sets: list[WorkingSet]
    loads_of: dict[str, dict[int, np.ndarray]]  # strategy -> C -> loads per layer


def _plan_rows(
    ctx: _Counts,
    loads_of: dict[str, dict[int, np.ndarray]],
    chosen: Sequence[str],
    simulated: Sequence[str],
    caps: Sequence[int],
    gaps: list[GapRow],
) -> list[CacheRow]:
    """One batch size's rows (references, then each C's strategies); its gap rows go to `gaps`."""
    rows: list[CacheRow] = []
    row = ctx.row
    for name in REFERENCES:
        if name in chosen:
            rows.append(row(name, 0, ctx.naive if name == "naive" else ctx.dedup, None))
    have_gap = GAP_FROM in loads_of and GAP_TO in loads_of
    for cap in caps:
        lru = int(loads_of[GAP_FROM][cap].sum()) if have_gap else 0
        bel = int(loads_of[GAP_TO][cap].sum()) if have_gap else 0
        captured: dict[str, float | None] = {}
        for name in simulated:
            if name not in chosen:
                continue
            loads = int(loads_of[name][cap].sum())
            share = (lru - loads) / (lru - bel) if have_gap and lru != bel else None
            captured[name] = share
            rows.append(row(name, cap, loads_of[name][cap], share))
        if have_gap:
            total_lookups = int(ctx.lookups.sum())
            lru_hit = 1.0 - _ratio(lru, total_lookups)
            bel_hit = 1.0 - _ratio(bel, total_lookups)
            gaps.append(
                GapRow(
                    batch_size=ctx.batch_size,
                    cache_experts=cap,
                    lru_loads=lru,
                    belady_loads=bel,
                    lru_hit_rate=lru_hit,
                    belady_hit_rate=bel_hit,
                    gap_loads=lru - bel,
                    gap_points=100.0 * (bel_hit - lru_hit),
                    captured=captured,
                )
            )
    return rows


def _reference_counts(
    distinct: Sequence[Distinct], warm: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """requests, unique, naive and dedup loads per layer of the layers in `distinct`."""
    requests = np.array([int(d.tokens.sum()) for d in distinct], dtype=np.int64)
    unique = np.array([d.expert.shape[0] for d in distinct], dtype=np.int64)
    if not warm:  # references: no cache, every load counts
        return requests, unique, requests.copy(), unique.copy()
    # Warm: the device starts with what first uses need.
    first = [_first_use(d) for d in distinct]
    dedup = unique - np.array([int(f.sum()) for f in first], dtype=np.int64)
    naive = requests - np.array(
        [int(d.tokens[f].sum()) for d, f in zip(distinct, first)], dtype=np.int64
    )
    return requests, unique, naive, dedup


def _in_memory_counts(
    sub: Trace,
    batching: Any,
    sizes: list[int],
    simulated: Sequence[str],
    caps: Sequence[int],
    warm: bool,
    count: str,
    budget: str,
    capacity_unit: str,
    profile: Sequence[np.ndarray],
    on_progress: Callable[[int, int], None] | None,
) -> list[_PlanCounts]:
    """Every layer's sequences of one batch size at once, layers simulated side by side."""
    n_layers = sub.n_layers
    ebytes = [int(b) for b in sub.expert_bytes]
    model_layers = sub.moe_layer_indices
    total = len(sizes) * len(simulated) * len(caps)
    done = 0
    out: list[_PlanCounts] = []
    for plan in batching.plans(sub, sizes):
        distinct = [distinct_per_batch(sub, plan, layer) for layer in range(n_layers)]
        requests, unique, naive, dedup = _reference_counts(distinct, warm)
        working = _working_sets(distinct, plan.batch_size, model_layers)
        built = _build(distinct, sub, budget, capacity_unit, profile)
        loads_of: dict[str, dict[int, np.ndarray]] = {}
        for name in simulated:
            strategy = REGISTRY[name]
            assert isinstance(strategy, RetainingStrategy)
            loads_of[name] = {}
            for cap in caps:
                per_layer = np.zeros(n_layers, dtype=np.int64)
                pool = _pool(cap, budget, capacity_unit, n_layers, ebytes)
                run = functools.partial(
                    _simulate_one, strategy, pool, warm, n_layers, count == "access"
                )
                jobs = zip(built.seqs, built.layer_of_item, built.popularity)
                for counted in map_threads(run, jobs):  # layers side by side on the cores
                    per_layer += counted
                loads_of[name][cap] = per_layer
                done += 1
                if on_progress is not None:
                    on_progress(done, total)
        out.append(
            _PlanCounts(
                plan.batch_size,
                plan.policy,
                plan.n_batches,
                int(plan.batch_tokens.sum()),
                requests,
                unique,
                naive,
                dedup,
                working,
                loads_of,
            )
        )
        del distinct, built  # one batch size's sequences at a time
    return out


def layer_trace(columns: Trace, ids: np.ndarray, layer: int) -> Trace:
    """One layer of a trace as a one-layer Trace (ids [T, K]; the columns' rows)."""
    return Trace(
        expert_ids=ids[:, None, :],
        request_ids=columns.request_ids,
        positions=columns.positions,
        steps=columns.steps,
        phase=columns.phase,
        n_experts=columns.n_experts[layer : layer + 1],
        expert_bytes=columns.expert_bytes[layer : layer + 1],
        meta={},
    )


def _pool(cap: int, budget: str, unit: str, n_layers: int, ebytes: Sequence[int]) -> int:
    """What a rule may retain for C: C per layer, or the global pool of the same memory."""
    if budget == "per-layer":
        return cap
    return cap * sum(ebytes) if unit == "bytes" else cap * n_layers


def _first_use(d: Distinct) -> np.ndarray:
    """bool per item: the first batch that uses its expert at this layer."""
    # Items run in batch order, so an expert's first item is its first batch's.
    first = np.zeros(d.expert.shape[0], dtype=bool)
    first[np.unique(d.expert, return_index=True)[1]] = True
    return first


def _working_sets(
    distinct: Sequence[Distinct], batch_size: int, model_layers: Sequence[int]
) -> list[WorkingSet]:
    out = []
    for layer, d in enumerate(distinct):
        widths = np.diff(d.ptr)
        out.append(
            WorkingSet(
                batch_size=batch_size,
                layer=layer,
                model_layer=int(model_layers[layer]),
                n_batches=int(widths.shape[0]),
                mean=float(widths.mean()) if widths.size else 0.0,
                p95=_percentile_nearest_rank(widths, WORKING_SET_PERCENTILE),
                max=int(widths.max(initial=0)),
            )
        )
    return out


def _build(
    distinct: Sequence[Distinct],
    trace: Trace,
    budget: str,
    unit: str,
    profile: Sequence[np.ndarray],
) -> _Plan:
    n_experts = [int(x) for x in trace.n_experts]
    if budget == "per-layer":
        seqs = tuple(layer_sequence(d, e) for d, e in zip(distinct, n_experts))
        layer_of = tuple(
            np.full(d.expert.shape[0], layer, dtype=np.int64) for layer, d in enumerate(distinct)
        )
        return _Plan(seqs, layer_of, tuple(profile))
    weights = [int(b) for b in trace.expert_bytes] if unit == "bytes" else None
    seq = global_sequence(distinct, n_experts, weights)
    offsets = np.cumsum(n_experts)
    layer_of_block = np.searchsorted(offsets, np.arange(seq.n_blocks), side="right")
    return _Plan((seq,), (layer_of_block[seq.block],), (np.concatenate(profile),))

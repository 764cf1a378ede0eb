"""What each strategy loads, batch by batch and layer by layer: pure numpy, no device.

A schedule lists, per replayed MoE layer, the *items* of every batch in issue order: an item is
one expert the batch uses at that layer, read from a device slot, copied host->device first when
``copy`` is set, and (with ``--compute``) run on ``tokens`` tokens. Batches come from
:func:`moeprof.policies.plan_batches`, the code `analyze` counts with.

- ``naive``: one item per (token, expert) request, in row order, each a copy into a small ring of
  slots shared by all layers.
- ``dedup``: one item per distinct expert of the batch (ascending id), each a copy; slot = rank
  in the batch, slots shared by all layers.
- ``lru``: dedup's items, but each layer keeps the ``C`` most recently used experts on the
  device across batches: a hit is not copied. Recency inside a batch follows each expert's last
  request (row order, then top-k slot); eviction happens when the batch is done, so a batch's
  experts never evict one another. Each layer owns ``C + max distinct per batch`` slots.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moeprof.errors import MoeprofError
from moeprof.policies import BatchPlan
from moeprof.trace import Trace

STRATEGIES = ("naive", "dedup", "lru")
NAIVE_RING_SLOTS = 4  # naive copies cycle through this many slots (copy ahead of compute)


def check_strategies(strategies: str | Sequence[str]) -> tuple[str, ...]:
    items = (
        [s.strip() for s in strategies.split(",")]
        if isinstance(strategies, str)
        else list(strategies)
    )
    items = [s for s in items if s]
    if not items:
        raise MoeprofError("no strategies given; choose from " + ", ".join(STRATEGIES))
    for s in items:
        if s not in STRATEGIES:
            raise MoeprofError(f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
    # Run in a fixed order (naive first, the baseline the others are compared with).
    return tuple(s for s in STRATEGIES if s in items)


def truncate_plan(plan: BatchPlan, max_batches: int | None) -> BatchPlan:
    """The first `max_batches` batches of `plan` (all when None)."""
    if max_batches is None or max_batches >= plan.n_batches:
        return plan
    if max_batches < 1:
        raise MoeprofError(f"--max-batches must be at least 1, got {max_batches}")
    starts = plan.starts[: max_batches + 1]
    return BatchPlan(plan.policy, plan.batch_size, plan.order[: int(starts[-1])], starts)


@dataclass(frozen=True)
class LayerSchedule:
    """One strategy at one MoE layer; batch b's items are ``[ptr[b], ptr[b + 1])``."""

    layer: int  # MoE layer index in the trace
    ptr: np.ndarray  # int64 [n_batches + 1]
    expert: np.ndarray  # int64 [n_items]
    slot: np.ndarray  # int64 [n_items]: slot index within this layer's slot space
    copy: np.ndarray  # bool [n_items]
    tokens: np.ndarray  # int64 [n_items]: tokens routed to the expert in this batch
    n_slots: int  # slots this layer needs (in its own space, or in the shared one)

    @property
    def copies(self) -> int:
        return int(np.count_nonzero(self.copy))


@dataclass(frozen=True)
class Schedule:
    strategy: str
    plan: BatchPlan
    layers: tuple[LayerSchedule, ...]
    shared_slots: bool  # True: all layers use one slot space of max(n_slots); False: one each
    cache_experts: int = 0

    @property
    def n_batches(self) -> int:
        return self.plan.n_batches

    @property
    def copies(self) -> int:
        return sum(ls.copies for ls in self.layers)

    def total_slots(self) -> int:
        sizes = [ls.n_slots for ls in self.layers]
        if not sizes:
            return 0
        return max(sizes) if self.shared_slots else sum(sizes)

    def slot_bases(self) -> list[int]:
        """First global slot of each layer's slot space."""
        if self.shared_slots:
            return [0] * len(self.layers)
        return [
            int(x)
            for x in np.concatenate(([0], np.cumsum([ls.n_slots for ls in self.layers])))[:-1]
        ]


def _requests(trace: Trace, plan: BatchPlan, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(batch, expert) of every (token, expert) request at `layer`, in issue order (the plan's
    row order, then top-k slot), sentinels dropped."""
    rows = plan.order[: int(plan.starts[-1])]
    ids = np.asarray(trace.expert_ids[rows, layer, :], dtype=np.int64).reshape(-1)
    batch = np.repeat(np.arange(plan.n_batches, dtype=np.int64), plan.batch_tokens * trace.top_k)
    valid = ids != int(trace.n_experts[layer])
    return batch[valid], ids[valid]


def _ptr(batch_of_item: np.ndarray, n_batches: int) -> np.ndarray:
    return np.searchsorted(batch_of_item, np.arange(n_batches + 1)).astype(np.int64)


@dataclass(frozen=True)
class Distinct:
    """Distinct experts per batch at one layer, sorted by (batch, expert)."""

    ptr: np.ndarray
    expert: np.ndarray
    tokens: np.ndarray  # requests of that expert in the batch
    last_use: np.ndarray  # issue position of its last request (recency inside the batch)


def distinct_per_batch(trace: Trace, plan: BatchPlan, layer: int) -> Distinct:
    batch, expert = _requests(trace, plan, layer)
    n_exp = int(trace.n_experts[layer])
    keys = batch * n_exp + expert
    uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    last = np.full(uniq.shape[0], -1, dtype=np.int64)
    np.maximum.at(last, inverse, np.arange(keys.shape[0], dtype=np.int64))
    return Distinct(
        ptr=_ptr(uniq // n_exp, plan.n_batches),
        expert=uniq % n_exp,
        tokens=counts.astype(np.int64),
        last_use=last,
    )


def naive_layer(trace: Trace, plan: BatchPlan, layer: int) -> LayerSchedule:
    batch, expert = _requests(trace, plan, layer)
    n = expert.shape[0]
    return LayerSchedule(
        layer=layer,
        ptr=_ptr(batch, plan.n_batches),
        expert=expert,
        slot=np.arange(n, dtype=np.int64) % NAIVE_RING_SLOTS,
        copy=np.ones(n, dtype=bool),
        tokens=np.ones(n, dtype=np.int64),
        n_slots=min(NAIVE_RING_SLOTS, max(n, 1)),
    )


def dedup_layer(distinct: Distinct, layer: int) -> LayerSchedule:
    n = distinct.expert.shape[0]
    batch = np.repeat(np.arange(distinct.ptr.shape[0] - 1), np.diff(distinct.ptr))
    rank = np.arange(n, dtype=np.int64) - distinct.ptr[batch]
    return LayerSchedule(
        layer=layer,
        ptr=distinct.ptr,
        expert=distinct.expert,
        slot=rank,
        copy=np.ones(n, dtype=bool),
        tokens=distinct.tokens,
        n_slots=max(int(np.diff(distinct.ptr).max(initial=0)), 1),
    )


def lru_layer(distinct: Distinct, layer: int, cache_experts: int) -> LayerSchedule:
    """Simulate the per-layer LRU cache over the batches; one pass, per batch (not per token)."""
    ptr = distinct.ptr
    n_batches = ptr.shape[0] - 1
    n = distinct.expert.shape[0]
    width = max(int(np.diff(ptr).max(initial=0)), 1)
    n_slots = cache_experts + width  # cache survivors + the batch's own misses never overflow
    slot = np.empty(n, dtype=np.int64)
    copy = np.empty(n, dtype=bool)
    cache: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recent first
    free = list(range(n_slots - 1, -1, -1))
    experts = distinct.expert.tolist()
    last_use = distinct.last_use
    for b in range(n_batches):
        lo, hi = int(ptr[b]), int(ptr[b + 1])
        if lo == hi:
            continue
        for i in (lo + np.argsort(last_use[lo:hi], kind="stable")).tolist():
            e = experts[i]
            s = cache.get(e)
            if s is None:
                s = free.pop()
                cache[e] = s
                copy[i] = True
            else:
                cache.move_to_end(e)
                copy[i] = False
            slot[i] = s
        while len(cache) > cache_experts:
            free.append(cache.popitem(last=False)[1])
    # Issue hits before misses inside a batch so compute can start while misses are copied.
    batch = np.repeat(np.arange(n_batches), np.diff(ptr))
    order = np.lexsort((distinct.expert, copy, batch))
    return LayerSchedule(
        layer=layer,
        ptr=ptr,
        expert=distinct.expert[order],
        slot=slot[order],
        copy=copy[order],
        tokens=distinct.tokens[order],
        n_slots=n_slots,
    )


def build_schedule(
    trace: Trace,
    plan: BatchPlan,
    strategy: str,
    layers: list[int],
    cache_experts: int = 0,
) -> Schedule:
    if strategy == "naive":
        per_layer = tuple(naive_layer(trace, plan, layer) for layer in layers)
        return Schedule(strategy, plan, per_layer, shared_slots=True)
    distinct = [distinct_per_batch(trace, plan, layer) for layer in layers]
    if strategy == "dedup":
        per_layer = tuple(dedup_layer(d, layer) for d, layer in zip(distinct, layers))
        return Schedule(strategy, plan, per_layer, shared_slots=True)
    if strategy == "lru":
        if cache_experts < 0:
            raise MoeprofError(f"--cache-experts must be 0 or more, got {cache_experts}")
        per_layer = tuple(lru_layer(d, layer, cache_experts) for d, layer in zip(distinct, layers))
        return Schedule(strategy, plan, per_layer, shared_slots=False, cache_experts=cache_experts)
    raise MoeprofError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")


def slots_needed(
    strategy: str, unique_per_batch: np.ndarray, cache_experts: int, n_requests: np.ndarray
) -> list[int]:
    """Slots per replayed layer, from counted unique [n_batches, L] and requests [L], without
    building the schedule (for the up-front memory check). Matches build_schedule's n_slots."""
    width = np.maximum(unique_per_batch.max(axis=0, initial=0), 1).astype(np.int64)
    if strategy == "naive":
        return [min(NAIVE_RING_SLOTS, max(int(r), 1)) for r in n_requests]
    if strategy == "dedup":
        return [int(w) for w in width]
    return [int(w) + cache_experts for w in width]

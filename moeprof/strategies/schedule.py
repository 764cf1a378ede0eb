"""What a strategy loads, batch by batch and layer by layer: pure numpy, no device.

A schedule lists, per replayed MoE layer, the *items* of every batch in issue order: an item is
one expert the batch uses at that layer, read from a device slot, copied host->device first when
``copy`` is set, and (when replay computes) run on ``tokens`` tokens. Batches come from a
:class:`moeprof.batching.BatchPlan`, the plans `analyze` counts with (docs/replay.md, "What is
replayed").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeprof.batching import BatchPlan
from moeprof.trace import Trace


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
        return total_slots([ls.n_slots for ls in self.layers], self.shared_slots)

    def slot_bases(self) -> list[int]:
        """First global slot of each layer's slot space."""
        if self.shared_slots:
            return [0] * len(self.layers)
        return [
            int(x)
            for x in np.concatenate(([0], np.cumsum([ls.n_slots for ls in self.layers])))[:-1]
        ]


def total_slots(per_layer: list[int], shared: bool) -> int:
    """Device slots for layers needing `per_layer` slots: the largest when the layers share one
    slot space, else their sum."""
    if not per_layer:
        return 0
    return max(per_layer) if shared else sum(per_layer)


def requests_in_order(trace: Trace, plan: BatchPlan, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(batch, expert) of every (token, expert) request at `layer`, in issue order (the plan's
    row order, then top-k slot), sentinels dropped."""
    rows = plan.order[: plan.n_rows]
    ids = np.asarray(trace.expert_ids[rows, layer, :], dtype=np.int64).reshape(-1)
    batch = np.repeat(np.arange(plan.n_batches, dtype=np.int64), plan.batch_tokens * trace.top_k)
    valid = ids != int(trace.n_experts[layer])
    return batch[valid], ids[valid]


def expert_requests(trace: Trace, layer: int) -> np.ndarray:
    """Requests of each expert at `layer` over the whole trace, int64 [n_experts] (sentinel
    slots dropped): the popularity `static` keeps by."""
    n_experts = int(trace.n_experts[layer])
    ids = np.asarray(trace.expert_ids[:, layer, :]).reshape(-1)
    return np.bincount(ids, minlength=n_experts + 1)[:n_experts].astype(np.int64)


def batch_ptr(batch_of_item: np.ndarray, n_batches: int) -> np.ndarray:
    """Item offsets of each batch, int64 [n_batches + 1], from items sorted by batch."""
    return np.searchsorted(batch_of_item, np.arange(n_batches + 1)).astype(np.int64)


@dataclass(frozen=True)
class Distinct:
    """Distinct experts per batch at one layer, sorted by (batch, expert)."""

    ptr: np.ndarray
    expert: np.ndarray
    tokens: np.ndarray  # requests of that expert in the batch
    last_use: np.ndarray  # issue position of its last request (recency inside the batch)

    @property
    def widest(self) -> int:
        """Most distinct experts in one batch (at least 1: a slot space is never empty)."""
        return max(int(np.diff(self.ptr).max(initial=0)), 1)


# Largest packed (batch, expert, position) number distinct_per_batch sorts in place.
_PACKED_LIMIT = 2**62


def distinct_per_batch(trace: Trace, plan: BatchPlan, layer: int) -> Distinct:
    """Distinct experts of each batch at `layer`, with their request counts and the issue
    position (among the layer's routed requests, in the plan's order) of their last request.

    Each request becomes one int64, (batch · E + expert) · n + its issue position, sorted in
    place: groups of equal (batch, expert) come out together, their last member holding the
    last request. At batch size 1 a layer of a long trace has as many distinct items as
    requests, so memory matters: one array of the layer's requests is sorted where it lies (no
    argsort, no inverse index, no scatter). Where the packed number could pass 2^63, a stable
    argsort of the (batch, expert) keys does the same.
    """
    rows = plan.order[: plan.n_rows]
    ids = np.asarray(trace.expert_ids[rows, layer, :])
    n_exp = int(trace.n_experts[layer])
    batch_of_row = np.repeat(np.arange(plan.n_batches, dtype=np.int64), plan.batch_tokens)
    keys = (batch_of_row[:, None] * n_exp + ids).reshape(-1)  # issue order: row, then slot
    del batch_of_row
    valid = (ids != n_exp).reshape(-1)
    if not valid.all():
        keys = keys[valid]
    del ids, valid
    n = keys.shape[0]
    if max(plan.n_batches, 1) * n_exp * max(n, 1) < _PACKED_LIMIT:
        keys *= n
        keys += np.arange(n, dtype=np.int64)
        keys.sort()
        position = keys % max(n, 1)
        keys //= max(n, 1)
    else:
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        position = order
        del order
    new = np.ones(n, dtype=bool)
    np.not_equal(keys[1:], keys[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    del new
    uniq = keys[starts]
    del keys
    # A group's last member holds its last request. Arrays are freed as soon as they are used.
    last = np.empty_like(starts)
    last[:-1] = starts[1:]
    if n:
        last[-1] = n
    tokens = last - starts
    del starts
    last -= 1
    last_use = position[last]
    del position, last
    expert = uniq % n_exp
    np.floor_divide(uniq, n_exp, out=uniq)  # now each item's batch
    ptr = batch_ptr(uniq, plan.n_batches)
    del uniq
    return Distinct(ptr=ptr, expert=expert, tokens=tokens, last_use=last_use)

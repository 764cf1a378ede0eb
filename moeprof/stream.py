"""Streaming analysis: a trace read in chunks of rows, memory bounded by the chunk, not the trace
(docs/scale.md, "Streaming analysis"). Arrays in, dataclasses out: no printing, no files.

The engine is a map and a reduce over contiguous row ranges, so that a range can be a chunk of one
file or a whole shard on another machine:

- :func:`map_range` counts rows [start, stop) given their expert ids and, per plan, each row's
  batch (:class:`PlanIndex`): the chunk's token bitsets are built once and shared by every plan.
  Batches whose rows all lie in the range are counted (popcount of their OR) and dropped; the
  others stay *open*, as their OR so far (a set of experts per layer, not a count).
- :func:`merge` joins the partials of two consecutive ranges: open batches of both are OR-ed,
  and those now complete are counted. It is associative, so ranges may be merged in any grouping.
- :func:`finish` turns the partial of the whole trace into the :class:`AnalysisResult` that
  :func:`moeprof.analyze.analyze` gives in memory, field for field.

Integer counts (requests, distinct experts) add exactly whatever the grouping. The uniform
expectation with empty slots is a float: it is kept as integer histograms per (batch, layer)
(:func:`moeprof.analyze.uniform_from_histograms`) and computed once, in :func:`finish`, as the
in-memory path computes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from moeprof.analyze import (
    AnalysisResult,
    analysis_notes,
    analyze,
    batch_of_row,
    histogram_rows,
    masks_from_ids,
    merge_counts,
    popcount,
    routed_slots,
    short_cell_keys,
    summarize,
    trace_summary,
    uniform_from_histograms,
    uniform_unique_per_layer,
    unique_rows,
)
from moeprof.batching import BatchPlan, check_batch_sizes, get_policy
from moeprof.errors import MoeprofError, is_whole_number
from moeprof.trace import Trace, out_of_range_id

_WORD = 64
# The default rule (docs/scale.md, "What fits where"): the whole trace's bitsets in memory up to
# this size, else chunks holding about CHUNK_BITSET_BYTES of bitsets.
IN_MEMORY_BITSET_BYTES = 256 << 20
CHUNK_BITSET_BYTES = 64 << 20


class TraceSource(Protocol):
    """What streaming reads: :class:`moeprof.shards.Shards`, or :class:`InMemory` for a Trace."""

    n_experts: np.ndarray
    expert_bytes: np.ndarray

    @property
    def n_tokens(self) -> int: ...

    @property
    def n_layers(self) -> int: ...

    @property
    def top_k(self) -> int: ...

    def columns(self) -> Trace: ...

    def read_ids(self, start: int, stop: int) -> np.ndarray: ...

    def layer_ids(self, layer: int) -> np.ndarray: ...

    def to_trace(self) -> Trace: ...


class InMemory:
    """A loaded :class:`Trace` read as a :class:`TraceSource` (chunks are copies of its rows)."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.n_experts = trace.n_experts
        self.expert_bytes = trace.expert_bytes

    @property
    def n_tokens(self) -> int:
        return self.trace.n_tokens

    @property
    def n_layers(self) -> int:
        return self.trace.n_layers

    @property
    def top_k(self) -> int:
        return self.trace.top_k

    def columns(self) -> Trace:
        return self.trace

    def read_ids(self, start: int, stop: int) -> np.ndarray:
        out = np.array(self.trace.expert_ids[start:stop])
        self.trace.release()
        return out

    def layer_ids(self, layer: int) -> np.ndarray:
        return self.trace.layer_column(layer)

    def to_trace(self) -> Trace:
        return self.trace


def as_source(trace: Trace | TraceSource) -> TraceSource:
    return InMemory(trace) if isinstance(trace, Trace) else trace


def source_summary(source: TraceSource) -> dict[str, Any]:
    """:func:`moeprof.analyze.trace_summary` of the logical trace, without reading its ids."""
    if isinstance(source, InMemory):
        return trace_summary(source.trace)
    columns = source.columns()
    doc = trace_summary(columns)
    traces = getattr(source, "traces", None)
    if traces is not None:  # shards: gate weights count when every shard has them
        doc["has_gate_weights"] = all(t.gate_weights is not None for t in traces)
    return doc


def check_chunk_tokens(chunk_tokens: Any) -> int:
    whole = is_whole_number(chunk_tokens)
    if not whole or int(chunk_tokens) < 0:
        raise MoeprofError(
            f"chunk_tokens must be a whole number of tokens, 0 (in memory) or more, "
            f"got {chunk_tokens!r}"
        )
    return int(chunk_tokens)


def bitset_bytes_per_token(n_layers: int, n_experts: np.ndarray) -> int:
    return n_layers * ((int(n_experts.max()) + _WORD - 1) // _WORD) * 8


def default_chunk_tokens(n_tokens: int, n_layers: int, n_experts: np.ndarray) -> int:
    """0 (the whole trace in memory) when its bitsets take at most 256 MiB, else the tokens whose
    bitsets take about 64 MiB."""
    per_token = bitset_bytes_per_token(n_layers, n_experts)
    if n_tokens * per_token <= IN_MEMORY_BITSET_BYTES:
        return 0
    return max(1, CHUNK_BITSET_BYTES // per_token)


def streams(source: TraceSource) -> bool:
    """False when counting uses sorted (batch, expert) pairs instead of bitsets (huge expert
    counts): that path stays in memory."""
    n_words = (int(source.n_experts.max()) + _WORD - 1) // _WORD
    from moeprof.analyze import _BITSET_WORDS_PER_SLOT

    return n_words <= _BITSET_WORDS_PER_SLOT * source.top_k


# ---------------------------------------------------------------------- plans


@dataclass(frozen=True)
class PlanIndex:
    """One plan as streaming reads it: each row's batch and each batch's first and last row.

    An index may be a *window* of the whole plan's (:meth:`window`): the batch of rows
    [row_offset, row_offset + len(batch_of_row)) and the batches [batch_offset, batch_offset +
    len(first_row)) those rows belong to, so that a task mapping one shard receives what its rows
    need, not the whole trace's index. Lookups take the trace's row and batch numbers."""

    batch_of_row: np.ndarray  # int64: the batch of each row from row_offset on
    first_row: np.ndarray  # int64: per batch from batch_offset on; -1 for an empty batch
    last_row: np.ndarray  # int64: per batch from batch_offset on; -1 for an empty batch
    batch_tokens: np.ndarray  # int64: per batch from batch_offset on
    row_offset: int = 0
    batch_offset: int = 0

    def batches_of(self, start: int, stop: int) -> np.ndarray:
        """The batch of each row in [start, stop) (a view)."""
        lo, hi = start - self.row_offset, stop - self.row_offset
        if lo < 0 or hi > self.batch_of_row.shape[0] or lo > hi:
            end = self.row_offset + self.batch_of_row.shape[0]
            raise MoeprofError(
                f"rows {start}..{stop} are outside the plan index's {self.row_offset}..{end}"
            )
        return self.batch_of_row[lo:hi]

    def complete(self, ids: np.ndarray, start: int, stop: int) -> np.ndarray:
        """bool per batch of `ids`: all its rows lie in [start, stop)."""
        local = ids - self.batch_offset
        return (self.first_row[local] >= start) & (self.last_row[local] < stop)

    def window(self, start: int, stop: int) -> PlanIndex:
        """The index of rows [start, stop) only: their batches and the span of batch ids they
        belong to (views, no copy; what a task for those rows needs)."""
        bid = self.batches_of(start, stop)
        lo = int(bid.min()) if bid.size else self.batch_offset
        hi = int(bid.max()) + 1 if bid.size else lo
        a, b = lo - self.batch_offset, hi - self.batch_offset
        return PlanIndex(
            bid,
            self.first_row[a:b],
            self.last_row[a:b],
            self.batch_tokens[a:b],
            row_offset=start,
            batch_offset=lo,
        )


def plan_index(plan: BatchPlan, n_tokens: int) -> PlanIndex:
    if plan.n_rows != n_tokens:
        raise MoeprofError(f"a plan covers {plan.n_rows:,} of the {n_tokens:,} rows")
    sizes = plan.batch_tokens
    first = np.full(plan.n_batches, -1, dtype=np.int64)
    last = np.full(plan.n_batches, -1, dtype=np.int64)
    filled = sizes > 0
    if filled.any():
        at = plan.starts[:-1][filled]
        first[filled] = np.minimum.reduceat(plan.order, at)
        last[filled] = np.maximum.reduceat(plan.order, at)
    return PlanIndex(batch_of_row(plan, n_tokens), first, last, sizes.astype(np.int64))


def slim_plan(plan: BatchPlan) -> BatchPlan:
    """The plan without its row order (what results need: sizes and batch counts)."""
    return BatchPlan(plan.policy, plan.batch_size, np.zeros(0, dtype=np.int64), plan.starts)


# ---------------------------------------------------------------------- partials


@dataclass(frozen=True)
class PlanPartial:
    """One plan's counts over a row range."""

    unique: np.ndarray  # int64 [L]: distinct experts summed over the batches complete here
    open_ids: np.ndarray  # int64 [n_open], sorted: batches with rows outside the range
    open_bits: np.ndarray  # uint64 [n_open, L, W]: their experts so far
    open_keys: np.ndarray  # int64: short-cell keys of open batches (short_cell_keys)
    open_counts: np.ndarray  # int64
    hist_rows: np.ndarray  # int64 [p, 2 + K]: histograms of complete batches (histogram_rows)
    hist_counts: np.ndarray  # int64 [p]


@dataclass(frozen=True)
class Partial:
    """What :func:`map_range` returns and :func:`merge` joins (picklable)."""

    start: int
    stop: int
    requests: np.ndarray  # int64 [L]: routed (token, expert) pairs
    short: bool  # some token routes fewer than top_k experts in some layer
    plans: tuple[PlanPartial, ...]


def _split_keys(
    keys: np.ndarray,
    counts: np.ndarray,
    done_ids: np.ndarray,
    n_layers: int,
    top_k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Short-cell keys of complete batches (`done_ids`, sorted) vs the rest."""
    batch = keys // (n_layers * top_k)
    done = np.isin(batch, done_ids, assume_unique=False)
    return keys[done], counts[done], keys[~done], counts[~done]


def _close_histograms(
    part_rows: np.ndarray,
    part_counts: np.ndarray,
    keys: np.ndarray,
    counts: np.ndarray,
    index: PlanIndex,
    n_layers: int,
    top_k: int,
) -> tuple[np.ndarray, np.ndarray]:
    # Keys number batches as the trace does; a window's sizes start at its batch_offset.
    local = keys - index.batch_offset * n_layers * top_k
    rows, row_counts = histogram_rows(local, counts, n_layers, top_k, index.batch_tokens)
    if rows.shape[0] == 0:
        return part_rows, part_counts
    if part_rows.shape[0] == 0:
        return rows, row_counts
    return unique_rows(np.concatenate((part_rows, rows)), np.concatenate((part_counts, row_counts)))


def _map_plan(
    masks: np.ndarray,
    slots: np.ndarray | None,
    index: PlanIndex,
    start: int,
    stop: int,
    top_k: int,
) -> PlanPartial:
    n_layers = masks.shape[1]
    bid = index.batches_of(start, stop)
    if bid.size > 1 and bool((bid[1:] < bid[:-1]).any()):
        order = np.argsort(bid, kind="stable")
        sorted_bid, grouped = bid[order], masks[order]
    else:  # rows already grouped by batch (tokens, most serve steps): no gather
        sorted_bid, grouped = bid, masks
    if sorted_bid.size:
        new = np.empty(sorted_bid.shape[0], dtype=bool)
        new[0] = True
        np.not_equal(sorted_bid[1:], sorted_bid[:-1], out=new[1:])
        seg = np.flatnonzero(new)
        ids = sorted_bid[seg].astype(np.int64)
        bits = np.bitwise_or.reduceat(grouped, seg, axis=0)
    else:
        ids = np.zeros(0, dtype=np.int64)
        bits = np.zeros((0, *masks.shape[1:]), dtype=np.uint64)
    done = index.complete(ids, start, stop)
    unique = popcount(bits[done]).sum(axis=(0, 2), dtype=np.int64)
    keys = counts = np.zeros(0, dtype=np.int64)
    rows = np.zeros((0, 2 + top_k), dtype=np.int64)
    row_counts = np.zeros(0, dtype=np.int64)
    if slots is not None:
        keys, counts = short_cell_keys(slots, bid.astype(np.int64), top_k)
        done_keys, done_counts, keys, counts = _split_keys(keys, counts, ids[done], n_layers, top_k)
        rows, row_counts = _close_histograms(
            rows, row_counts, done_keys, done_counts, index, n_layers, top_k
        )
    return PlanPartial(
        unique=unique.reshape(n_layers),
        open_ids=ids[~done],
        open_bits=bits[~done],
        open_keys=keys,
        open_counts=counts,
        hist_rows=rows,
        hist_counts=row_counts,
    )


def map_range(
    start: int,
    stop: int,
    ids: np.ndarray,
    n_experts: np.ndarray,
    indexes: Sequence[PlanIndex],
) -> Partial:
    """Counts of rows [start, stop) of the trace, whose expert ids are `ids` [stop - start, L, K],
    for every plan of `indexes` (the map step; runs anywhere, returns a picklable partial)."""
    if ids.shape[0] != stop - start:
        raise MoeprofError(f"{ids.shape[0]:,} rows of ids for rows {start}..{stop}")
    problem = out_of_range_id(ids, n_experts)
    if problem:
        raise MoeprofError(problem)
    top_k = ids.shape[2]
    masks = masks_from_ids(ids, n_experts)
    slots = routed_slots(ids, n_experts, masks)
    if slots is None:
        requests = np.full(ids.shape[1], ids.shape[0] * top_k, dtype=np.int64)
    else:
        requests = slots.sum(axis=0, dtype=np.int64)
    short = slots is not None and bool((slots < top_k).any())
    plans = tuple(
        _map_plan(masks, slots if short else None, index, start, stop, top_k) for index in indexes
    )
    return Partial(start, stop, requests, short, plans)


def _merge_plan(
    a: PlanPartial, b: PlanPartial, index: PlanIndex, start: int, stop: int, top_k: int
) -> PlanPartial:
    n_layers = a.unique.shape[0]
    ids = np.union1d(a.open_ids, b.open_ids).astype(np.int64)
    if ids.size == a.open_ids.size:
        bits = a.open_bits.copy()
    else:
        bits = np.zeros((ids.shape[0], *a.open_bits.shape[1:]), dtype=np.uint64)
        bits[np.searchsorted(ids, a.open_ids)] = a.open_bits
    if b.open_ids.size:
        bits[np.searchsorted(ids, b.open_ids)] |= b.open_bits
    done = index.complete(ids, start, stop)
    unique = a.unique + b.unique + popcount(bits[done]).sum(axis=(0, 2), dtype=np.int64)
    rows, row_counts = (
        unique_rows(
            np.concatenate((a.hist_rows, b.hist_rows)),
            np.concatenate((a.hist_counts, b.hist_counts)),
        )
        if a.hist_rows.shape[0] and b.hist_rows.shape[0]
        else (
            (a.hist_rows, a.hist_counts) if a.hist_rows.shape[0] else (b.hist_rows, b.hist_counts)
        )
    )
    keys, counts = merge_counts(a.open_keys, a.open_counts, b.open_keys, b.open_counts)
    if keys.size:
        done_keys, done_counts, keys, counts = _split_keys(keys, counts, ids[done], n_layers, top_k)
        rows, row_counts = _close_histograms(
            rows, row_counts, done_keys, done_counts, index, n_layers, top_k
        )
    return PlanPartial(
        unique=unique,
        open_ids=ids[~done],
        open_bits=bits[~done],
        open_keys=keys,
        open_counts=counts,
        hist_rows=rows,
        hist_counts=row_counts,
    )


def merge(a: Partial, b: Partial, indexes: Sequence[PlanIndex], top_k: int) -> Partial:
    """The partial of rows [a.start, b.stop) from those of two consecutive ranges (the reduce
    step; associative)."""
    if a.stop != b.start:
        raise MoeprofError(f"rows {a.start}..{a.stop} and {b.start}..{b.stop} are not consecutive")
    plans = tuple(
        _merge_plan(pa, pb, index, a.start, b.stop, top_k)
        for pa, pb, index in zip(a.plans, b.plans, indexes)
    )
    return Partial(a.start, b.stop, a.requests + b.requests, a.short or b.short, plans)


def finish(
    whole: Partial,
    plans: Sequence[BatchPlan],
    source: TraceSource,
    batching: Any,
    n_requests: int,
) -> AnalysisResult:
    """The :class:`AnalysisResult` of the whole trace from the partial of all its rows."""
    n_tokens = source.n_tokens
    if (whole.start, whole.stop) != (0, n_tokens):
        raise MoeprofError(f"the partial covers rows {whole.start}..{whole.stop} of {n_tokens:,}")
    top_k = source.top_k
    layers = source.columns().moe_layer_indices
    results = []
    for plan, part in zip(plans, whole.plans):
        if part.open_ids.size:
            raise MoeprofError(f"{part.open_ids.size} batches were never completed")
        if whole.short:
            uniform = uniform_from_histograms(
                part.hist_rows, part.hist_counts, plan.batch_tokens, source.n_experts, top_k
            )
        else:
            uniform = uniform_unique_per_layer(plan, source.n_experts, top_k)
        results.append(
            summarize(
                plan,
                whole.requests,
                part.unique,
                source.expert_bytes,
                source.n_experts,
                top_k,
                layers,
                uniform=uniform,
            )
        )
    notes = analysis_notes(batching, plans, n_requests, n_tokens)
    return AnalysisResult(trace=source_summary(source), results=tuple(results), notes=notes)


# ---------------------------------------------------------------------- the driver


def plan_indexes(
    columns: Trace, batching: Any, sizes: Sequence[int]
) -> tuple[list[BatchPlan], list[PlanIndex]]:
    """Each batch size's plan without its row order (what :func:`finish` needs) and its
    :class:`PlanIndex` (what :func:`map_range` and :func:`merge` need), from the per-token
    columns; one plan's row order is held at a time."""
    plans: list[BatchPlan] = []
    indexes: list[PlanIndex] = []
    for size in sizes if batching.takes_batch_size else sizes[:1]:
        plan = batching.plan(columns, size)
        indexes.append(plan_index(plan, columns.n_tokens))
        plans.append(slim_plan(plan))
        del plan
    return plans, indexes


def analyze_stream(
    trace: Trace | TraceSource,
    batch_sizes: Iterable[int] = (1, 2, 4, 8, 16, 32, 64),
    policy: str = "tokens",
    chunk_tokens: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> AnalysisResult:
    """:func:`moeprof.analyze.analyze` of a trace or of shards, read `chunk_tokens` rows at a
    time (None: :func:`default_chunk_tokens`; 0: the whole trace at once, in memory). The
    result equals the in-memory one field for field. ``on_progress(rows done, rows)`` after each
    chunk. Traces whose expert counts need the sorted path (no bitsets) are analysed in memory.
    """
    source = as_source(trace)
    batching = get_policy(policy)
    sizes = check_batch_sizes(batch_sizes)
    n_tokens = source.n_tokens
    if n_tokens == 0:
        raise MoeprofError("the trace is empty (no tokens)")
    chunk = (
        default_chunk_tokens(n_tokens, source.n_layers, source.n_experts)
        if chunk_tokens is None
        else check_chunk_tokens(chunk_tokens)
    )
    if chunk == 0 or not streams(source):
        result = analyze(source.to_trace(), sizes, policy)
        if on_progress is not None:
            on_progress(n_tokens, n_tokens)
        return result
    try:
        return _stream(source, sizes, batching, chunk, on_progress)
    except MemoryError:
        raise MoeprofError(
            f"out of memory streaming {n_tokens:,} tokens in chunks of {chunk:,}; "
            "try a smaller --chunk-tokens or fewer batch sizes at a time"
        ) from None


def _stream(
    source: TraceSource,
    sizes: list[int],
    batching: Any,
    chunk: int,
    on_progress: Callable[[int, int], None] | None,
) -> AnalysisResult:
    n_tokens = source.n_tokens
    columns = source.columns()
    n_requests = columns.n_requests
    plans, indexes = plan_indexes(columns, batching, sizes)
    whole: Partial | None = None
    for start in range(0, n_tokens, chunk):
        stop = min(start + chunk, n_tokens)
        part = map_range(start, stop, source.read_ids(start, stop), source.n_experts, indexes)
        whole = part if whole is None else merge(whole, part, indexes, source.top_k)
        if on_progress is not None:
            on_progress(stop, n_tokens)
    assert whole is not None
    return finish(whole, plans, source, batching, n_requests)

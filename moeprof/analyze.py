"""Exact expert-deduplication analysis: arrays in, dataclasses out (no printing, no files).

For each batch b and MoE layer l, ``requests(b, l)`` counts (token, expert) pairs and
``unique(b, l)`` the distinct experts. Each token's experts in a layer become a bitset (one bit
per expert, 64 experts per uint64 word); a batch's distinct experts are the OR of its tokens'
bitsets (``np.bitwise_or.reduceat``) and their count a popcount. The bitsets are built once per
trace and reused for every batch size and policy, so a batch size costs one pass over
[tokens, layers] words, with no Python loop per batch or per token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from moeprof._version import __version__
from moeprof.batching import BatchPlan, check_batch_sizes, get_policy
from moeprof.errors import MoeprofError
from moeprof.trace import Trace, out_of_range_id

_WORD = 64
# A per-layer lookup table of bitsets holds L·(E+1)·ceil(E/64) words; above this size the bits are
# set in place instead (slower per slot, but memory no longer grows with E²).
_MAX_TABLE_BYTES = 64 << 20
# Bitsets up to this many uint64 words per top-k slot; beyond, distinct experts are counted by
# sorting (65,535 experts would take 1,024 words, 8 KiB, per token and layer).
_BITSET_WORDS_PER_SLOT = 4


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def _ratio(saved: float, total: float) -> float:
    return float(saved) / float(total) if total else 0.0


def check_expert_ids(trace: Trace) -> None:
    """Ids above the layer's expert count are an error (the count itself is the 'no expert' sentinel).

    Loading and from_arrays check this too; arrays can be replaced on a Trace afterwards.
    """
    problem = out_of_range_id(trace.expert_ids, trace.n_experts)
    if problem:
        raise MoeprofError(problem)


def expert_masks(trace: Trace) -> np.ndarray:
    """Bitset of each token's experts per layer: uint64 [T, L, W], W = ceil(max experts / 64).

    The sentinel maps to an empty set, so skipped slots cost nothing.
    """
    check_expert_ids(trace)
    return masks_from_ids(trace.expert_ids, trace.n_experts)


def masks_from_ids(ids: np.ndarray, n_exp: np.ndarray) -> np.ndarray:
    """:func:`expert_masks` of expert ids [T, L, K] already checked (a whole trace or a chunk of
    its rows: streaming builds one chunk's bitsets at a time)."""
    top_k = ids.shape[2]
    e_max = int(n_exp.max())
    n_words = (e_max + _WORD - 1) // _WORD
    n_layers = ids.shape[1]
    if n_layers * (e_max + 1) * n_words * 8 > _MAX_TABLE_BYTES:
        return _masks_direct(ids, n_exp, n_words)
    # Lookup table [L, e_max + 1, W]: bit e of word e // 64; row n_experts[l] (sentinel) stays empty.
    table = np.zeros((n_layers, e_max + 1, n_words), dtype=np.uint64)
    experts = np.arange(e_max)
    bits = np.left_shift(np.uint64(1), (experts % _WORD).astype(np.uint64))
    for layer in range(n_layers):
        e_l = int(n_exp[layer])
        table[layer, experts[:e_l], experts[:e_l] // _WORD] = bits[:e_l]
    uniform = bool((n_exp == n_exp[0]).all())
    if uniform and n_words == 1 and ids.dtype == np.uint8 and ids.flags.c_contiguous:
        return _masks_pairwise(ids, table[0, :, 0])[:, :, None]
    if uniform:
        lut = table[0]  # [e_max + 1, W]
        masks = lut[ids[:, :, 0]]
        for k in range(1, top_k):
            masks |= lut[ids[:, :, k]]
    else:
        flat = table.reshape(n_layers * (e_max + 1), n_words)
        offset = (np.arange(n_layers, dtype=np.int64) * (e_max + 1))[None, :]
        masks = flat[offset + ids[:, :, 0]]
        for k in range(1, top_k):
            masks |= flat[offset + ids[:, :, k]]
    return masks


def _masks_direct(ids: np.ndarray, n_exp: np.ndarray, n_words: int) -> np.ndarray:
    """uint64 [T, L, W] bitsets for more than 64 experts, setting each slot's bit in place.

    A lookup table would hold L·E·W words (O(E²)); scattering costs O(T·L·K) whatever E is. Within
    one slot column every (token, layer) cell is written once, so the in-place OR is exact.
    """
    n_tokens, n_layers, top_k = ids.shape
    masks = np.zeros((n_tokens, n_layers, n_words), dtype=np.uint64)
    sentinel = n_exp.astype(ids.dtype)[None, :]
    token_index = np.arange(n_tokens)[:, None]
    layer_index = np.arange(n_layers)[None, :]
    for k in range(top_k):
        col = ids[:, :, k]
        routed = col != sentinel
        word = np.where(routed, col // _WORD, 0)
        bit = np.left_shift(np.uint64(1), (col % _WORD).astype(np.uint64))
        masks[token_index, layer_index, word] |= np.where(routed, bit, np.uint64(0))
    return masks


def _masks_pairwise(ids: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """uint64 [T, L] bitsets for uint8 ids of <= 64 experts, two slots per table lookup.

    Adjacent uint8 slots read as one little-endian uint16 index a 65,536-entry table holding the
    OR of both slots' bits, which halves the gathers, the dominant cost of building bitsets.
    """
    lut256 = np.zeros(256, dtype=np.uint64)
    lut256[: lut.shape[0]] = lut
    pair_index = np.arange(65536)
    lut_pairs = lut256[pair_index & 0xFF] | lut256[pair_index >> 8]
    top_k = ids.shape[2]
    pairs = ids[:, :, : top_k - top_k % 2].view("<u2")
    if pairs.shape[2]:
        masks = np.take(lut_pairs, pairs[:, :, 0])
        for j in range(1, pairs.shape[2]):
            masks |= np.take(lut_pairs, pairs[:, :, j])
    else:
        masks = np.zeros(ids.shape[:2], dtype=np.uint64)
    if top_k % 2:
        masks |= np.take(lut256, ids[:, :, top_k - 1])
    return masks


_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount(words: np.ndarray) -> np.ndarray:
    """Set bits of each unsigned integer, uint8, same shape. ``np.bitwise_count`` (NumPy 2) when
    there is one; else a byte table, so that older NumPy installs (e.g. a GPU image's) still run."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words)
    return _popcount_bytes(words)


def _popcount_bytes(words: np.ndarray) -> np.ndarray:
    as_bytes = np.ascontiguousarray(words).view(np.uint8).reshape(*words.shape, words.itemsize)
    return _BYTE_BITS[as_bytes].sum(axis=-1, dtype=np.uint8)


def unique_per_batch(masks: np.ndarray, plan: BatchPlan) -> np.ndarray:
    """Distinct experts per batch and layer, int64 [n_batches, L]."""
    if plan.n_batches == 0:
        return np.zeros((0, masks.shape[1]), dtype=np.int64)
    n_rows = plan.n_rows  # a plan may cover only the first batches (replay)
    if plan.equal_contiguous:
        # Consecutive equal batches: OR over a reshaped axis, faster than reduceat.
        b = min(plan.batch_size, max(n_rows, 1))
        n_full = n_rows // b
        full = np.bitwise_or.reduce(
            masks[: n_full * b].reshape(n_full, b, *masks.shape[1:]), axis=1
        )
        merged = (
            full
            if n_full * b == n_rows
            else np.concatenate(
                (full, np.bitwise_or.reduce(masks[n_full * b : n_rows], axis=0, keepdims=True))
            )
        )
    else:
        grouped = masks[:n_rows] if plan.is_identity else masks[plan.order]
        merged = np.bitwise_or.reduceat(grouped, plan.starts[:-1], axis=0)
    return popcount(merged).sum(axis=2, dtype=np.int64)


def sparse_unique_per_layer(trace: Trace, plan: BatchPlan) -> np.ndarray:
    """Σ over batches of distinct experts, int64 [L], without bitsets: per layer, the (batch,
    expert) pairs of every routed slot are sorted and the distinct ones counted.

    Memory is O(T·K) per layer whatever the expert count, where bitsets take ceil(E/64) words
    per token and layer (8 KiB at 65,535 experts).
    """
    ids = trace.expert_ids
    n_layers = ids.shape[1]
    out = np.zeros(n_layers, dtype=np.int64)
    n_rows = plan.n_rows
    if plan.n_batches == 0 or n_rows == 0:
        return out
    rows = plan.order[:n_rows]
    batch_of = np.repeat(np.arange(plan.n_batches, dtype=np.int64), plan.batch_tokens)
    for layer in range(n_layers):
        span = int(trace.n_experts[layer]) + 1  # ids run 0..E, E being the sentinel
        col = ids[rows, layer, :].astype(np.int64)
        keys = batch_of[:, None] * span + col
        routed = keys[col != span - 1]
        out[layer] = np.unique(routed).shape[0]
    return out


def unique_per_layer(masks: np.ndarray, plan: BatchPlan) -> np.ndarray:
    """Σ over batches of distinct experts, int64 [L]."""
    return unique_per_batch(masks, plan).sum(axis=0, dtype=np.int64)


def slots_per_token(trace: Trace, masks: np.ndarray | None = None) -> np.ndarray | None:
    """Experts each token really routes to per layer, uint16 [T, L]; None when every slot counts.

    Sentinel slots ("no expert") are not routed, so a token's k can be below top_k. With the
    token bitsets at hand this is their popcount (a token's experts are distinct).
    """
    return routed_slots(trace.expert_ids, trace.n_experts, masks)


def routed_slots(
    ids: np.ndarray, n_exp: np.ndarray, masks: np.ndarray | None = None
) -> np.ndarray | None:
    """:func:`slots_per_token` of expert ids [T, L, K] (a trace's, or a chunk of its rows)."""
    if ids.size == 0 or int(ids.max()) < int(n_exp.min()):  # no sentinel anywhere
        return None
    if masks is not None:
        return popcount(masks).sum(axis=2, dtype=np.uint16)
    sentinel = n_exp[None, :, None].astype(ids.dtype)
    return (ids != sentinel).sum(axis=2, dtype=np.uint16)


def batch_of_row(plan: BatchPlan, n_tokens: int) -> np.ndarray:
    """The batch of each row, int64 [T] (-1 for rows the plan leaves out)."""
    out = np.full(n_tokens, -1, dtype=np.int64)
    out[plan.order[: plan.n_rows]] = np.repeat(
        np.arange(plan.n_batches, dtype=np.int64), plan.batch_tokens
    )
    return out


# ------------------------------------------------- uniform expectation with empty slots
#
# With sentinels, a batch's chance of missing one expert is a product over its tokens of
# (1 - k_t/E). It depends only on how many of the batch's tokens route to each k, so it is counted
# as a histogram of k per (batch, layer): integer counts, exact in any order. That is what lets a
# streamed trace (chunks, shards) give the same float as the whole trace at once: the float
# arithmetic runs once, at the end, on the same histograms in the same (sorted) order. Only the
# (batch, layer) pairs with a token below top_k are stored; every other pair is all top_k.


def short_cell_keys(
    slots: np.ndarray, batch_of: np.ndarray, top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The (batch, layer, k) of every token-layer cell routing fewer than top_k experts, as
    sorted keys ``(batch * L + layer) * top_k + k`` with their counts (int64 each)."""
    n_layers = slots.shape[1]
    t_idx, l_idx = np.nonzero(slots < top_k)
    keys = (batch_of[t_idx] * n_layers + l_idx) * top_k + slots[t_idx, l_idx]
    uniq, counts = np.unique(keys, return_counts=True)
    return uniq.astype(np.int64), counts.astype(np.int64)


def merge_counts(
    keys_a: np.ndarray, counts_a: np.ndarray, keys_b: np.ndarray, counts_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted key -> count tables added (keys sorted, counts summed)."""
    if keys_a.size == 0:
        return keys_b, counts_b
    if keys_b.size == 0:
        return keys_a, counts_a
    uniq, inverse = np.unique(np.concatenate((keys_a, keys_b)), return_inverse=True)
    summed = np.zeros(uniq.shape[0], dtype=np.int64)
    np.add.at(summed, inverse, np.concatenate((counts_a, counts_b)))
    return uniq, summed


def histogram_rows(
    keys: np.ndarray, counts: np.ndarray, n_layers: int, top_k: int, batch_tokens: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Cell keys of complete batches -> distinct rows ``(layer, batch tokens, n_0..n_{K-1})``
    (int64 [p, 2 + K], sorted) and how many (batch, layer) pairs have each."""
    if keys.size == 0:
        return np.zeros((0, 2 + top_k), dtype=np.int64), np.zeros(0, dtype=np.int64)
    pair, k = keys // top_k, keys % top_k
    uniq_pair, inverse = np.unique(pair, return_inverse=True)
    hist = np.zeros((uniq_pair.shape[0], top_k), dtype=np.int64)
    hist[inverse, k] = counts  # (pair, k) keys are distinct
    rows = np.column_stack((uniq_pair % n_layers, batch_tokens[uniq_pair // n_layers], hist))
    return unique_rows(rows, np.ones(rows.shape[0], dtype=np.int64))


def unique_rows(rows: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows (sorted) with their counts summed."""
    if rows.shape[0] == 0:
        return rows, counts
    uniq, inverse = np.unique(rows, axis=0, return_inverse=True)
    summed = np.zeros(uniq.shape[0], dtype=np.int64)
    np.add.at(summed, inverse.reshape(-1), counts)
    return uniq, summed


def plan_uniform(
    slots: np.ndarray | None,
    plan: BatchPlan,
    n_experts: np.ndarray,
    top_k: int,
    short: bool,
) -> np.ndarray:
    """Expected Σ_b distinct experts per layer under uniform routing, float64 [L], as analyze
    computes it: the closed form per batch size unless `short` (some token of the trace routes
    fewer than top_k), then from per-(batch, layer) histograms of the routed slots `slots`
    [T, L] (:func:`uniform_from_histograms`). A plan may cover only its first rows."""
    if slots is None or not short:
        return uniform_unique_per_layer(plan, n_experts, top_k)
    bid = batch_of_row(plan, slots.shape[0])
    covered = bid >= 0
    if not covered.all():
        slots, bid = slots[covered], bid[covered]
    keys, counts = short_cell_keys(slots, bid, top_k)
    rows, row_counts = histogram_rows(keys, counts, slots.shape[1], top_k, plan.batch_tokens)
    return uniform_from_histograms(rows, row_counts, plan.batch_tokens, n_experts, top_k)


def uniform_from_histograms(
    rows: np.ndarray,
    counts: np.ndarray,
    batch_tokens: np.ndarray,
    n_experts: np.ndarray,
    top_k: int,
) -> np.ndarray:
    """Expected Σ_b distinct experts per layer under uniform routing (float64 [L]) from the
    histograms of the (batch, layer) pairs with short tokens (:func:`histogram_rows`); every
    other pair's tokens all route top_k. Deterministic in the histograms, whatever order or
    chunks they were counted in."""
    n_layers = n_experts.shape[0]
    sizes, per_size = np.unique(batch_tokens, return_counts=True)
    full = np.zeros((n_layers * sizes.shape[0], 2 + top_k), dtype=np.int64)
    full[:, 0] = np.repeat(np.arange(n_layers), sizes.shape[0])
    full[:, 1] = np.tile(sizes, n_layers)
    full_count = np.tile(per_size, n_layers).astype(np.int64)
    if rows.shape[0]:
        # Pairs with short tokens are not all-top_k pairs: take them off their size's count.
        at = rows[:, 0] * sizes.shape[0] + np.searchsorted(sizes, rows[:, 1])
        np.subtract.at(full_count, at, counts)
    all_rows, all_counts = unique_rows(
        np.concatenate((full, rows)), np.concatenate((full_count, counts))
    )
    keep = all_counts > 0
    all_rows, all_counts = all_rows[keep], all_counts[keep]
    layer = all_rows[:, 0]
    e = n_experts.astype(np.float64)[layer]
    hist = all_rows[:, 2:]
    n_top = all_rows[:, 1] - hist.sum(axis=1)
    log_miss = np.zeros(all_rows.shape[0], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        # Σ_k n_k · log(1 − k/E), in a fixed k order; k = E gives −inf (every expert touched).
        for k in range(top_k + 1):
            n_k = hist[:, k] if k < top_k else n_top
            term = n_k * np.log1p(-k / e)
            log_miss += np.where(n_k > 0, term, 0.0)
    per_row = e * -np.expm1(log_miss) * all_counts
    out = np.zeros(n_layers, dtype=np.float64)
    for layer_index in range(n_layers):  # a sequential sum in row order: the same every time
        mine = per_row[layer == layer_index]
        if mine.size:
            out[layer_index] = np.cumsum(mine)[-1]
    return out


def uniform_unique_per_layer(plan: BatchPlan, n_experts: np.ndarray, top_k: int) -> np.ndarray:
    """Expected Σ_b distinct experts per layer if each of a batch's n tokens drew top_k distinct
    experts uniformly: E·(1 − (1 − k/E)^n) per batch, the closed form per batch size. Traces
    where some token routes fewer than top_k use :func:`plan_uniform`'s histograms instead."""
    e = n_experts.astype(np.float64)[None, :]
    if plan.n_batches == 0:
        return np.zeros(n_experts.shape[0], dtype=np.float64)
    sizes, count = np.unique(plan.batch_tokens, return_counts=True)
    k = np.minimum(float(top_k), e)
    per_size = e * (1.0 - np.power(1.0 - k / e, sizes.astype(np.float64)[:, None]))
    return (per_size * count[:, None]).sum(axis=0)


# ---------------------------------------------------------------------- results


@dataclass(frozen=True)
class LayerResult:
    layer: int
    model_layer: int
    requests: int
    unique: int
    memory_savings: float  # also this layer's reuse factor: 1 - unique / requests
    bytes_requested: int
    bytes_unique: int
    uniform_unique: float
    uniform_memory_savings: float


@dataclass(frozen=True)
class BatchSizeResult:
    batch_size: int
    policy: str
    n_batches: int
    tokens: int
    requests: int
    unique: int
    memory_savings: float
    bandwidth_savings: float
    bytes_requested: int
    bytes_unique: int
    bytes_saved: int
    max_reuse_factor: float
    max_reuse_layer: int
    mean_reuse_factor: float
    uniform_unique: float
    uniform_memory_savings: float
    layers: tuple[LayerResult, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = [asdict(layer) for layer in self.layers]
        return out


@dataclass(frozen=True)
class AnalysisResult:
    trace: dict[str, Any]
    results: tuple[BatchSizeResult, ...]
    notes: tuple[str, ...] = ()  # one sentence each, about the results as a whole

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "moeprof_version": __version__,
            "trace": self.trace,
            "results": [r.to_dict() for r in self.results],
        }
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def trace_summary(trace: Trace) -> dict[str, Any]:
    """The trace metadata as the results JSON carries it, plus counts read from the arrays."""
    doc = trace.metadata()
    doc["n_requests"] = trace.n_requests
    doc["has_steps"] = trace.steps is not None
    doc["has_gate_weights"] = trace.gate_weights is not None
    return doc


def summarize(
    plan: BatchPlan,
    requests: np.ndarray,
    unique: np.ndarray,
    expert_bytes: np.ndarray,
    n_experts: np.ndarray,
    top_k: int,
    model_layers: Sequence[int],
    uniform: np.ndarray | None = None,
) -> BatchSizeResult:
    """Totals and per-layer rows for one batching, from per-layer requests and unique counts.

    `uniform` (float64 [L]) is the uniform expectation when the caller has it
    (:func:`plan_uniform`, which counts each token's real number of routed experts); None: the
    closed form, every token routing to top_k.
    """
    if uniform is None:
        uniform = uniform_unique_per_layer(plan, n_experts, top_k)
    # Python ints: byte products cannot overflow, whatever the trace's size.
    req_list, uni_list = [int(x) for x in requests], [int(x) for x in unique]
    sizes = [int(x) for x in expert_bytes]
    bytes_req = [r * b for r, b in zip(req_list, sizes)]
    bytes_uni = [u * b for u, b in zip(uni_list, sizes)]
    layer_savings = [_ratio(r - u, r) for r, u in zip(req_list, uni_list)]
    layers = tuple(
        LayerResult(
            layer=i,
            model_layer=int(model_layers[i]),
            requests=req_list[i],
            unique=uni_list[i],
            memory_savings=layer_savings[i],
            bytes_requested=bytes_req[i],
            bytes_unique=bytes_uni[i],
            uniform_unique=float(uniform[i]),
            uniform_memory_savings=_ratio(req_list[i] - uniform[i], req_list[i]),
        )
        for i in range(len(req_list))
    )
    total_req, total_uni = sum(req_list), sum(uni_list)
    memory = _ratio(total_req - total_uni, total_req)
    # Bandwidth needs every layer's size; with any unknown (0) the byte totals would cover only
    # some layers, so bandwidth savings are taken equal to memory savings and bytes reported as 0.
    sizes_known = bool(sizes) and min(sizes) > 0
    total_bytes_req = sum(bytes_req) if sizes_known else 0
    total_bytes_uni = sum(bytes_uni) if sizes_known else 0
    bandwidth = (
        _ratio(total_bytes_req - total_bytes_uni, total_bytes_req) if total_bytes_req else memory
    )
    # Layers that route no token (every slot a sentinel) have no reuse factor to speak of.
    active = [i for i, r in enumerate(req_list) if r > 0]
    best = max(active, key=layer_savings.__getitem__) if active else 0
    return BatchSizeResult(
        batch_size=plan.batch_size,
        policy=plan.policy,
        n_batches=plan.n_batches,
        tokens=int(plan.batch_tokens.sum()),
        requests=total_req,
        unique=total_uni,
        memory_savings=memory,
        bandwidth_savings=bandwidth,
        bytes_requested=total_bytes_req,
        bytes_unique=total_bytes_uni,
        bytes_saved=total_bytes_req - total_bytes_uni,
        max_reuse_factor=layer_savings[best] if active else 0.0,
        max_reuse_layer=best,
        mean_reuse_factor=(float(np.mean([layer_savings[i] for i in active])) if active else 0.0),
        uniform_unique=float(uniform.sum()),
        uniform_memory_savings=_ratio(total_req - float(uniform.sum()), total_req),
        layers=layers,
    )


def analyze(
    trace: Trace,
    batch_sizes: Iterable[int] = (1, 2, 4, 8, 16, 32, 64),
    policy: str = "tokens",
) -> AnalysisResult:
    """Dedup savings of `trace` for each batch size under `policy` (one row when the policy
    takes no batch size, as 'recorded')."""
    batching = get_policy(policy)
    sizes = check_batch_sizes(batch_sizes)
    if trace.n_tokens == 0:
        raise MoeprofError("the trace is empty (no tokens)")
    try:
        return _analyze(trace, sizes, batching)
    except MemoryError:
        raise MoeprofError(
            f"out of memory analysing {trace.n_tokens:,} tokens x {trace.n_layers} MoE layers "
            f"x top-{trace.top_k} of {int(trace.n_experts.max()):,} experts; free memory or "
            "analyze fewer batch sizes at a time"
        ) from None


def use_bitsets(trace: Trace) -> bool:
    """Bitsets when a token's set of experts is a few words; else sorted (batch, expert) pairs.

    A bitset row takes ceil(E/64) words per token and layer, a sparse row top_k ids: past a few
    words per slot the bitsets cost more memory (and OR work) than sorting costs time.
    """
    n_words = (int(trace.n_experts.max()) + _WORD - 1) // _WORD
    return n_words <= _BITSET_WORDS_PER_SLOT * trace.top_k


def _analyze(trace: Trace, sizes: list[int], batching: Any) -> AnalysisResult:
    masks = expert_masks(trace) if use_bitsets(trace) else None
    slots = slots_per_token(trace, masks)
    if slots is None:  # no empty slot: every token requests top_k experts in every layer
        requests = np.full(trace.n_layers, trace.n_tokens * trace.top_k, dtype=np.int64)
    else:  # sentinels present: requests and the uniform expectation from routed slots
        requests = slots.sum(axis=0, dtype=np.int64)
    # Uniform from per-token k only where some token routes fewer than top_k (else closed form).
    short = slots is not None and bool((slots < trace.top_k).any())
    layers = trace.moe_layer_indices
    plans = list(batching.plans(trace, sizes))
    results = []
    for plan in plans:
        uniform = plan_uniform(slots, plan, trace.n_experts, trace.top_k, short)
        unique = (
            unique_per_layer(masks, plan)
            if masks is not None
            else sparse_unique_per_layer(trace, plan)
        )
        results.append(
            summarize(
                plan,
                requests,
                unique,
                trace.expert_bytes,
                trace.n_experts,
                trace.top_k,
                layers,
                uniform=uniform,
            )
        )
    notes = analysis_notes(batching, plans, trace.n_requests, trace.n_tokens)
    return AnalysisResult(trace=trace_summary(trace), results=tuple(results), notes=notes)


def analysis_notes(
    batching: Any, plans: Sequence[BatchPlan], n_requests: int, n_tokens: int
) -> tuple[str, ...]:
    """Sentences about the results as a whole (batch sizes no batch ever filled)."""
    notes: list[str] = []
    if batching.takes_batch_size:
        short = [p for p in plans if p.n_batches and int(p.batch_tokens.max()) < p.batch_size]
        if short:
            most = max(int(p.batch_tokens.max()) for p in short)
            why = (
                f" (one per request, and the trace has {_count(n_requests, 'request')})"
                if most == n_requests and most < n_tokens
                else ""
            )
            unfilled = ", ".join(str(p.batch_size) for p in short)
            notes.append(
                f"{batching.name} batches hold at most {_count(most, 'token')}{why}: "
                f"batch size{'s' if len(short) > 1 else ''} {unfilled} never filled"
            )
    return tuple(notes)

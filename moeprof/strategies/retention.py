"""Which experts stay on the device between batches: the retention simulation that cache
strategies share, for `moeprof cache` (counts) and `moeprof replay` (copies and slots).

The model (docs/cache.md, "Semantics"): *steps* run in order (a layer's batches, or, for one
global pool, every (batch, layer) in execution order); each step uses a set of distinct *blocks*
(experts, or (layer, expert) pairs in a global pool), all on the device while it runs. Between
steps the device *retains* blocks within a capacity (a count of blocks, or bytes when blocks
weigh their size). A *load* is a block a step uses that was not retained at the boundary before
it. After each step a rule keeps the highest-ranked blocks of (retained ∪ this step's blocks)
that fit:

- ``lru``: the most recent use (a block's last request in issue order);
- ``lfu``: the most steps used in so far, ties to the more recent;
- ``belady``: the soonest next use (ties: lower block id); a block never used again is dropped
  (keeping it saves no load). With unit weights this is optimal: no rule that retains as many
  blocks loads less;
- ``static``: only blocks of a fixed set (by id), each kept once it has been loaded.

Blocks are ranked (no two alike), then taken in rank order while they fit (with unit weights:
the top C).

The sequential simulation has no vectorised form (each boundary depends on the last), so it runs
as one compiled loop (numba) over all steps: one pass, O(C + step width) work per step, no
Python per item. Without numba the same function runs as plain Python (slow, same results).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from moeprof.errors import MoeprofError
from moeprof.strategies.schedule import Distinct

# Rule codes the compiled loop understands (strategy classes name them; docs/cache.md).
RULE_LRU = 0
RULE_LFU = 1
RULE_BELADY = 2
RULE_STATIC = 3
NEVER = np.iinfo(np.int64).max  # "dropped after": the block stayed until the end


@dataclass(frozen=True)
class AccessSequence:
    """Distinct blocks per step, steps in execution order: step s's items are
    ``[ptr[s], ptr[s + 1])``."""

    ptr: np.ndarray  # int64 [n_steps + 1]
    block: np.ndarray  # int64 [n_items]: block id in [0, n_blocks)
    recency: np.ndarray  # int64 [n_items]: issue position of the block's last request; grows
    requests: np.ndarray  # int64 [n_items]: (token, expert) requests of the block in the step
    weight: np.ndarray  # int64 [n_blocks]: what retaining the block costs (1, or its bytes)

    @property
    def n_steps(self) -> int:
        return int(self.ptr.shape[0] - 1)

    @property
    def n_blocks(self) -> int:
        return int(self.weight.shape[0])

    @property
    def step_of_item(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_steps, dtype=np.int64), np.diff(self.ptr))

    def next_use(self) -> np.ndarray:
        """For each item, the next step that uses its block (``n_steps`` if none)."""
        step = self.step_of_item
        order = np.lexsort((step, self.block))
        nxt = np.full(self.block.shape[0], self.n_steps, dtype=np.int64)
        same = self.block[order[1:]] == self.block[order[:-1]]
        nxt[order[:-1][same]] = step[order[1:][same]]
        return nxt


def layer_sequence(distinct: Distinct, n_experts: int) -> AccessSequence:
    """One layer's batches as steps; blocks are its experts, each weighing 1."""
    return AccessSequence(
        ptr=distinct.ptr,
        block=distinct.expert,
        recency=distinct.last_use,
        requests=distinct.tokens,
        weight=np.ones(n_experts, dtype=np.int64),
    )


def global_sequence(
    per_layer: Sequence[Distinct], n_experts: Sequence[int], weights: Sequence[int] | None = None
) -> AccessSequence:
    """Every layer's batches in execution order (batch b: layers 0..L-1, then batch b+1) as the
    steps of one pool; block = (layer, expert), weighing 1 or ``weights[layer]`` (bytes)."""
    n_layers = len(per_layer)
    if n_layers == 0:
        raise MoeprofError("a global pool needs at least one layer")
    n_batches = per_layer[0].ptr.shape[0] - 1
    offsets = np.concatenate(([0], np.cumsum(n_experts))).astype(np.int64)
    blocks, recency, requests, step = [], [], [], []
    for layer, d in enumerate(per_layer):
        batch = np.repeat(np.arange(n_batches, dtype=np.int64), np.diff(d.ptr))
        step.append(batch * n_layers + layer)
        blocks.append(d.expert + offsets[layer])
        recency.append(d.last_use)
        requests.append(d.tokens)
    step_all = np.concatenate(step)
    # Issue order: by step, then by the request position inside the step.
    order = np.lexsort((np.concatenate(recency), step_all))
    step_sorted = step_all[order]
    ptr = np.searchsorted(step_sorted, np.arange(n_batches * n_layers + 1)).astype(np.int64)
    unit = weights is None
    weight = np.repeat(
        np.ones(n_layers, dtype=np.int64) if unit else np.asarray(weights, dtype=np.int64),
        np.asarray(n_experts, dtype=np.int64),
    )
    return AccessSequence(
        ptr=ptr,
        block=np.concatenate(blocks)[order],
        recency=np.arange(order.shape[0], dtype=np.int64),
        requests=np.concatenate(requests)[order],
        weight=weight,
    )


@dataclass(frozen=True)
class Retention:
    """What a retention rule did over a sequence."""

    load: np.ndarray  # bool [n_items]: the block was not retained when its step began
    # int64 [n_items]: the step at whose end the block left the device, for the block's last
    # item before it left; -1 on items whose block was used again while retained; NEVER if it
    # stayed to the end.
    dropped_after: np.ndarray

    @property
    def loads(self) -> int:
        return int(np.count_nonzero(self.load))


def retain_loop(
    ptr: np.ndarray,
    block: np.ndarray,
    recency: np.ndarray,
    nxt: np.ndarray,
    weight: np.ndarray,
    keep_set: np.ndarray,
    rule: int,
    capacity: int,
    warm: bool,
) -> tuple[np.ndarray, np.ndarray]:
    n_items = block.shape[0]
    n_steps = ptr.shape[0] - 1
    n_blocks = weight.shape[0]
    load = np.zeros(n_items, dtype=np.bool_)
    dropped = np.full(n_items, -1, dtype=np.int64)
    cached = np.zeros(n_blocks, dtype=np.bool_)
    seen = np.zeros(n_blocks, dtype=np.bool_)
    last = np.zeros(n_blocks, dtype=np.int64)
    uses = np.zeros(n_blocks, dtype=np.int64)
    next_step = np.zeros(n_blocks, dtype=np.int64)
    last_item = np.zeros(n_blocks, dtype=np.int64)
    cache = np.empty(n_blocks, dtype=np.int64)
    n_cache = 0
    cand = np.empty(n_blocks, dtype=np.int64)
    score = np.empty(n_blocks, dtype=np.int64)
    for s in range(n_steps):
        lo = ptr[s]
        hi = ptr[s + 1]
        m = 0
        for j in range(n_cache):
            cand[m] = cache[j]
            m += 1
        for i in range(lo, hi):
            b = block[i]
            if not cached[b]:
                if seen[b] or not warm:
                    load[i] = True
                cand[m] = b
                m += 1
            seen[b] = True
            last[b] = recency[i]
            uses[b] += 1
            next_step[b] = nxt[i]
            last_item[b] = i
        total = 0
        for j in range(m):
            b = cand[j]
            cached[b] = False
            total += weight[b]
            if rule == RULE_LRU:
                score[j] = last[b]
            elif rule == RULE_LFU:
                score[j] = (uses[b] << 32) + last[b]  # positions stay below 2**32 (checked)
            elif rule == RULE_BELADY:  # soonest next use; ties to the lower id (any is optimal)
                score[j] = -(next_step[b] * n_blocks + b)
            else:  # the fixed set, by id
                score[j] = n_blocks - b if keep_set[b] else -1
        n_cache = 0
        if total <= capacity and (rule == RULE_LRU or rule == RULE_LFU):
            for j in range(m):  # everything fits: no ranking needed
                cache[n_cache] = cand[j]
                n_cache += 1
                cached[cand[j]] = True
        else:
            order = np.argsort(-score[:m])
            used = 0
            for j in range(m):
                b = cand[order[j]]
                if rule == RULE_STATIC and not keep_set[b]:
                    continue
                if rule == RULE_BELADY and next_step[b] >= n_steps:
                    continue
                if used + weight[b] <= capacity:
                    used += weight[b]
                    cache[n_cache] = b
                    n_cache += 1
                    cached[b] = True
        for j in range(m):
            b = cand[j]
            if not cached[b]:
                dropped[last_item[b]] = s
    for j in range(n_cache):
        dropped[last_item[cache[j]]] = NEVER
    return load, dropped


@functools.cache
def compiled_loop() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """:func:`retain_loop` compiled by numba on first use (imported lazily: it costs a few
    hundred ms that commands which never simulate should not pay); the plain function where
    numba is missing (a GPU image, say), with the same results, slower."""
    try:
        from numba import njit
    except ImportError:  # pragma: no cover - exercised where numba is missing
        return retain_loop
    return njit(cache=True, nogil=True)(retain_loop)  # type: ignore[no-any-return]


def retain(
    seq: AccessSequence,
    rule: int,
    capacity: int,
    *,
    warm: bool = False,
    keep_set: np.ndarray | None = None,
) -> Retention:
    """Run `rule` over `seq` retaining up to `capacity` (blocks' weights summed) between steps.

    ``warm``: the device starts holding whatever each block's first use needs, so first uses
    are not loads. ``keep_set`` (bool [n_blocks]): the fixed set of ``static``.
    """
    if capacity < 0:
        raise MoeprofError(f"cache capacity must be 0 or more, got {capacity}")
    if rule == RULE_LFU and seq.recency.size and int(seq.recency.max()) >= 2**32:
        raise MoeprofError("lfu: more than 2**32 requests at one layer are not supported")
    if keep_set is None:
        keep_set = np.zeros(seq.n_blocks, dtype=bool)
    load, dropped = compiled_loop()(
        seq.ptr.astype(np.int64),
        seq.block.astype(np.int64),
        seq.recency.astype(np.int64),
        seq.next_use(),
        seq.weight.astype(np.int64),
        np.asarray(keep_set, dtype=np.bool_),
        int(rule),
        int(capacity),
        bool(warm),
    )
    return Retention(load=load, dropped_after=dropped)

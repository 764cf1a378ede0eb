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
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from moeprof.errors import MoeprofError
from moeprof.strategies.schedule import Distinct

_T = TypeVar("_T")
_R = TypeVar("_R")

# Rule codes the compiled loop understands (strategy classes name them; docs/cache.md).
RULE_LRU = 0
RULE_LFU = 1
RULE_BELADY = 2
RULE_STATIC = 3
NEVER = np.iinfo(np.int64).max  # "dropped after": the block stayed until the end
# Keep or drop at most this many blocks at a boundary: select by passes, not by quickselect.
SELECT_BY_PASSES = 8


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
    # Belady's next use of each item: one backward pass (blocks are distinct within a step).
    nxt = np.empty(n_items if rule == RULE_BELADY else 0, dtype=np.int64)
    if rule == RULE_BELADY:
        upcoming = np.full(n_blocks, n_steps, dtype=np.int64)
        for s in range(n_steps - 1, -1, -1):
            for i in range(ptr[s], ptr[s + 1]):
                nxt[i] = upcoming[block[i]]
                upcoming[block[i]] = s
    if capacity == 0:  # nothing is retained: every item loads and leaves after its step
        seen0 = np.zeros(n_blocks, dtype=np.bool_)
        for s in range(n_steps):
            for i in range(ptr[s], ptr[s + 1]):
                load[i] = seen0[block[i]] or not warm
                seen0[block[i]] = True
                dropped[i] = s
        return load, dropped
    unit = True
    for b in range(n_blocks):
        if weight[b] != 1:
            unit = False
    cached = np.zeros(n_blocks, dtype=np.bool_)
    seen = np.zeros(n_blocks, dtype=np.bool_)
    last = np.zeros(n_blocks, dtype=np.int64)
    uses = np.zeros(n_blocks, dtype=np.int64)
    next_step = np.zeros(n_blocks, dtype=np.int64)
    last_item = np.zeros(n_blocks, dtype=np.int64)
    cache = np.empty(n_blocks, dtype=np.int64)
    n_cache = 0
    cand = np.empty(n_blocks, dtype=np.int64)  # retained ∪ this step's blocks
    pick = np.empty(n_blocks, dtype=np.int64)  # those of them the rule may keep
    score = np.empty(n_blocks, dtype=np.int64)  # their rank: higher is kept first (unique)
    tmp = np.empty(n_blocks, dtype=np.int64)
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
            if rule == RULE_BELADY:
                next_step[b] = nxt[i]
            last_item[b] = i
        n_cache = 0
        n_pick = 0
        total = 0
        room = capacity
        if rule == RULE_LRU and unit:
            # This step's blocks are more recent than any retained one: rank only the group
            # the boundary falls in.
            for j in range(m):
                cached[cand[j]] = False
            width = hi - lo
            if width < capacity:
                for i in range(lo, hi):  # all kept
                    cache[n_cache] = block[i]
                    n_cache += 1
                    cached[block[i]] = True
                room = capacity - width
                for j in range(m):
                    b = cand[j]
                    if last_item[b] < lo:  # retained, not used in this step
                        score[n_pick] = last[b]
                        pick[n_pick] = b
                        n_pick += 1
            else:
                for i in range(lo, hi):
                    score[n_pick] = recency[i]
                    pick[n_pick] = block[i]
                    n_pick += 1
            total = n_pick
        else:
            for j in range(m):
                b = cand[j]
                cached[b] = False
                if rule == RULE_LRU:
                    score[n_pick] = last[b]
                elif rule == RULE_LFU:
                    score[n_pick] = (uses[b] << 32) + last[b]  # positions < 2**32 (checked)
                elif rule == RULE_BELADY:  # soonest next use; ties to the lower id (any is optimal)
                    if next_step[b] >= n_steps:
                        continue  # never used again: keeping it saves nothing
                    score[n_pick] = -(next_step[b] * n_blocks + b)
                else:  # the fixed set, by id
                    if not keep_set[b]:
                        continue
                    score[n_pick] = n_blocks - b
                pick[n_pick] = b
                n_pick += 1
                total += weight[b]
        if total <= room:  # everything the rule may keep fits: no ranking needed
            for j in range(n_pick):
                cache[n_cache] = pick[j]
                n_cache += 1
                cached[pick[j]] = True
        elif unit:
            # The `room`-th highest score, kept with all above it (scores are unique): no sort.
            # Where few are kept or few dropped, passes of a running max/min (predictable
            # branches); otherwise a quickselect. The loop's hot path.
            n_drop = n_pick - room
            if room > 0 and room <= SELECT_BY_PASSES:
                threshold = NEVER
                for _ in range(room):  # the highest score below the last one found
                    best = -NEVER
                    for j in range(n_pick):  # branch-free, so it vectorises
                        v = score[j] if score[j] < threshold else -NEVER
                        best = max(best, v)
                    threshold = best
            elif room > 0 and n_drop <= SELECT_BY_PASSES:
                cut = -NEVER
                for _ in range(n_drop):  # the lowest score above the last one found
                    best = NEVER
                    for j in range(n_pick):
                        v = score[j] if score[j] > cut else NEVER
                        best = min(best, v)
                    cut = best
                threshold = NEVER
                for j in range(n_pick):
                    v = score[j] if score[j] > cut else NEVER
                    threshold = min(threshold, v)
            elif room > 0:
                for j in range(n_pick):
                    tmp[j] = score[j]
                kth = n_drop  # the threshold's place in ascending order
                left = 0
                right = n_pick - 1
                while left < right:
                    a = tmp[left]
                    c = tmp[right]
                    mid = tmp[(left + right) // 2]
                    pivot = max(min(a, mid), min(max(a, mid), c))  # median of three
                    i = left
                    j = right
                    while i <= j:
                        while tmp[i] < pivot:
                            i += 1
                        while tmp[j] > pivot:
                            j -= 1
                        if i <= j:
                            t = tmp[i]
                            tmp[i] = tmp[j]
                            tmp[j] = t
                            i += 1
                            j -= 1
                    if kth <= j:
                        right = j
                    elif kth >= i:
                        left = i
                    else:
                        break
                threshold = tmp[kth]
            if room > 0:
                for j in range(n_pick):
                    if score[j] >= threshold:
                        cache[n_cache] = pick[j]
                        n_cache += 1
                        cached[pick[j]] = True
        else:  # blocks of different weights: take in rank order while they fit
            order = np.argsort(-score[:n_pick])
            used = 0
            for j in range(n_pick):
                b = pick[order[j]]
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
def compiled(loop: Callable[..., Any]) -> Callable[..., Any]:
    """`loop` compiled by numba on first use (imported lazily: it costs a few hundred ms that
    commands which never simulate should not pay); the plain function where numba is missing (a
    GPU image, say), with the same results, slower. Every strategy's loop goes through here."""
    try:
        from numba import njit
    except ImportError:  # pragma: no cover - exercised where numba is missing
        return loop
    return njit(cache=True, nogil=True)(loop)  # type: ignore[no-any-return]


def run_loop(loop: Callable[..., tuple[np.ndarray, np.ndarray]], *args: Any) -> Retention:
    """Run a strategy's loop (compiled where numba is present) into a Retention."""
    load, dropped = compiled(loop)(*args)
    return Retention(load=load, dropped_after=dropped)


def map_threads(fn: Callable[[_T], _R], items: Iterable[_T]) -> list[_R]:
    """`fn` over `items`, results in order, on up to one thread per core: the compiled loops
    release the GIL, so independent sequences (one per layer) simulate side by side with
    results identical to a plain loop."""
    todo = list(items)
    workers = min(len(todo), os.cpu_count() or 1)
    if workers <= 1:
        return [fn(x) for x in todo]
    with ThreadPoolExecutor(max_workers=workers) as threads:
        return list(threads.map(fn, todo))


def check_capacity(capacity: int) -> None:
    if capacity < 0:
        raise MoeprofError(f"cache capacity must be 0 or more, got {capacity}")


def visit_order(seq: AccessSequence) -> np.ndarray:
    """Items in issue order: by step, then by recency (the last request's position); what the
    queue-based rules (s3fifo, arc) insert a step's new blocks in."""
    return np.lexsort((seq.recency, seq.step_of_item)).astype(np.int64)


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
    check_capacity(capacity)
    if rule == RULE_LFU and seq.recency.size and int(seq.recency.max()) >= 2**32:
        raise MoeprofError("lfu: more than 2**32 requests at one layer are not supported")
    if keep_set is None:
        keep_set = np.zeros(seq.n_blocks, dtype=bool)
    return run_loop(
        retain_loop,
        np.asarray(seq.ptr, dtype=np.int64),
        np.asarray(seq.block, dtype=np.int64),
        np.asarray(seq.recency, dtype=np.int64),
        np.asarray(seq.weight, dtype=np.int64),
        np.asarray(keep_set, dtype=np.bool_),
        int(rule),
        int(capacity),
        bool(warm),
    )

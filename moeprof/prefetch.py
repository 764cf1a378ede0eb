"""Prefetch scoring: how well each predictor guesses the experts a (batch, layer) will need
before its router runs, and what that leaves on the critical path next to an expert cache.
Pure analysis: arrays in, dataclasses out (definitions in docs/prefetch.md).

For batch b at MoE layer l, *needed* N(b, l) is the batch's distinct experts (sentinel slots
skipped). A predictor proposes at most ``prefetch_experts`` = m experts P(b, l) from what is known
before the layer's router runs:

- ``prev-token``: the experts each of the batch's requests used at layer l on its previous token
  (the row just before its first row in the batch, when that row ran in an earlier batch); the
  union over the requests, the m most frequent kept (ties: lower id). A request's first token
  predicts nothing.
- ``prev-layer``: the m experts with the highest summed co-activation counts from N(b, l - 1)
  (ties: lower id; a zero sum is no evidence and is never proposed). The count A_l[e', e] is the
  number of training tokens routed to e' at layer l - 1 and to e at layer l. Layer 0 has no
  prediction.
- ``popular``: the fixed m experts of layer l with the most training requests (ties: lower id).

Training data is the ``train`` trace (same layers and expert counts), or, without one, the first
half of the plan's batches; every predictor is then scored on the second half only (the rows say
which batches were scored). ``prev-token`` alone learns nothing and is scored on every batch.

With a cache (a strategy that retains ``cache_experts`` = C experts per layer between batches,
simulated by :meth:`moeprof.strategies.retaining.RetainingStrategy.retention` exactly as
``moeprof cache`` counts it; prefetches do not change what it retains), R(b, l) is the set
retained at the boundary before batch b: the *loads* are N \\ R, the *critical loads* N \\ (R ∪ P)
and the *wasted prefetches* P \\ (N ∪ R), costing the layer's expert bytes each.

Everything is sorted keys ``batch * n_experts + expert`` per layer: set operations are
searchsorted/isin over them, with no Python loop per batch or per token (the loops run over
layers, predictors and caches; the cache simulation itself is the shared compiled loop).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from moeprof.batching import BatchPlan, check_batch_sizes, get_policy
from moeprof.errors import MoeprofError, check_names, is_whole_number
from moeprof.strategies.registry import (
    REGISTRY,
    check_cache_experts,
    check_strategies,
    get_strategy,
)
from moeprof.strategies.retaining import RetainingStrategy
from moeprof.strategies.retention import NEVER, AccessSequence, Retention, layer_sequence
from moeprof.strategies.schedule import distinct_per_batch, expert_requests
from moeprof.trace import Trace

PREDICTORS = ("prev-token", "prev-layer", "popular")
LEARNED = ("prev-layer", "popular")  # predictors that need training data
# Training sources a row can name.
TRAINED_ON_TRAIN = "train trace"
TRAINED_ON_FIRST_HALF = "first half"
TRAINED_ON_NOTHING = "none"
_CHUNK_CELLS = 1 << 22  # cells per dense block (co-activation pairs, batch x expert scores)


# ---------------------------------------------------------------------- results


@dataclass(frozen=True)
class PrefetchCounts:
    """Sums over the scored batches of one layer (``layer`` >= 0) or of all layers (-1)."""

    layer: int
    needed: int  # Σ |N|: distinct experts the batches use
    predicted: int  # Σ |P|
    hits: int  # Σ |P ∩ N|
    loads: int  # Σ |N \ R|: what the cache alone loads on demand (= needed without a cache)
    critical_loads: int  # Σ |N \ (R ∪ P)|: loads still on the critical path
    wasted: int  # Σ |P \ (N ∪ R)|: prefetches copied for nothing
    wasted_bytes: int  # wasted x the layer's expert bytes (0 where sizes are unknown)

    @property
    def recall(self) -> float | None:
        """|P ∩ N| / |N|; None when nothing was needed."""
        return self.hits / self.needed if self.needed else None

    @property
    def precision(self) -> float | None:
        """|P ∩ N| / |P|; None when nothing was predicted."""
        return self.hits / self.predicted if self.predicted else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["recall"] = self.recall
        out["precision"] = self.precision
        return out


@dataclass(frozen=True)
class PrefetchRow:
    """One predictor, batch size and cache: totals and per-layer counts."""

    predictor: str
    batch_size: int
    policy: str
    prefetch_experts: int
    strategy: str | None  # the cache strategy, or None: nothing retained
    cache_experts: int  # C (0 without a cache)
    trained_on: str  # TRAINED_ON_TRAIN, TRAINED_ON_FIRST_HALF or TRAINED_ON_NOTHING
    first_batch: int  # the first scored batch (the second half's first under "first half")
    n_batches: int  # batches scored
    tokens: int  # tokens in the scored batches
    total: PrefetchCounts
    layers: tuple[PrefetchCounts, ...]

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("total", "layers")}
        total = self.total.to_dict()
        del total["layer"]
        out.update(total)
        out["layers"] = [layer.to_dict() for layer in self.layers]
        return out


@dataclass(frozen=True)
class PrefetchResult:
    predictors: tuple[str, ...]
    prefetch_experts: int
    policy: str
    trained_on: str
    rows: tuple[PrefetchRow, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "predictors": list(self.predictors),
            "prefetch_experts": self.prefetch_experts,
            "policy": self.policy,
            "trained_on": self.trained_on,
            "rows": [row.to_dict() for row in self.rows],
        }


# ---------------------------------------------------------------------- checks


def check_predictors(predictors: Sequence[str]) -> tuple[str, ...]:
    """Known, distinct predictor names in PREDICTORS order."""
    return check_names(
        predictors,
        PREDICTORS,
        param="predictors",
        plural="prefetch predictors",
        singular="prefetch predictor",
    )


def check_prefetch_experts(prefetch_experts: Any) -> int:
    whole = is_whole_number(prefetch_experts)
    if not whole or prefetch_experts < 1:
        raise MoeprofError(f"prefetch_experts must be 1 or more, got {prefetch_experts!r}")
    return int(prefetch_experts)


def _check_layout(trace: Trace, other: Trace, name: str) -> None:
    mine, theirs = trace.n_experts.tolist(), other.n_experts.tolist()
    if mine != theirs:
        raise MoeprofError(
            f"{name} trace has another layout: {len(theirs)} MoE layers with experts "
            f"{_brief(theirs)}, this trace has {len(mine)} with {_brief(mine)}"
        )


def _brief(counts: list[int]) -> str:
    if counts and all(c == counts[0] for c in counts):
        return f"{counts[0]} each"
    return str(counts[:8])[:-1] + (", ...]" if len(counts) > 8 else "]")


def _check_caches(
    strategies: Sequence[str], cache_experts: Iterable[int]
) -> list[tuple[RetainingStrategy | None, int]]:
    if isinstance(strategies, str):
        raise MoeprofError(f"strategies must be a list of names, not the text {strategies!r}")
    capacities = sorted({check_cache_experts(c) for c in cache_experts})
    if not any(strategies):
        if capacities:
            raise MoeprofError("cache_experts needs a caching strategy in strategies")
        return [(None, 0)]
    chosen = check_strategies(strategies)  # registry order, as the cache rows
    caching = ", ".join(s.name for s in REGISTRY.values() if s.uses_cache)
    picked: list[RetainingStrategy] = []
    for name in chosen:
        strategy = get_strategy(name)
        if not strategy.uses_cache or not isinstance(strategy, RetainingStrategy):
            raise MoeprofError(
                f"strategy {name!r} keeps no cache between batches; choose from {caching}"
            )
        picked.append(strategy)
    if not capacities:
        raise MoeprofError("strategies need cache_experts: give at least one capacity")
    return [(s, c) for s in picked for c in capacities]


# ---------------------------------------------------------------------- helpers


def _rank_in_group(group: np.ndarray) -> np.ndarray:
    """Position of each item inside its run of equal `group` values (items sorted by group)."""
    n = group.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate(([True], group[1:] != group[:-1]))).astype(np.int64)
    lengths = np.diff(np.append(starts, n))
    return np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)


def _top_by_count(batch: np.ndarray, expert: np.ndarray, count: np.ndarray, m: int) -> np.ndarray:
    """Keep, per batch, the m items with the highest count (ties: lower expert). Returns a bool
    mask over the items (any order in, any order out)."""
    order = np.lexsort((expert, -count, batch))
    keep = np.zeros(batch.shape[0], dtype=bool)
    keep[order[_rank_in_group(batch[order]) < m]] = True
    return keep


def _contains(sorted_keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Membership of `queries` in sorted, distinct `sorted_keys`."""
    if sorted_keys.shape[0] == 0:
        return np.zeros(queries.shape[0], dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, queries), sorted_keys.shape[0] - 1)
    return sorted_keys[at] == queries


@dataclass(frozen=True)
class _Residency:
    """Spans during which a cache retained each block: block ``block[i]`` was retained at the
    boundaries before steps ``first[i]..last[i]``; spans sorted by (block, first)."""

    key: np.ndarray  # block * stride + first
    block: np.ndarray
    last: np.ndarray
    stride: int

    def retained(self, step: np.ndarray, block: np.ndarray) -> np.ndarray:
        """Whether `block` was retained at the boundary before `step` (elementwise)."""
        if self.key.shape[0] == 0:
            return np.zeros(step.shape[0], dtype=bool)
        at = np.searchsorted(self.key, block * self.stride + step, side="right") - 1
        ok = at >= 0
        at = np.maximum(at, 0)
        return ok & (self.block[at] == block) & (self.last[at] >= step)


@dataclass(frozen=True)
class BlockWalk:
    """The items of a sequence sorted by (block, step), shared by every retention run over it."""

    order: np.ndarray  # item indices
    block: np.ndarray  # block of each sorted item
    step: np.ndarray  # step of each sorted item
    first_use: np.ndarray  # bool per sorted item: the block's first
    n_steps: int

    @classmethod
    def of(cls, seq: AccessSequence) -> BlockWalk:
        step = seq.step_of_item
        order = np.lexsort((step, seq.block))
        block = seq.block[order]
        first_use = np.append(True, block[1:] != block[:-1])[: block.shape[0]]
        return cls(order, block, step[order], first_use, seq.n_steps)


def residency(walk: BlockWalk, kept: Retention) -> _Residency:
    """The retained spans a cold-start retention run implies: a block loaded at step s stays
    from boundary s + 1 up to the step after which the rule dropped it (its chain of hits in
    between; ``dropped_after`` marks the chain's last item)."""
    load = kept.load[walk.order]
    if not load[walk.first_use].all():
        raise MoeprofError("residency needs a cold-start retention (every first use a load)")
    chain_start = np.flatnonzero(load)
    chain_end = np.append(chain_start[1:], load.shape[0]) - 1
    dropped = kept.dropped_after[walk.order[chain_end]]
    last = np.where(dropped == NEVER, walk.n_steps, dropped)
    block = walk.block[chain_start]
    stride = walk.n_steps + 2
    key = block * stride + walk.step[chain_start] + 1
    return _Residency(key=key, block=block, last=last, stride=stride)


# ---------------------------------------------------------------------- training


def _popular_sets(ids: np.ndarray, n_experts: np.ndarray, m: int) -> list[np.ndarray]:
    """Per layer, the sorted top-m experts by requests in `ids` [rows, L, K] (ties: lower id;
    only experts requested at least once)."""
    out = []
    for layer, n_exp in enumerate(n_experts.tolist()):
        col = np.asarray(ids[:, layer, :], dtype=np.int64).reshape(-1)
        counts = np.bincount(col, minlength=n_exp + 1)[:n_exp]
        order = np.lexsort((np.arange(n_exp), -counts))[:m]
        out.append(np.sort(order[counts[order] > 0]))
    return out


def _coactivation(ids: np.ndarray, n_experts: np.ndarray, layer: int) -> np.ndarray:
    """A[e', e]: tokens of `ids` [rows, L, K] routed to e' at layer-1 and e at layer. int64."""
    n_prev, n_this = int(n_experts[layer - 1]), int(n_experts[layer])
    top_k = ids.shape[2]
    table = np.zeros(n_prev * n_this, dtype=np.int64)
    step = max(1, _CHUNK_CELLS // max(1, top_k * top_k))
    for lo in range(0, ids.shape[0], step):
        prev = np.asarray(ids[lo : lo + step, layer - 1, :], dtype=np.int64)
        this = np.asarray(ids[lo : lo + step, layer, :], dtype=np.int64)
        keys = prev[:, :, None] * n_this + this[:, None, :]
        valid = (prev[:, :, None] != n_prev) & (this[:, None, :] != n_this)
        table += np.bincount(keys[valid], minlength=n_prev * n_this)
    return table.reshape(n_prev, n_this)


# ---------------------------------------------------------------------- predictors


def _prev_token_rows(trace: Trace, plan: BatchPlan) -> tuple[np.ndarray, np.ndarray]:
    """(batch, previous row) for every request of every batch that has a previous token run in
    an earlier batch: the row just before the request's first row in the batch."""
    rows = plan.order[: plan.n_rows].astype(np.int64)
    batch = np.repeat(np.arange(plan.n_batches, dtype=np.int64), plan.batch_tokens)
    batch_of_row = np.full(trace.n_tokens, plan.n_batches, dtype=np.int64)  # not in the plan
    batch_of_row[rows] = batch
    req = np.asarray(trace.request_ids, dtype=np.int64)
    # A request's rows are contiguous in stored order, so sorted by (batch, row) each
    # (batch, request) is one run and its first item is the request's first row in the batch.
    order = np.lexsort((rows, batch))
    b, r = batch[order], rows[order]
    first = np.concatenate(([True], (b[1:] != b[:-1]) | (req[r[1:]] != req[r[:-1]])))
    b, r = b[first], r[first]
    prev = r - 1
    ok = prev >= 0
    ok[ok] = (req[prev[ok]] == req[r[ok]]) & (batch_of_row[prev[ok]] < b[ok])
    return b[ok], prev[ok]


def _predict_prev_token(
    trace: Trace, layer: int, prev_batch: np.ndarray, prev_row: np.ndarray, m: int
) -> np.ndarray:
    n_exp = int(trace.n_experts[layer])
    ids = np.asarray(trace.expert_ids[prev_row, layer, :], dtype=np.int64)
    batch = np.repeat(prev_batch, ids.shape[1])
    ids = ids.reshape(-1)
    valid = ids != n_exp
    keys, counts = np.unique(batch[valid] * n_exp + ids[valid], return_counts=True)
    keep = _top_by_count(keys // n_exp, keys % n_exp, counts, m)
    return keys[keep]  # still sorted


def _predict_prev_layer(
    prev_keys: np.ndarray, n_prev: int, table: np.ndarray, batches: np.ndarray, m: int
) -> np.ndarray:
    """Sorted keys of the top-m experts by co-activation from each batch's previous-layer
    experts (`prev_keys`, sorted keys batch * n_prev + expert), for the batches in `batches`."""
    n_this = table.shape[1]
    if batches.shape[0] == 0 or prev_keys.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    table_f = table.astype(np.float64)  # counts stay far below 2**53: products are exact
    out = []
    step = max(1, _CHUNK_CELLS // max(n_prev, n_this))
    e_ids = np.arange(n_this, dtype=np.int64)
    for lo in range(0, batches.shape[0], step):
        chunk = batches[lo : lo + step]
        sel = np.isin(prev_keys // n_prev, chunk)
        row = np.searchsorted(chunk, prev_keys[sel] // n_prev)
        indicator = np.zeros((chunk.shape[0], n_prev), dtype=np.float64)
        indicator[row, prev_keys[sel] % n_prev] = 1.0
        score = np.rint(indicator @ table_f).astype(np.int64)
        # One key per (batch, expert), larger = better: score, then the lower id.
        rank_key = score * n_this + (n_this - 1 - e_ids)[None, :]
        if m < n_this:
            top = np.argpartition(-rank_key, m - 1, axis=1)[:, :m]
        else:
            top = np.broadcast_to(e_ids, (chunk.shape[0], n_this))
        picked = np.take_along_axis(score, top, axis=1) > 0
        keys = chunk[:, None] * n_this + top
        out.append(keys[picked])
    return np.sort(np.concatenate(out))


def _predict_popular(popular: np.ndarray, n_exp: int, batches: np.ndarray) -> np.ndarray:
    return (batches[:, None] * n_exp + popular[None, :]).reshape(-1)  # sorted: both sorted


# ---------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class _Prediction:
    """One predictor's proposals at one layer over the scored batches, as sorted keys."""

    keys: np.ndarray  # batch * n_experts + expert
    hit: np.ndarray  # bool per key: needed
    covered: np.ndarray  # bool per needed key: predicted

    @classmethod
    def of(cls, keys: np.ndarray, needed: np.ndarray) -> _Prediction:
        return cls(keys=keys, hit=_contains(needed, keys), covered=_contains(keys, needed))


def _count(
    layer: int,
    pred: _Prediction,
    load: np.ndarray,
    retained_miss: np.ndarray,
    expert_bytes: int,
) -> PrefetchCounts:
    """Counts from a prediction, the cache's load flag per needed key and whether it retained
    each predicted key that was not needed."""
    wasted = int(np.count_nonzero(~retained_miss))
    return PrefetchCounts(
        layer=layer,
        needed=int(pred.covered.shape[0]),
        predicted=int(pred.keys.shape[0]),
        hits=int(np.count_nonzero(pred.hit)),
        loads=int(np.count_nonzero(load)),
        critical_loads=int(np.count_nonzero(load & ~pred.covered)),
        wasted=wasted,
        wasted_bytes=wasted * expert_bytes,
    )


_SUMMED = ("needed", "predicted", "hits", "loads", "critical_loads", "wasted", "wasted_bytes")


def _sum_counts(layers: Sequence[PrefetchCounts]) -> PrefetchCounts:
    return PrefetchCounts(layer=-1, **{f: sum(getattr(c, f) for c in layers) for f in _SUMMED})


def score_plan(
    trace: Trace,
    plan: BatchPlan,
    predictors: Sequence[str],
    prefetch_experts: int,
    *,
    train: Trace | None = None,
    strategies: Sequence[str] = (),
    cache_experts: Iterable[int] = (),
    popularity_from: Trace | None = None,
) -> tuple[PrefetchRow, ...]:
    """Score `predictors` on the batches of `plan`: one row per predictor and cache (predictor
    order, then strategy order, then capacity). Arguments as :func:`score_prefetch`."""
    names = check_predictors(predictors)
    m = check_prefetch_experts(prefetch_experts)
    caches = _check_caches(strategies, cache_experts)
    if train is not None:
        _check_layout(trace, train, "train")
    if popularity_from is not None:
        _check_layout(trace, popularity_from, "popularity_from")
    n_batches = plan.n_batches
    train_ids, trained_on, first_batch = trace.expert_ids[:0], TRAINED_ON_NOTHING, 0
    if train is not None:
        train_ids, trained_on = train.expert_ids, TRAINED_ON_TRAIN
    elif any(p in LEARNED for p in names):
        # Learn on the first half of the batches, score the second half only.
        first_batch = n_batches // 2
        train_ids = trace.expert_ids[plan.order[: int(plan.starts[first_batch])]]
        trained_on = TRAINED_ON_FIRST_HALF
    n_exp_all = trace.n_experts
    popular = _popular_sets(train_ids, n_exp_all, m) if "popular" in names else []
    scored = np.arange(first_batch, n_batches, dtype=np.int64)
    scored = scored[plan.batch_tokens[first_batch:] > 0]  # a batch without tokens runs nothing
    prev_batch, prev_row = (
        _prev_token_rows(trace, plan) if "prev-token" in names else (np.zeros(0, np.int64),) * 2
    )
    profile = popularity_from if popularity_from is not None else trace

    per_layer: dict[tuple[str, int], list[PrefetchCounts]] = {
        (p, i): [] for p in names for i in range(len(caches))
    }
    prev_needed = np.zeros(0, dtype=np.int64)
    for layer in range(trace.n_layers):
        n_exp = int(n_exp_all[layer])
        distinct = distinct_per_batch(trace, plan, layer)
        seq = layer_sequence(distinct, n_exp)
        keys_all = seq.step_of_item * n_exp + distinct.expert  # sorted by (batch, expert)
        in_scope = seq.step_of_item >= first_batch
        needed = keys_all[in_scope]
        predictions: dict[str, _Prediction] = {}
        for name in names:
            if name == "prev-token":
                keys = _predict_prev_token(trace, layer, prev_batch, prev_row, m)
                keys = keys[keys // n_exp >= first_batch]
            elif name == "prev-layer" and layer == 0:
                keys = np.zeros(0, dtype=np.int64)
            elif name == "prev-layer":
                table = _coactivation(train_ids, n_exp_all, layer)
                keys = _predict_prev_layer(prev_needed, int(n_exp_all[layer - 1]), table, scored, m)
            else:
                keys = _predict_popular(popular[layer], n_exp, scored)
            predictions[name] = _Prediction.of(keys, needed)
        popularity = expert_requests(profile, layer)
        walk: BlockWalk | None = None  # shared by the caches' runs
        for index, (strategy, capacity) in enumerate(caches):
            if strategy is None:
                load = np.ones(needed.shape[0], dtype=bool)
                spans = None
            else:
                kept = strategy.retention(seq, capacity, popularity=popularity)
                load = kept.load[in_scope]
                walk = walk or BlockWalk.of(seq)
                spans = residency(walk, kept)
            for name, pred in predictions.items():
                miss = pred.keys[~pred.hit]  # only unneeded proposals can be wasted
                retained_miss = (
                    np.zeros(miss.shape[0], dtype=bool)
                    if spans is None
                    else spans.retained(miss // n_exp, miss % n_exp)
                )
                per_layer[(name, index)].append(
                    _count(layer, pred, load, retained_miss, int(trace.expert_bytes[layer]))
                )
        prev_needed = keys_all
    tokens = int(plan.batch_tokens[first_batch:].sum())
    rows = []
    for name in names:
        for index, (strategy, capacity) in enumerate(caches):
            layers = tuple(per_layer[(name, index)])
            rows.append(
                PrefetchRow(
                    predictor=name,
                    batch_size=plan.batch_size,
                    policy=plan.policy,
                    prefetch_experts=m,
                    strategy=None if strategy is None else strategy.name,
                    cache_experts=capacity,
                    trained_on=trained_on if name in LEARNED else TRAINED_ON_NOTHING,
                    first_batch=first_batch,
                    n_batches=n_batches - first_batch,
                    tokens=tokens,
                    total=_sum_counts(layers),
                    layers=layers,
                )
            )
    return tuple(rows)


def score_prefetch(
    trace: Trace,
    predictors: Sequence[str],
    prefetch_experts: int,
    *,
    batch_sizes: Iterable[int] = (1,),
    policy: str = "decode",
    train: Trace | None = None,
    strategies: Sequence[str] = (),
    cache_experts: Iterable[int] = (),
    popularity_from: Trace | None = None,
) -> PrefetchResult:
    """Recall, precision, critical loads and wasted prefetches of each predictor in
    `predictors` (names from PREDICTORS) proposing at most `prefetch_experts` experts per
    (batch, layer), for each batch size under the batching policy `policy`.

    ``train``: a trace of the same layout to learn prev-layer's co-activations and popular's
    top-m from; without it they learn on each plan's first half of batches and every predictor
    is scored on the second half. ``strategies`` x ``cache_experts``: caches (strategies that
    retain experts between batches, per layer) to score against; none: nothing is retained.
    ``popularity_from``: the profile of the ``static`` strategy (default: the trace itself).
    Rows: batch size, then predictor, then strategy, then capacity.
    """
    names = check_predictors(predictors)
    m = check_prefetch_experts(prefetch_experts)
    batching = get_policy(policy)
    sizes = check_batch_sizes(batch_sizes)
    capacities = tuple(cache_experts)
    _check_caches(strategies, capacities)
    if trace.n_tokens == 0:
        raise MoeprofError("the trace is empty (no tokens)")
    if train is not None and train.n_tokens == 0:
        raise MoeprofError("the train trace is empty (no tokens)")
    rows: list[PrefetchRow] = []
    for plan in batching.plans(trace, sizes):
        rows.extend(
            score_plan(
                trace,
                plan,
                names,
                m,
                train=train,
                strategies=strategies,
                cache_experts=capacities,
                popularity_from=popularity_from,
            )
        )
    learned = [p for p in names if p in LEARNED]
    if not learned:
        trained_on = TRAINED_ON_NOTHING
    else:
        trained_on = TRAINED_ON_TRAIN if train is not None else TRAINED_ON_FIRST_HALF
    return PrefetchResult(
        predictors=names,
        prefetch_experts=m,
        policy=batching.name,
        trained_on=trained_on,
        rows=tuple(rows),
    )

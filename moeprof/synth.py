"""Synthetic routing traces with controlled popularity skew and temporal locality.

The model: each layer has a popularity distribution over its experts (Zipf with exponent
``zipf`` over a random ranking of the experts per layer, or given counts). A token's fresh slots,
in slot order, are a sample *without replacement* from it (successive sampling: each slot draws
in proportion to popularity among the experts the token does not hold yet). With probability
``locality`` a slot instead keeps the expert that the request's previous token ended up with in
that slot, so runs of kept slots repeat one value; fresh slots also avoid the experts the token's
kept slots hold, so a token's experts in a layer stay distinct and a kept slot is never changed.
Locality never crosses requests: each request's first token draws afresh.

How it is drawn (generator version 2, ``source.generator_version`` in the trace): one token
at a time, in a loop compiled by numba (`_fill_tokens`; plain Python, same results, where numba
is missing). Every random number is a counter-based hash (splitmix64) of (seed, decision,
attempt), decision = (token x L + layer) x K + slot, so the trace does not depend on how the work
is chunked.

- Attempt 0: 32 bits decide keep (below locality x 2^32), 32 bits draw an expert from the layer's
  popularity with the alias method (O(1); exact to about 2^-32 of a draw).
- A fresh slot whose draw is held by an earlier slot or a kept later slot draws again (attempts
  1..`_RETRIES`): rejection, so the accepted draw follows popularity among the experts still
  free, exactly. After that it takes the exact conditional draw by inverse CDF over the free
  experts in popularity order, in log space scaled to the most popular free one (a steep Zipf
  exponent cannot underflow).

Version 1 (before) drew a Gumbel key per expert per (token, layer) and resolved locality by
vectorised fixed-point passes: O(E) random numbers per token and layer, about 0.4 M decisions/s
for DeepSeek-V3's shape (256 experts, top-8); the distributions are the same, the traces differ.
Deterministic for a seed.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from moeprof.errors import MoeprofError
from moeprof.trace import MAX_EXPERT_BYTES, Trace

# One Mixtral-8x7B expert in bf16: gate, up and down projections of 4096 x 14336, 2 bytes each.
DEFAULT_EXPERT_BYTES = 3 * 4096 * 14336 * 2
MAX_EXPERTS = 65535  # the trace format's limit (uint16 ids with a sentinel)
# Which sampling algorithm made a trace: version 1 (Gumbel-top-k over every expert) gave other
# traces for the same seed; version 2 is this module. Stored as source.generator_version.
GENERATOR_VERSION = 2
# Size limits, checked before anything is allocated: routing decisions (tokens x layers x top-k;
# 2^32 decisions are 8 GiB of uint16 ids), tokens (int32 request ids and positions), and
# per-layer popularity tables (layers x experts entries, about 20 bytes each).
MAX_DECISIONS = 1 << 32
MAX_TOKENS = (1 << 31) - 1
MAX_TABLE_ENTRIES = 1 << 24
_CHUNK_DECISIONS = 1 << 22  # decisions per compiled call (it needs no working memory)
_RETRIES = 3  # rejection redraws of a colliding slot before the exact conditional draw
_MASK32 = np.uint64(0xFFFFFFFF)
# splitmix64 constants (the counter-based hash that gives each decision its random words).
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_GOLDEN2 = np.uint64(0xD1B54A32D192ED03)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _whole(value: Any, name: str, lo: int, hi: int | None = None, hi_is: str = "") -> int:
    """`value` as an int in lo..hi, or a MoeprofError naming `name` (and what `hi` is)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if not ok or value < lo or (hi is not None and value > hi):
        where = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        if hi_is:
            where += f" ({hi_is})"
        raise MoeprofError(f"{name} must be a whole number {where}, got {value!r}")
    return int(value)


def _real(value: Any, name: str) -> float:
    """`value` as a finite float, or a MoeprofError naming `name`."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not ok or not math.isfinite(float(value)):
        raise MoeprofError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _per_item(value: Any, name: str) -> tuple[list[Any], bool]:
    """One value or a flat sequence of them, as a list (not converted yet), and whether it was
    one value."""
    if isinstance(value, np.ndarray):
        if value.ndim > 1:
            raise MoeprofError(f"{name} must be one number or a flat list of numbers")
        return ([value.item()], True) if value.ndim == 0 else (value.tolist(), False)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return [value], True
    return list(value), False


def _check_popularity(popularity: Any, n_layers: int, n_experts: int, top_k: int) -> np.ndarray:
    """Per-layer expert counts as float64 [L, E], checked."""
    try:
        pop = np.asarray(popularity, dtype=np.float64)
    except (TypeError, ValueError):
        raise MoeprofError(
            "popularity must be a table of numbers: [layers][experts] counts"
        ) from None
    if pop.shape != (n_layers, n_experts):
        raise MoeprofError(
            f"popularity must have shape [layers={n_layers}][experts={n_experts}], got "
            f"{list(pop.shape)}"
        )
    if not np.isfinite(pop).all() or (pop < 0).any() or (pop.sum(axis=1) <= 0).any():
        raise MoeprofError(
            "popularity counts must be finite and non-negative with a positive sum per layer"
        )
    if ((pop > 0).sum(axis=1) < top_k).any():
        raise MoeprofError(
            f"popularity gives some layer fewer than top-k={top_k} experts to choose"
        )
    return pop


def _alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker's alias table of probabilities `p` (Vose's construction): draw a column i
    uniformly, keep i with probability prob[i], else take alias[i]. An entry with p = 0 is never
    drawn: its prob is 0 and its alias has p > 0."""
    n = len(p)
    scaled = (p * n).tolist()
    prob = np.zeros(n)
    alias = np.arange(n)
    small = [i for i, s in enumerate(scaled) if s < 1.0]
    large = [i for i, s in enumerate(scaled) if s >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        prob[s], alias[s] = scaled[s], g
        scaled[g] += scaled[s] - 1.0
        (small if scaled[g] < 1.0 else large).append(g)
    for i in small + large:  # left by rounding: they fill their column alone
        prob[i] = 1.0
    # Rounding never makes a zero-probability entry drawable, itself or as an alias.
    prob[p == 0] = 0.0
    alias[p[alias] == 0] = int(np.argmax(p))
    return prob, alias


class _Sampler:
    """The popularity tables of every layer, as the compiled loop reads them.

    Expert space (the draws): per layer, alias thresholds `thresh` (uint64, out of 2^32) and
    aliases, flat [L x E]. Rank space (the exact fallback): experts by popularity, most popular
    first: `order` (rank -> expert) and `rank_of` per layer, and per distinct distribution the
    sorted log weights `log_w` and the log of their tail sums `log_tail` (log sum_{s >= r} w_s;
    one more entry, -inf, at r = E). Zipf layers share one distribution (ranked differently).
    """

    def __init__(
        self,
        rng: np.random.Generator,
        n_layers: int,
        n_experts: int,
        zipf: float,
        popularity: np.ndarray | None,
        hash_key: int,
    ) -> None:
        self.n_layers, self.n_experts = n_layers, n_experts
        self.key = np.uint64(hash_key)
        if popularity is None:
            with np.errstate(over="ignore"):
                base = -zipf * np.log(np.arange(1, n_experts + 1, dtype=np.float64))
            log_w = np.maximum(base, -1e300)[None, :]  # finite even for absurd exponents
            order = np.stack([rng.permutation(n_experts) for _ in range(n_layers)])
            self.dist_of_layer = np.zeros(n_layers, dtype=np.int64)
        else:
            with np.errstate(divide="ignore"):
                log_pop = np.log(popularity)
            order = np.argsort(-log_pop, axis=1, kind="stable")
            log_w = np.take_along_axis(log_pop, order, axis=1)
            self.dist_of_layer = np.arange(n_layers, dtype=np.int64)
        self.order = order.astype(np.int64)
        self.rank_of = np.empty_like(self.order)
        np.put_along_axis(self.rank_of, self.order, np.arange(n_experts)[None, :], axis=1)
        self.log_w = log_w
        tail = np.logaddexp.accumulate(log_w[:, ::-1], axis=1)[:, ::-1]
        self.log_tail = np.concatenate([tail, np.full((len(log_w), 1), -np.inf)], axis=1)
        thresh = np.empty((n_layers, n_experts), dtype=np.uint64)
        alias = np.empty((n_layers, n_experts), dtype=np.uint16)
        tables = []
        for w in log_w:
            p = np.exp(w - w[0])
            tables.append(_alias_table(p / p.sum()))
        for layer in range(n_layers):
            prob, to = tables[self.dist_of_layer[layer]]
            experts = self.order[layer]
            # Rank r of this layer is expert order[r]: move the rank-space table to expert space.
            thresh[layer, experts] = np.minimum(np.rint(prob * 2.0**32), 2.0**32).astype(np.uint64)
            alias[layer, experts] = experts[to]
        self.thresh, self.alias = thresh.ravel(), alias.ravel()


def _mix(z: Any) -> Any:
    """splitmix64's finaliser: a bijection of uint64 that scatters nearby inputs."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _random_bits(key: Any, decision: Any, attempt: int) -> Any:
    """64 random bits for (decision, attempt): a counter-based hash, so every random number
    belongs to one decision and the trace does not depend on how the work is chunked. Attempt 0
    is SplitMix64's output number `decision` (for the stream `key`); redraws mix once more."""
    z = _mix(decision * _GOLDEN + key)
    if attempt:
        z = _mix(z + np.uint64(attempt) * _GOLDEN2)
    return z


def _draw(bits: Any, table: int, n_experts: int, thresh: np.ndarray, alias: np.ndarray) -> int:
    """An expert by the alias table starting at `table`, from the low 32 bits of `bits`."""
    x = (bits & _MASK32) * np.uint64(n_experts)
    column = np.int64(x >> np.uint64(32))  # uniform in 0..E-1; the low 32 bits stay uniform
    if (x & _MASK32) < thresh[table + column]:
        return int(column)
    return int(alias[table + column])


def _held(expert: int, slot: int, values: np.ndarray, kept: np.ndarray) -> bool:
    """Whether `expert` is held by an earlier slot or a kept later slot of the token."""
    for other in range(slot):
        if values[other] == expert:
            return True
    for other in range(slot + 1, len(values)):
        if kept[other] and values[other] == expert:
            return True
    return False


def _conditional(
    u: float,
    slot: int,
    values: np.ndarray,
    kept: np.ndarray,
    rank_of: np.ndarray,
    log_w: np.ndarray,
    log_tail: np.ndarray,
    order: np.ndarray,
) -> int:
    """An exact draw (uniform `u`) from the layer's popularity among the experts the token does
    not hold (earlier slots, kept later slots), by inverse CDF in rank order.

    With m the most popular free rank, weights are scaled by w_m (so nothing underflows, even
    for a steep Zipf exponent); G(r), the free weight ranked after r, is the tail sum after r
    less the held weights after r. The draw is the first rank r >= m with G(r) < (1 - u) G(m-1),
    found by bisection."""
    n_experts = len(order)
    ranks = np.full(len(values), -1, dtype=np.int64)  # the held experts' ranks, -1 elsewhere
    for other in range(len(values)):
        if other < slot or (other > slot and kept[other]):
            ranks[other] = rank_of[values[other]]
    first = 0
    while _held(order[first], slot, values, kept):
        first += 1
    top = log_w[first]
    held = 0.0
    for other in range(len(values)):
        if ranks[other] > first:
            held += np.exp(log_w[ranks[other]] - top)
    target = (1.0 - u) * (np.exp(log_tail[first] - top) - held)
    lo, hi = first - 1, n_experts - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        after = np.exp(log_tail[mid + 1] - top)
        for other in range(len(values)):
            if ranks[other] > mid:
                after -= np.exp(log_w[ranks[other]] - top)
        if after < target:
            hi = mid
        else:
            lo = mid
    rank = hi
    while _held(order[rank], slot, values, kept):  # rounding can land on a held rank
        rank -= 1
    return int(order[rank])


def _fill_tokens(
    ids: np.ndarray,
    start: int,
    stop: int,
    first_layer: int,
    end_layer: int,
    is_first: np.ndarray,
    keep_below: Any,
    key: Any,
    thresh: np.ndarray,
    alias: np.ndarray,
    rank_of: np.ndarray,
    order: np.ndarray,
    log_w: np.ndarray,
    log_tail: np.ndarray,
    dist_of_layer: np.ndarray,
) -> None:
    """Write tokens start..stop-1, layers first_layer..end_layer-1 of ``ids`` [T, L, K], one
    token at a time (compiled by numba; layers are independent, so threads can share them).

    Decision d = (token x L + layer) x K + slot: its first word decides keep (high 32 bits <
    `keep_below`) and the first draw (low 32 bits, alias method). A kept slot repeats the
    previous token's final expert; a fresh slot that collides with an earlier slot or a kept
    later one draws again (`_RETRIES` times, words (d, 1..)), then takes the exact conditional
    draw (`_conditional`, uniform from word (d, _RETRIES + 1)). Reads token start-1's row."""
    top_k = ids.shape[2]
    n_layers, n_experts = order.shape
    values = np.zeros(top_k, dtype=np.int64)
    kept = np.zeros(top_k, dtype=np.bool_)
    for t in range(start, stop):
        for layer in range(first_layer, end_layer):
            table = layer * n_experts
            first_decision = (t * n_layers + layer) * top_k
            for slot in range(top_k):
                bits = _random_bits(key, np.uint64(first_decision + slot), 0)
                kept[slot] = (not is_first[t]) and (bits >> np.uint64(32)) < keep_below
                if kept[slot]:
                    values[slot] = ids[t - 1, layer, slot]
                else:
                    values[slot] = _draw(bits, table, n_experts, thresh, alias)
            for slot in range(top_k):
                if kept[slot]:
                    continue
                attempt = 0
                while _held(values[slot], slot, values, kept):
                    attempt += 1
                    bits = _random_bits(key, np.uint64(first_decision + slot), attempt)
                    if attempt > _RETRIES:
                        u = np.float64(bits >> np.uint64(11)) * 2.0**-53
                        dist = dist_of_layer[layer]
                        values[slot] = _conditional(
                            u,
                            slot,
                            values,
                            kept,
                            rank_of[layer],
                            log_w[dist],
                            log_tail[dist],
                            order[layer],
                        )
                        break
                    values[slot] = _draw(bits, table, n_experts, thresh, alias)
            for slot in range(top_k):
                ids[t, layer, slot] = values[slot]


@functools.cache
def _compiled_fill() -> tuple[Callable[..., None], bool]:
    """`_fill_tokens` compiled by numba on first use (imported lazily: it costs a few hundred ms
    that commands which never synthesise should not pay); the plain function where numba is
    missing, with the same results, much slower."""
    try:
        from numba import njit
    except ImportError:  # exercised by a test that hides numba
        return _plain_fill, False
    jit = njit(cache=True, nogil=True)
    for helper in (_mix, _random_bits, _draw, _held, _conditional):
        globals()[helper.__name__] = jit(helper)  # the compiled loop calls compiled helpers
    return jit(_fill_tokens), True


def _plain_fill(*args: Any) -> None:
    """`_fill_tokens` as plain Python: uint64 arithmetic wraps on purpose."""
    with np.errstate(over="ignore"):
        _fill_tokens(*args)


def _fill(sampler: _Sampler, ids: np.ndarray, is_first: np.ndarray, locality: float) -> None:
    """Write every token's experts into ``ids`` [T, L, K]: `_CHUNK_DECISIONS` at a time (chunks
    keep Ctrl-C responsive; the compiled loop needs no working memory), layers split across one
    thread per core (the loop releases the GIL; layers are independent, so the trace is the
    same with any number of threads)."""
    n_tokens, n_layers, top_k = ids.shape
    step = max(1, _CHUNK_DECISIONS // (n_layers * top_k))
    fill, compiled = _compiled_fill()
    # keep if the word's high 32 bits < locality x 2^32 (locality 1: always; 0: never).
    keep_below = np.uint64(round(locality * 2.0**32))
    tables = (
        sampler.key,
        sampler.thresh,
        sampler.alias,
        sampler.rank_of,
        sampler.order,
        sampler.log_w,
        sampler.log_tail,
        sampler.dist_of_layer,
    )
    workers = min(n_layers, os.cpu_count() or 1) if compiled else 1
    cuts = np.linspace(0, n_layers, workers + 1).round().astype(int).tolist()
    groups = list(zip(cuts[:-1], cuts[1:]))
    with ThreadPoolExecutor(max_workers=workers) as threads:
        for start in range(0, n_tokens, step):
            stop = min(n_tokens, start + step)
            jobs = [
                threads.submit(fill, ids, start, stop, lo, hi, is_first, keep_below, *tables)
                for lo, hi in groups
            ]
            for job in jobs:
                job.result()


def synthesize(
    *,
    n_experts: int = 8,
    top_k: int = 2,
    n_layers: int = 4,
    n_requests: int = 16,
    tokens_per_request: int | Sequence[int] = 64,
    length_spread: float = 0.0,
    zipf: float = 0.0,
    locality: float = 0.0,
    expert_bytes: int | Sequence[int] | None = DEFAULT_EXPERT_BYTES,
    popularity: np.ndarray | Sequence[Sequence[float]] | None = None,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
) -> Trace:
    """A synthetic trace. Lengths: ``tokens_per_request`` (one int, or one per request), each
    scaled by a uniform draw in [1 − length_spread, 1 + length_spread].

    Every setting is checked before anything is drawn or allocated (MoeprofError), including the
    size: at most MAX_DECISIONS routing decisions, MAX_TOKENS tokens and MAX_TABLE_ENTRIES
    layers x experts. Memory: the trace's arrays plus a bounded working set per chunk."""
    n_experts = _whole(n_experts, "experts", 1, MAX_EXPERTS)
    top_k = _whole(top_k, "top-k", 1, n_experts, "the number of experts")
    n_layers = _whole(n_layers, "layers", 1)
    n_requests = _whole(n_requests, "requests", 1)
    per_request, scalar_tokens = _per_item(tokens_per_request, "tokens per request")
    if not scalar_tokens and len(per_request) not in (1, n_requests):
        raise MoeprofError(
            f"tokens per request: give one number or one per request ({n_requests}), got "
            f"{len(per_request)}"
        )
    per_request = [_whole(v, "tokens per request", 1) for v in per_request]
    length_spread = _real(length_spread, "length spread")
    if not 0.0 <= length_spread < 1.0:
        raise MoeprofError(f"length spread must be in [0, 1), got {length_spread}")
    zipf = _real(zipf, "the Zipf exponent")
    if zipf < 0:
        raise MoeprofError(f"the Zipf exponent must be >= 0 (0 = uniform popularity), got {zipf}")
    locality = _real(locality, "locality")
    if not 0.0 <= locality <= 1.0:
        raise MoeprofError(f"locality is a probability: between 0 and 1, got {locality}")
    if expert_bytes is not None:
        sizes, scalar_sizes = _per_item(expert_bytes, "expert bytes")
        if not scalar_sizes and len(sizes) != n_layers:
            raise MoeprofError(
                f"expert bytes: give one number or one per layer ({n_layers}), got {len(sizes)}"
            )
        for v in sizes:
            _whole(v, "expert bytes", 0, MAX_EXPERT_BYTES)
    seed = _whole(seed, "seed", 0)
    pop = None if popularity is None else _check_popularity(popularity, n_layers, n_experts, top_k)
    # Size, in exact integers: the most tokens the lengths can reach is the sum over requests of
    # rint(base x (1 + spread)), at least 1 each.
    total_base = per_request[0] * n_requests if len(per_request) == 1 else sum(per_request)
    if length_spread == 0.0 or total_base * n_layers * top_k > MAX_DECISIONS:
        max_tokens = total_base
    else:
        max_tokens = math.ceil(total_base * (1.0 + length_spread)) + n_requests
    decisions = max_tokens * n_layers * top_k
    if decisions > MAX_DECISIONS or max_tokens > MAX_TOKENS:
        raise MoeprofError(
            f"too large: up to {max_tokens:,} tokens x {n_layers} layers x top-{top_k} = "
            f"{decisions:,} routing decisions; the limits are {MAX_DECISIONS:,} decisions and "
            f"{MAX_TOKENS:,} tokens"
        )
    if n_layers * n_experts > MAX_TABLE_ENTRIES:
        raise MoeprofError(
            f"too large: {n_layers:,} layers x {n_experts:,} experts = "
            f"{n_layers * n_experts:,} popularity table entries; the limit is "
            f"{MAX_TABLE_ENTRIES:,} (use fewer layers or experts)"
        )

    # Two independent streams: the set-up (lengths, rankings) and the key of the hash that gives
    # every decision its random words.
    setup_seed, hash_seed = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(setup_seed)
    base_len = np.broadcast_to(np.asarray(per_request, dtype=np.int64), (n_requests,))
    scale = rng.uniform(1.0 - length_spread, 1.0 + length_spread, size=n_requests)
    lengths = np.maximum(1, np.rint(base_len * scale)).astype(np.int64)
    n_tokens = int(lengths.sum())
    request_ids = np.repeat(np.arange(n_requests, dtype=np.int32), lengths)
    first_row = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int32)
    positions = np.arange(n_tokens, dtype=np.int32) - np.repeat(first_row, lengths)

    sampler = _Sampler(
        rng, n_layers, n_experts, zipf, pop, int(hash_seed.generate_state(1, np.uint64)[0])
    )
    # The trace's own id type (the sentinel, = n_experts, must fit too), so no copy is made.
    ids = np.empty((n_tokens, n_layers, top_k), dtype=np.uint8 if n_experts <= 255 else np.uint16)
    _fill(sampler, ids, positions == 0, locality)
    settings = {
        "kind": "synth",
        "n_experts": n_experts,
        "top_k": top_k,
        "n_layers": n_layers,
        "n_requests": n_requests,
        "tokens_per_request": per_request[0] if scalar_tokens else base_len.tolist(),
        "length_spread": length_spread,
        "zipf": zipf,
        "locality": locality,
        "popularity": "given" if popularity is not None else None,
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
    }
    full_meta: dict[str, Any] = {
        "model": {"id": "synthetic", "architecture": None, "revision": None}
    }
    full_meta["source"] = settings
    full_meta.update(meta or {})
    return Trace.from_arrays(
        ids,
        n_experts=n_experts,
        request_ids=request_ids,
        positions=positions,
        expert_bytes=expert_bytes,
        meta=full_meta,
    )

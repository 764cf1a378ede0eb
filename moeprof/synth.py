"""Synthetic routing traces with controlled popularity skew and temporal locality.

Each token draws top_k distinct experts per layer from a per-layer popularity distribution
(Zipf with exponent ``zipf`` over a random ranking of the experts, or given counts) with the
Gumbel-top-k trick, which samples without replacement in proportion to popularity. With
probability ``locality`` a slot instead keeps the expert that the request's previous token ended
up with in that slot (so runs of kept slots repeat one value); the token's other slots take its
best-ranked draws that no kept slot holds, so a token's experts in a layer stay distinct and a
kept slot is never changed. Locality never crosses requests: each request's first token draws
afresh. Deterministic for a seed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from moeprof.errors import MoeprofError
from moeprof.trace import MAX_EXPERT_BYTES, Trace

# One Mixtral-8x7B expert in bf16: gate, up and down projections of 4096 x 14336, 2 bytes each.
DEFAULT_EXPERT_BYTES = 3 * 4096 * 14336 * 2
MAX_EXPERTS = 65535  # the trace format's limit (uint16 ids with a sentinel)
# Size limits, checked before anything is allocated: routing decisions (tokens x layers x top-k;
# the trace holds one byte or two per decision and checks them as int64) and random numbers drawn
# (tokens x layers x experts, the Gumbel-top-k cost).
MAX_DECISIONS = 1 << 28
MAX_DRAWS = 1 << 34
_DRAW_FLOATS = 1 << 22  # Gumbel keys per draw: bounds memory at 32 MiB
_CHUNK = 1 << 15  # at most this many tokens per draw
_WINDOW_MIN, _WINDOW_MAX = 32, 1 << 15  # tokens resolved together by _apply_locality
_LOCALITY_DECISIONS = 1 << 20  # decisions per _apply_locality call: bounds its memory


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


def _log_popularity(
    rng: np.random.Generator,
    n_layers: int,
    n_experts: int,
    zipf: float,
    popularity: np.ndarray | None,
) -> np.ndarray:
    """Per-layer log-popularity up to a constant, float64 [L, E]; -inf for never-chosen experts.

    Computed in log space so that a steep Zipf exponent cannot underflow to zero probability.
    """
    if popularity is not None:
        with np.errstate(divide="ignore"):
            return np.log(popularity)
    with np.errstate(over="ignore"):
        base = -zipf * np.log(np.arange(1, n_experts + 1, dtype=np.float64))
    base = np.maximum(base, -1e300)  # finite even for absurd exponents
    out = np.empty((n_layers, n_experts))
    for layer in range(n_layers):
        out[layer] = base[rng.permutation(n_experts)]
    return out


def _ranked_draws(rng: np.random.Generator, log_p: np.ndarray, n_tokens: int, k: int) -> np.ndarray:
    """For each token, `k` distinct experts in Gumbel-top-k order (best first): int64 [T, k]."""
    n_exp = log_p.shape[0]
    keys = log_p[None, :] + rng.gumbel(size=(n_tokens, n_exp))
    if k < n_exp:
        top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    else:
        top = np.broadcast_to(np.arange(n_exp), (n_tokens, n_exp)).copy()
    top_keys = np.take_along_axis(keys, top, axis=1)
    return np.take_along_axis(top, np.argsort(-top_keys, axis=1), axis=1)


def _fill_fresh(cand: np.ndarray, carried: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """One token per row: kept slots hold `carried`; the fresh slots, in slot order, take the
    best-ranked candidates that no kept slot of the row holds.

    Enough remain: a row's candidates are distinct and its kept values are distinct, so each kept
    slot rules out at most one of the top_k candidates, leaving one per fresh slot.
    """
    top_k = cand.shape[1]
    taken = np.zeros(cand.shape, dtype=bool)
    for j in range(top_k):
        taken |= keep[:, j : j + 1] & (cand == carried[:, j : j + 1])
    usable = np.take_along_axis(cand, np.argsort(taken, axis=1, kind="stable"), axis=1)
    fresh_rank = np.maximum(np.cumsum(~keep, axis=1) - 1, 0)
    return np.where(keep, carried, np.take_along_axis(usable, fresh_rank, axis=1))


def _apply_locality(
    cand: np.ndarray, keep: np.ndarray, carry: np.ndarray | None = None
) -> np.ndarray:
    """Final expert ids of consecutive tokens under temporal locality, same shape as ``cand``.

    ``cand`` [T, top_k], or [T, S, top_k] for S independent streams (layers) at once: each token's
    distinct draws, best first. ``keep``, same shape: which slots keep the previous token's expert;
    it must be False on each request's first token, so locality never crosses requests. ``carry``
    [top_k] or [S, top_k]: the final experts of the token before row 0 (the previous chunk of the
    same request), or None.

    A kept slot holds the previous token's *final* expert in that slot, which may itself have been
    kept: it equals the expert chosen at the slot's last fresh token at or before it (found per
    slot with ``np.maximum.accumulate``). Fresh slots take the token's best-ranked draws that its
    kept slots do not hold (`_fill_fresh`), so they depend on earlier fresh slots' final values.
    They are found by vectorised fixed-point (Jacobi) passes over a window of rows, re-evaluating
    only rows whose kept experts changed in the pass before. Each pass makes at least the first
    row still changing final, so a window settles, and the result equals processing the tokens
    one at a time. Collisions are rare when top_k is well below the number of experts, and then a
    window settles in a few passes and windows grow; when collisions chain (top_k close to the
    number of experts, high locality) windows shrink so a pass costs little.
    """
    cand = np.asarray(cand, dtype=np.int64)
    flat = cand.ndim == 2
    top_k = cand.shape[-1]
    cand = cand.reshape(cand.shape[0], -1, top_k)
    keep = np.array(keep, dtype=bool).reshape(cand.shape)
    if carry is not None:  # the previous token becomes row 0: all fresh, its own draws
        row0 = np.asarray(carry, dtype=np.int64).reshape(1, -1, top_k)
        cand = np.concatenate([row0, cand])
        keep = np.concatenate([np.zeros_like(keep[:1]), keep])
    n, n_streams, _ = cand.shape
    if n == 0:
        return cand.reshape(0, top_k) if flat else cand
    keep[0] = False  # nothing before the first row to keep
    fresh = ~keep
    rows = np.arange(n)[:, None, None]
    stream = np.arange(n_streams)[None, :, None]
    slot = np.arange(top_k)[None, None, :]
    # The row whose fresh value each slot holds: the last fresh row at or before it.
    src = np.maximum.accumulate(np.where(fresh, rows, 0), axis=0)
    # The last row holding a fresh row's value: one before the slot's next fresh row.
    next_fresh = np.minimum.accumulate(np.where(fresh, rows, n)[::-1], axis=0)[::-1]
    run_end = np.concatenate([next_fresh[1:], np.full_like(next_fresh[:1], n)]) - 1

    value = cand.copy()  # the fresh slots' values; first guess: the draws, collisions unresolved
    lo, width = 0, _WINDOW_MIN
    while lo < n:
        # Rows before `lo` are final; iterate on the rows lo .. hi-1 until nothing changes.
        hi = min(n, lo + width)
        todo = np.arange(lo, hi)
        passes = 0
        while todo.size:
            passes += 1
            old = value[todo]
            new = _fill_fresh(
                cand[todo].reshape(-1, top_k),
                value[src[todo], stream, slot].reshape(-1, top_k),
                keep[todo].reshape(-1, top_k),
            ).reshape(old.shape)
            is_fresh = fresh[todo]
            changed = is_fresh & (new != old)
            value[todo] = np.where(is_fresh, new, old)
            r, s, k = np.nonzero(changed)
            r = todo[r]
            # Rows r+1 .. run_end hold a changed value: evaluate those in the window again.
            stops = np.minimum(run_end[r, s, k] + 1, hi) - lo
            starts = np.minimum(r + 1 - lo, stops)
            span = np.bincount(starts, minlength=hi - lo + 1)
            span -= np.bincount(stops, minlength=hi - lo + 1)
            todo = lo + np.flatnonzero(np.cumsum(span[: hi - lo]) > 0)
        lo = hi
        # Wide windows while they settle in few passes (less overhead); narrow ones when
        # collisions chain and each pass re-evaluates much of the window.
        if passes <= 4:
            width = min(2 * width, _WINDOW_MAX)
        elif passes > 16:
            width = max(width // 2, _WINDOW_MIN)
    out = value[src, stream, slot]
    if carry is not None:
        out = out[1:]
    return out.reshape(-1, top_k) if flat else out


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
    size: at most MAX_DECISIONS routing decisions and MAX_DRAWS random numbers."""
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
    decisions, draws = max_tokens * n_layers * top_k, max_tokens * n_layers * n_experts
    if decisions > MAX_DECISIONS:
        raise MoeprofError(
            f"too large: up to {max_tokens:,} tokens x {n_layers} layers x top-{top_k} = "
            f"{decisions:,} routing decisions; the limit is {MAX_DECISIONS:,}"
        )
    if draws > MAX_DRAWS:
        raise MoeprofError(
            f"too large: up to {max_tokens:,} tokens x {n_layers} layers x {n_experts} experts = "
            f"{draws:,} random draws; the limit is {MAX_DRAWS:,} (use fewer tokens, layers or "
            "experts)"
        )

    rng = np.random.default_rng(seed)
    base_len = np.broadcast_to(np.asarray(per_request, dtype=np.int64), (n_requests,))
    scale = rng.uniform(1.0 - length_spread, 1.0 + length_spread, size=n_requests)
    lengths = np.maximum(1, np.rint(base_len * scale)).astype(np.int64)
    n_tokens = int(lengths.sum())
    request_ids = np.repeat(np.arange(n_requests, dtype=np.int32), lengths)
    first_row = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int32)
    positions = np.arange(n_tokens, dtype=np.int32) - np.repeat(first_row, lengths)
    is_first = positions == 0

    log_p = _log_popularity(rng, n_layers, n_experts, zipf, pop)
    # The trace's own id type (the sentinel, = n_experts, must fit too), so no copy is made.
    ids = np.empty((n_tokens, n_layers, top_k), dtype=np.uint8 if n_experts <= 255 else np.uint16)
    keep = np.zeros(ids.shape, dtype=bool) if locality > 0.0 else None
    chunk = max(1, min(_CHUNK, _DRAW_FLOATS // n_experts))
    for layer in range(n_layers):
        for lo in range(0, n_tokens, chunk):
            hi = min(n_tokens, lo + chunk)
            ids[lo:hi, layer] = _ranked_draws(rng, log_p[layer], hi - lo, top_k)
            if keep is not None:
                keep[lo:hi, layer] = rng.random((hi - lo, top_k)) < locality
    if keep is not None:
        keep[is_first] = False
        # All layers at once (independent streams), a bounded chunk of tokens at a time.
        step = max(1, _LOCALITY_DECISIONS // (n_layers * top_k))
        carry = None
        for lo in range(0, n_tokens, step):
            hi = min(n_tokens, lo + step)
            ids[lo:hi] = _apply_locality(ids[lo:hi], keep[lo:hi], carry)
            carry = ids[hi - 1]
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
